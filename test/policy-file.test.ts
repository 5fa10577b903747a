// proxy/policy/file.ts: the policy file is read only once it holds still, however the change was seen.
import t from 'tap'
import { mkdtempSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { watchPolicyFile } from '../proxy/policy/file.js'

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

t.test('a policy file written in place, in pieces, is read only once whole (the look each second read it half-written)', async (t) => {
  const file = join(mkdtempSync(join(tmpdir(), 'lk-policy-file-')), 'policy.yaml')
  writeFileSync(file, 'default: allow\n')
  const reads: string[] = []
  // Looked at every 10 ms, read once still for 200 ms: the pause between the pieces (60 ms) is
  // longer than a look's interval and shorter than the settling.
  const watch = watchPolicyFile(file, () => reads.push(readFileSync(file, 'utf8')), 10, 200)
  t.teardown(() => watch.close())
  await sleep(100)
  const whole = 'default: allow\nrules:\n  - { id: no-admin, action: deny, paths: ["/admin/**"] }\n'
  const fd = openSync(file, 'r+')
  ftruncateSync(fd, 0)
  writeSync(fd, whole.slice(0, 22), 0)
  await sleep(60)
  writeSync(fd, whole.slice(22), 22)
  closeSync(fd)
  for (let waited = 0; reads.length === 0 && waited < 3000; waited += 20) await sleep(20)
  await sleep(300)
  t.ok(reads.length >= 1, 'the change was read')
  t.same([...new Set(reads)], [whole], 'and only ever whole: never the prefix without its deny rule')
})
