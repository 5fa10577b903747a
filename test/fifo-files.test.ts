// A FIFO where a config (or a file it names) belongs: no process writes to it, and opening it to
// read waited for a writer for ever, so `check-config` and the sidecar hung at start, silent. It
// is refused, naming the file; a pipe whose writer is slow to write is still waited for.
// Processes, not calls: a read that hangs would hang the test runner itself.
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI } from './helpers/cli.js'

const dir = mkdtempSync(join(tmpdir(), 'lk-fifo-'))
const fifo = (name: string) => {
  const path = join(dir, name)
  execFileSync('mkfifo', [path])
  return path
}
// SIGKILL at the timeout: a process blocked in open(2) is the failure this file is about.
const latchkey = (args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL' })

t.test('check-config and the sidecar refuse a config that is a FIFO no process writes to, naming it', async (t) => {
  const config = fifo('config.yaml')
  const checked = latchkey(['check-config', config])
  t.equal(checked.signal, null, 'check-config ends by itself')
  t.equal(checked.status, 1, 'invalid')
  t.equal(checked.stderr.trim(), `${config}: invalid configuration:\n  (root): cannot read file: a FIFO no process writes to: nothing to read`)
  const started = latchkey(['sidecar', '-c', config])
  t.equal(started.signal, null, 'the sidecar ends by itself')
  t.equal(started.status, 1, 'and does not start')
  t.match(started.stderr, `${config}: invalid configuration:\n  (root): cannot read file: a FIFO no process writes to`)
})

t.test('a secrets.file or policy_file that is such a FIFO is named by its setting', async (t) => {
  const secrets = fifo('secrets.yaml')
  const withSecrets = join(dir, 'with-secrets.yaml')
  writeFileSync(
    withSecrets,
    `version: 1\nsecrets: { file: ${secrets} }\ncredentials: [{ id: c, audience: "http://127.0.0.1:1", source: static, secret: S, inject: { type: bearer } }]\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`,
  )
  const r = latchkey(['check-config', withSecrets])
  t.equal(r.signal, null, 'check-config ends by itself')
  t.equal(r.status, 1)
  t.equal(r.stderr.trim(), `${withSecrets}: invalid configuration:\n  secrets.file: ${secrets}: cannot read (a FIFO no process writes to: nothing to read)`)
  // A policy file that cannot be read here is said as one missing here is: a warning, not a verdict on the config.
  const policy = fifo('policy.yaml')
  const withPolicy = join(dir, 'with-policy.yaml')
  writeFileSync(withPolicy, `version: 1\nsidecar: { policy_file: ${policy} }\naudit: { jsonl: { path: ${join(dir, 'b.jsonl')} } }\n`)
  const p = latchkey(['check-config', withPolicy])
  t.equal(p.signal, null, 'check-config ends by itself')
  t.match(p.stderr, `warning: sidecar.policy_file: ${policy}: cannot read (a FIFO no process writes to: nothing to read) (the sidecar would not start on this machine)`)
})

t.test('a pipe whose writer writes late is waited for and read whole', async (t) => {
  const config = join(dir, 'late.yaml')
  writeFileSync(config, `version: 1\naudit: { jsonl: { path: ${join(dir, 'c.jsonl')} } }\n`)
  // The writer holds the pipe open and writes after a pause: the read waits for it, as cat would.
  const r = spawnSync('bash', ['-c', `${process.execPath} ${CLI} check-config <(sleep 0.5; cat ${config})`], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL' })
  t.equal(r.status, 0, r.stderr)
  t.match(r.stdout, /^\/dev\/fd\/\d+: valid \(version 1, 0 rules/)
})
