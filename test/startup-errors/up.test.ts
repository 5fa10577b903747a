// Start-up errors of `latchkey up` that the other files cannot reach: the local attestor's
// private key, kept in the working directory (.latchkey/local-attestor), read before anything starts.
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { copyFileSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI } from '../helpers/cli.js'
import { refuses, re } from './helpers.js'

t.test('up: a private key file that is not JSON is named, its text never quoted', async (t) => {
  const cwd = mkdtempSync(join(tmpdir(), 'lk-startup-up-'))
  for (const f of ['up.yaml', 'agents.yaml']) copyFileSync(join('deploy/examples', f), join(cwd, f))
  const keyDir = join(cwd, '.latchkey', 'local-attestor')
  mkdirSync(keyDir, { recursive: true })
  // A stray byte where the private scalar begins: V8's message quoted the ten characters after it.
  const d = 'PRIVATEdPRIVATEdPRIVATEdPRIVATEdPRIVATEdPRI'
  writeFileSync(join(keyDir, 'local-attestor.key.json'), `{"kty":"EC","crv":"P-256","d":x${d}","x":"a","y":"b"}`, { mode: 0o600 })
  const r = spawnSync(process.execPath, [CLI, 'up', '-c', 'up.yaml'], { cwd, encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL' })
  const file = join('.latchkey', 'local-attestor', 'local-attestor.key.json')
  refuses(t, r, [re(`${file}: the local attestor's private key is not JSON (its text is not repeated: it holds the key); move it away and a new key is made`)], 'a corrupt key file')
  t.notOk((r.stdout + r.stderr).includes('PRIVATE'), 'no part of the key is printed')
})
