// Start-up errors of `latchkey sidecar`, and check-config on the same files (see helpers.ts).
import t from 'tap'
import { spawn } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { writeYaml } from '../collector/process-helpers.js'
import { dir, latchkey, said, refuses, checkRefuses, checkWarns, re } from './helpers.js'
import { CLI } from '../helpers/cli.js'

t.test('sidecar: ports, secrets.file, the state file and the spool, as check-config says', async (t) => {
  const base = (name: string, extra: Record<string, unknown> = {}, sidecar: Record<string, unknown> = {}) =>
    writeYaml(join(dir, `s-${name}.yaml`), {
      version: 1,
      sidecar: { listen: { port: 19711 }, admin: { port: 19712 }, ...sidecar },
      audit: { jsonl: { path: join(dir, `${name}.jsonl`) } },
      ...extra,
    })
  const env = { LATCHKEY_SECRET_CTL: 'control-token-0123456789', LATCHKEY_SECRET_COL: 'collector-token-0123456789' }

  const controlPort = base('control-port', {}, { control: { url: 'grpc://127.0.0.1:999999', token_secret: 'CTL' } })
  refuses(t, latchkey(['sidecar', '-c', controlPort], env), [/invalid configuration:$/, re('  sidecar.control.url: must be grpc://host:port with a port from 1 to 65535')], 'control.url port out of range')
  await checkRefuses(t, controlPort, /sidecar\.control\.url: must be grpc:\/\/host:port with a port from 1 to 65535/)

  const collectorPort = base('collector-port', { audit: { collector: { address: '127.0.0.1:99999', sidecar_id: 's', token_secret: 'COL' } } })
  refuses(t, latchkey(['sidecar', '-c', collectorPort], env), [/invalid configuration:$/, re('  audit.collector.address: must be host:port with a port from 1 to 65535')], 'audit.collector.address port out of range')
  await checkRefuses(t, collectorPort, /audit\.collector\.address: must be host:port with a port from 1 to 65535/)

  const samePort = base('same-port', {}, { admin: { port: 19711 } })
  refuses(t, latchkey(['sidecar', '-c', samePort]), [/invalid configuration:$/, re('  sidecar.admin.port: the same as sidecar.listen.port (19711): each listener needs its own port')], 'listen.port == admin.port')
  await checkRefuses(t, samePort, /sidecar\.admin\.port: the same as sidecar\.listen\.port/)
  t.equal(latchkey(['check-config', base('both-zero', {}, { listen: { port: 0 }, admin: { port: 0 } })]).status, 0, 'port 0 twice is two ports')

  const secretFiles: [string, string, RegExp][] = [
    ['duplicate', 'S: a-secret-long-enough-1\nS: a-secret-long-enough-2\n', /not YAML this sidecar reads \(DUPLICATE_KEY at line 2;/],
    ['two-documents', 'S: a-secret-long-enough-1\n---\nS: b\n', /not YAML this sidecar reads \(MULTIPLE_DOCS at line 2;/],
    ['a-list', '- a-secret-long-enough-1\n', /must be a mapping of name to secret/],
    ['a-number', 'S: 12345678901234567\n', /secret S is not a string \(quote it\)/],
  ]
  for (const [name, content, why] of secretFiles) {
    const file = join(dir, `secrets-${name}.yaml`)
    writeFileSync(file, content)
    const config = base(`secrets-${name}`, {
      secrets: { file },
      credentials: [{ id: 'c', audience: 'https://api.example', source: 'static', secret: 'S', inject: { type: 'bearer' } }],
    })
    const r = latchkey(['sidecar', '-c', config])
    refuses(t, r, [new RegExp(`^secrets\\.file ${file.replace(/[.]/g, '\\.')}: ${why.source}`)], `secrets.file ${name}`)
    await checkRefuses(t, config, new RegExp(`^  secrets\\.file: ${file.replace(/[.]/g, '\\.')}: ${why.source}`, 'm'))
  }
  const ctlChar = join(dir, 'secrets-control.yaml')
  writeFileSync(ctlChar, 'S: "a-secret-long\\u0001-enough"\n')
  const ctlConfig = base('secrets-control', { secrets: { file: ctlChar }, credentials: [{ id: 'c', audience: 'https://api.example', source: 'static', secret: 'S', inject: { type: 'bearer' } }] })
  refuses(t, latchkey(['sidecar', '-c', ctlConfig]), [/^credential "c": secret S cannot be sent in a header/], 'a control character in a header secret')
  await checkRefuses(t, ctlConfig, /^ {2}credentials\[0\]\.secret: credential "c": secret S cannot be sent in a header/m)
  const newline = join(dir, 'secrets-newline.yaml')
  writeFileSync(newline, 'S: "a-secret-long-enough-1\\n"\n')
  const newlineConfig = base('secrets-newline', { secrets: { file: newline }, credentials: [{ id: 'c', audience: 'https://api.example', source: 'static', secret: 'S', inject: { type: 'bearer' } }] })
  const echoed = /credential "c": secret S cannot be sent in a header: it ends with a line break \(as `echo` leaves one; `printf %s` does not\): remove it$/
  refuses(t, latchkey(['sidecar', '-c', newlineConfig]), [new RegExp(`^${echoed.source}`)], 'a secret ending in a line break, as echo writes it')
  await checkRefuses(t, newlineConfig, new RegExp(`^ {2}credentials\\[0\\]\\.secret: ${echoed.source}`, 'm'))
  const unreadable = base('secrets-missing', { secrets: { file: join(dir, 'no-secrets.yaml') } })
  await checkWarns(t, unreadable, /^warning: secrets\.file: .*no-secrets\.yaml: cannot read \(ENOENT\) \(the sidecar would not start on this machine\)$/m)

  const state = join(dir, 'corrupt-state.json')
  writeFileSync(state, '{"format": ')
  const corrupt = base('state', {}, { control: { url: 'grpc://127.0.0.1:19713', token_secret: 'CTL', state_file: state } })
  refuses(t, latchkey(['sidecar', '-c', corrupt], env), [/^sidecar\.control\.state_file .*corrupt-state\.json: not a usable revocation state file/], 'a corrupt state file')
  await checkRefuses(t, corrupt, /^ {2}sidecar\.control\.state_file: .*corrupt-state\.json: not a usable revocation state file/m)

  const aFile = join(dir, 'a-file')
  writeFileSync(aFile, 'x')
  const spool = base('spool', { audit: { collector: { address: '127.0.0.1:19714', sidecar_id: 's', token_secret: 'COL', spool_dir: join(aFile, 'spool') } } })
  refuses(t, latchkey(['sidecar', '-c', spool], env), [re(`audit.collector.spool_dir ${join(aFile, 'spool')}: cannot use it as the audit spool (ENOTDIR: not a directory, mkdir '${join(aFile, 'spool')}')`)], 'a spool_dir under a file')
  await checkWarns(t, spool, re(`warning: audit.collector.spool_dir: ${join(aFile, 'spool')}: ${aFile} is not a directory (the sidecar would not start on this machine)`))
  const spoolIsFile = base('spool-file', { audit: { collector: { address: '127.0.0.1:19714', sidecar_id: 's', token_secret: 'COL', spool_dir: aFile } } })
  refuses(t, latchkey(['sidecar', '-c', spoolIsFile], env), [/^audit\.collector\.spool_dir .*a-file: cannot use it as the audit spool \(EEXIST/], 'a spool_dir that is a file')
  await checkWarns(t, spoolIsFile, re(`warning: audit.collector.spool_dir: ${aFile}: is not a directory (the sidecar would not start on this machine)`))
})

t.test('a sync that fails at shutdown is one line naming audit.jsonl.path', async (t) => {
  const config = writeYaml(join(dir, 's-dev-full.yaml'), { version: 1, sidecar: { listen: { port: 19721 }, admin: { port: 19722 } }, audit: { jsonl: { path: '/dev/full' } } })
  const proc = spawn(process.execPath, [CLI, 'sidecar', '-c', config], { stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void (proc.exitCode === null && proc.signalCode === null && proc.kill('SIGKILL')))
  let out = ''
  proc.stdout.on('data', (d: Buffer) => (out += d.toString()))
  proc.stderr.on('data', (d: Buffer) => (out += d.toString()))
  const started = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 15_000)
    const check = () => {
      if (/sidecar listening|"port":19721/.test(out)) {
        clearTimeout(timer)
        resolve(true)
      }
    }
    proc.stdout.on('data', check)
    proc.stderr.on('data', check)
    proc.once('exit', () => resolve(false))
  })
  t.ok(started, `started: ${out.slice(-500)}`)
  // The listening line comes just before the CLI takes the signals over.
  await new Promise((resolve) => setTimeout(resolve, 500))
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)))
  proc.kill('SIGTERM')
  const code = await exited
  t.equal(code, 1, 'not a clean shutdown')
  const text = said(out)
  t.notMatch(text, /^\s+at /m, 'no stack trace')
  t.match(text, /^shutdown after SIGTERM failed: audit\.jsonl\.path \/dev\/full: cannot be synced to disk at close \(E[A-Z]+\): the last events written may be lost$/m)
  t.equal(text.split('\n').length, 1, `one line: ${JSON.stringify(text)}`)
})
