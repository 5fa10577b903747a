// The spool on real files: order, restart, torn tails, damaged records, ownership.
import t from 'tap'
import { mkdtempSync, readdirSync, rmSync, statSync, truncateSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { spawnSync } from 'node:child_process'
import { Spool } from '../../proxy/audit/spool.js'

const dir = () => mkdtempSync(join(tmpdir(), 'lk-spool-'))
const payload = (seq: number) => Buffer.from(`event-${seq}-${'x'.repeat(seq % 50)}`)
const all = (s: Spool, after = 0) => s.read(s.start(), 1e9, 1e12, after).records.map((r) => [r.seq, r.payload.toString()])
const segs = (d: string) => readdirSync(d).filter((n) => n.endsWith('.seg')).sort()

t.test('records come back in order, across segments and a restart', async (t) => {
  const d = dir()
  const s = new Spool(d, 'sc', 512)
  for (let i = 0; i < 20; i++) s.append(3, payload)
  t.equal(s.lastSeq, 60)
  t.ok(segs(d).length > 3, `rotated into ${segs(d).length} segments`)
  t.same(all(s), Array.from({ length: 60 }, (_, i) => [i + 1, payload(i + 1).toString()]))
  t.same(all(s, 55).map((r) => r[0]), [56, 57, 58, 59, 60], 'acked sequences are skipped')
  // Reading in small batches with the cursor sees each record exactly once.
  let cursor = s.start()
  const seen: number[] = []
  for (;;) {
    const r = s.read(cursor, 7, 1e9, 0)
    if (r.records.length === 0) break
    seen.push(...r.records.map((x) => x.seq))
    cursor = r.cursor
  }
  t.same(seen, Array.from({ length: 60 }, (_, i) => i + 1))
  s.close()
  const again = new Spool(d, 'sc', 512)
  t.equal(again.next, 61)
  t.same(again.recovery, { segments: segs(d).length, records: 60, tornBytes: 0, corruptBytes: 0, damaged: [] })
  again.close()
})

t.test('acknowledged segments are deleted, and the sequence still survives a restart', async (t) => {
  const d = dir()
  const s = new Spool(d, 'sc', 256)
  for (let i = 0; i < 10; i++) s.append(4, payload)
  const before = segs(d).length
  s.acknowledge(20)
  t.ok(segs(d).length < before, 'segments wholly acked are gone')
  const oldest = Number(all(s)[0]![0])
  t.ok(oldest <= 21 && oldest > 0, `the oldest record kept (${oldest}) is at most the first unacked one`)
  t.ok(all(s).some((r) => r[0] === 21), 'nothing unacked was deleted')
  s.acknowledge(40)
  t.same(all(s, 40), [], 'nothing unacked is left')
  t.equal(segs(d).length, 1, 'only the newest segment is left (it is not rotated early)')
  s.close()
  const again = new Spool(d, 'sc', 256)
  t.equal(again.next, 41, 'the sequence continues after a restart')
  again.acknowledge(40)
  again.append(1, payload)
  again.append(200, payload) // fills and rotates past the acked segment
  again.acknowledge(again.lastSeq)
  t.equal(segs(d).length, 1, 'the acked segment went once a newer one existed')
  again.close()
  const third = new Spool(d, 'sc', 256)
  t.equal(third.next, 242, 'and a fully acked, rotated spool still continues its sequence')
  third.close()
})

t.test('a torn last record is cut off; every record before it is kept', async (t) => {
  const d = dir()
  const s = new Spool(d, 'sc', 1 << 20)
  s.append(10, payload)
  s.close()
  const [last] = segs(d).slice(-1)
  const path = join(d, last!)
  truncateSync(path, statSync(path).size - 5)
  const r = new Spool(d, 'sc', 1 << 20)
  t.equal(r.recovery.records, 9)
  t.ok(r.recovery.tornBytes > 0 && r.recovery.tornBytes < 40, `torn bytes ${r.recovery.tornBytes}`)
  t.equal(r.recovery.corruptBytes, 0)
  t.same(all(r).map((x) => x[0]), [1, 2, 3, 4, 5, 6, 7, 8, 9])
  // The next append follows valid data and gets the torn record's (never sent) sequence.
  r.append(1, payload)
  t.same(all(r).map((x) => x[0]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
  r.close()
  const again = new Spool(d, 'sc', 1 << 20)
  t.same(all(again).length, 10, 'and it reads back after another restart')
  again.close()
})

t.test('a damaged record in an older segment is skipped, the records around it kept', async (t) => {
  const d = dir()
  const s = new Spool(d, 'sc', 200)
  for (let i = 0; i < 10; i++) s.append(2, payload)
  s.close()
  const first = join(d, segs(d)[0]!)
  const intact = new Spool(d, 'sc', 200)
  const recs = all(intact)
  intact.close()
  t.equal(recs.length, 20)
  // Flip one byte inside the second record's payload.
  const data = readFileSync(first)
  const secondStart = 16 + payload(1).length
  data[secondStart + 16 + 2]! ^= 0xff
  writeFileSync(first, data)
  const r = new Spool(d, 'sc', 200)
  t.equal(r.recovery.records, 19)
  t.equal(r.recovery.corruptBytes, 16 + payload(2).length, 'exactly the damaged record was skipped')
  t.same(r.recovery.damaged, [first], 'and the report names the segment it was in')
  t.same(all(r).map((x) => x[0]), [1, ...Array.from({ length: 18 }, (_, i) => i + 3)])
  r.close()
})

t.test("a spool is tied to its sidecar: another sidecar's spool is refused", async (t) => {
  const d = dir()
  new Spool(d, 'sidecar-one', 1024).close()
  t.throws(() => new Spool(d, 'sidecar-two', 1024), { code: 'LK_SPOOL', message: /belongs to sidecar "sidecar-one", not "sidecar-two"/ })
  const one = new Spool(d, 'sidecar-one', 1024)
  t.equal(one.next, 1, 'the refusal left the directory free for its owner')
  one.close()
})

t.test('one holder per spool directory: a second, in this process or another, is refused; a holder killed leaves none behind', async (t) => {
  const d = dir()
  const first = new Spool(d, 'sc', 1024)
  first.append(2, payload)
  const busy = { code: 'LK_SPOOL', message: `spool ${d} is in use by another sidecar (${join(d, 'spool.lock')} is locked): two processes appending to one spool corrupt it; give each sidecar its own spool_dir` }
  t.throws(() => new Spool(d, 'sc', 1024), busy, 'a second spool on it in this process')
  // Another process: the same module, as a second sidecar would load it.
  const spoolModule = new URL('../../proxy/audit/spool.js', import.meta.url).href
  const other = (script: string) => spawnSync(process.execPath, ['--input-type=module', '-e', `import { Spool } from '${spoolModule}'; ${script}`], { encoding: 'utf8' })
  const refused = other(`try { new Spool(${JSON.stringify(d)}, 'sc', 1024); console.log('opened') } catch (e) { console.log(e.code, e.message) }`)
  t.equal(refused.stdout.trim(), `${busy.code} ${busy.message}`, 'a second process')
  t.same(readdirSync(d).filter((n) => n.endsWith('.seg')).length, 1, 'and it touched nothing')
  first.close()
  const after = other(`const s = new Spool(${JSON.stringify(d)}, 'sc', 1024); s.append(1, () => Buffer.from('x')); console.log(s.lastSeq); process.kill(process.pid, 'SIGKILL')`)
  t.equal(after.stdout.trim(), '3', 'free once closed: another process opens it and appends')
  t.equal(after.signal, 'SIGKILL', 'and dies without closing it')
  const again = new Spool(d, 'sc', 1024)
  t.equal(again.next, 4, 'its lock died with it: the directory opens again at once')
  again.close()
})

t.test('a lock removed under a running spool (its file deleted, or the directory) stops its appends for good: another process may be appending there', async (t) => {
  for (const how of ['spool.lock deleted', 'the directory deleted'] as const) {
    const d = dir()
    const s = new Spool(d, 'sc', 1024)
    s.append(1, payload)
    rmSync(how === 'spool.lock deleted' ? join(d, 'spool.lock') : d, { recursive: true, force: true })
    // Looked at once a second at most.
    await new Promise((r) => setTimeout(r, 1100))
    t.throws(() => s.append(1, payload), { code: 'LK_SPOOL', message: new RegExp(`^the lock on spool ${d} was removed .*another process may append there, so this one stops`) }, `${how}: appends stop`)
    t.throws(() => s.append(1, payload), { code: 'LK_SPOOL' }, `${how}: and stay stopped`)
    if (how === 'spool.lock deleted') {
      const other = new Spool(d, 'sc', 1024)
      other.append(1, payload)
      t.equal(other.lastSeq, 2, 'the process that holds the directory now appends alone')
      other.close()
    }
    s.close()
  }
})
