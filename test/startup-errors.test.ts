// Start-up failures of the real processes (`latchkey broker|sidecar|collector`) are one line per
// problem, naming the setting and the file, never a stack trace; and `check-config` says the same
// of the same config: a file whose content is wrong makes it invalid (exit 1), a file missing on
// this machine is a warning naming the setting (a mounted secret may be there where it runs).
import t, { type Test } from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { copyFileSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { exportJWK, generateKeyPair } from 'jose'
import { writeYaml } from './collector/process-helpers.js'
import { parseConfig, ConfigError } from '../lib/config/load.js'

const dir = mkdtempSync(join(tmpdir(), 'lk-startup-'))
const latchkey = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  // SIGKILL at the timeout: a process that started (when it should not have) may not stop on SIGTERM.
  spawnSync(process.execPath, ['dist/bin/latchkey.js', ...args], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL', env: { ...process.env, ...env } })
/** What a person reads: the process's own JSON log lines left out. */
const said = (stderr: string) =>
  stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('{'))
    .join('\n')

/** Exits 1 with `lines` (each a RegExp matched whole, in order), no stack trace. */
function refuses(t: Test, r: ReturnType<typeof latchkey>, lines: RegExp[], what: string): void {
  t.equal(r.status, 1, `${what}: exits 1`)
  const text = said(r.stderr)
  t.notMatch(text, /^\s+at /m, `${what}: no stack trace`)
  const got = text.split('\n')
  t.equal(got.length, lines.length, `${what}: ${lines.length} line(s): ${JSON.stringify(text)}`)
  lines.forEach((re, i) => t.match(got[i] ?? '', re, `${what}: line ${i + 1} names the setting and the file`))
}

/** check-config: invalid, with `problem` among the problems. */
function checkRefuses(t: Test, file: string, problem: RegExp, env: NodeJS.ProcessEnv = {}): void {
  const r = latchkey(['check-config', file], env)
  t.equal(r.status, 1, `check-config ${file}: invalid`)
  t.match(r.stderr, /invalid configuration:\n/, 'said as a configuration problem')
  t.match(r.stderr, problem, 'the problem named')
  t.notMatch(r.stderr, /^\s+at /m, 'no stack trace')
}

/** check-config: valid, with a warning naming the setting. */
function checkWarns(t: Test, file: string, warning: RegExp, env: NodeJS.ProcessEnv = {}): void {
  const r = latchkey(['check-config', file], env)
  t.equal(r.status, 0, `check-config ${file}: valid on this machine's terms`)
  t.match(r.stderr, warning, 'with a warning naming the setting and the file')
}

/** `s` exactly, as a whole line. */
const re = (s: string) => new RegExp(`^${s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`, 'm')

t.test('broker: key files, the policy file, TLS files and the registry, each named', async (t) => {
  const { publicKey } = await generateKeyPair('ES256')
  const jwks = join(dir, 'jwks.json')
  writeFileSync(jwks, JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: 'k1', alg: 'ES256' }] }))
  const registry = join(dir, 'agents.yaml')
  copyFileSync('deploy/examples/agents.yaml', registry)
  const badRegistry = join(dir, 'bad-agents.yaml')
  writeFileSync(badRegistry, 'version: 1\nagents:\n  demo:\n    env: dev\n    colour: blue\n')
  const garbage = join(dir, 'garbage.pem')
  writeFileSync(garbage, 'this is not PEM\n')
  const notJson = join(dir, 'not-json.json')
  writeFileSync(notJson, '{ keys: nope')
  const badPolicy = join(dir, 'bad-policy.yaml')
  writeFileSync(badPolicy, 'default: deny\nrules: [\n')
  const missing = (name: string) => join(dir, `missing-${name}`)
  const broker = (name: string, extra: Record<string, unknown>, listen: Record<string, unknown> = {}) =>
    writeYaml(join(dir, `${name}.yaml`), {
      version: 1,
      broker: {
        issuer: 'http://127.0.0.1:19701',
        listen: { host: '127.0.0.1', port: 19701, ...listen },
        keys: { dir: join(dir, `keys-${name}`) },
        registry_file: registry,
        store: { sqlite: { path: join(dir, `${name}.db`) } },
        attestors: { local: { keys_file: jwks } },
        ...extra,
      },
    })

  const localMissing = broker('local-missing', { attestors: { local: { keys_file: missing('keys.json') } } })
  refuses(t, latchkey(['broker', '-c', localMissing]), [re(`broker.attestors.local.keys_file ${missing('keys.json')}: cannot read (ENOENT)`)], 'local attestor keys_file missing')
  checkWarns(t, localMissing, re(`warning: broker.attestors.local.keys_file: ${missing('keys.json')}: cannot read (ENOENT) (the broker would not start on this machine)`))

  const usersMissing = broker('users-missing', { users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_file: missing('users.json') } })
  refuses(t, latchkey(['broker', '-c', usersMissing]), [re(`broker.users.jwks_file ${missing('users.json')}: cannot read (ENOENT)`)], 'users.jwks_file missing')
  checkWarns(t, usersMissing, /^warning: broker\.users\.jwks_file: .*missing-users\.json: cannot read \(ENOENT\)/m)

  const usersBad = broker('users-bad', { users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_file: notJson } })
  refuses(t, latchkey(['broker', '-c', usersBad]), [re(`broker.users.jwks_file ${notJson}: not valid JSON`)], 'users.jwks_file not JSON')
  checkRefuses(t, usersBad, re(`  broker.users.jwks_file: ${notJson}: not valid JSON`))

  const policyMissing = broker('policy-missing', { control: { host: '127.0.0.1', port: 19702, policy_file: missing('policy.yaml') } })
  refuses(t, latchkey(['broker', '-c', policyMissing]), [re(`broker.control.policy_file ${missing('policy.yaml')}: cannot read policy file: ENOENT`)], 'control.policy_file missing')
  checkWarns(t, policyMissing, /^warning: broker\.control\.policy_file: .*missing-policy\.yaml: cannot read \(ENOENT\)/m)

  const policyBad = broker('policy-bad', { control: { host: '127.0.0.1', port: 19702, policy_file: badPolicy } })
  refuses(t, latchkey(['broker', '-c', policyBad]), [/^broker\.control\.policy_file .*bad-policy\.yaml: policy bundle is not valid YAML\/JSON/], 'control.policy_file that does not compile')
  checkRefuses(t, policyBad, /^ {2}broker\.control\.policy_file: .*bad-policy\.yaml: policy bundle is not valid YAML\/JSON/m)

  const tlsGarbage = broker('tls-garbage', {}, { tls: { cert_file: garbage, key_file: garbage } })
  refuses(
    t,
    latchkey(['broker', '-c', tlsGarbage]),
    [re(`broker.listen.tls.cert_file ${garbage}: not a usable PEM certificate (no start line)`), /^broker\.listen\.tls\.key_file .*garbage\.pem: not a usable PEM private key/],
    'listen.tls not PEM',
  )
  checkRefuses(t, tlsGarbage, re(`  broker.listen.tls.cert_file: ${garbage}: not a usable PEM certificate (no start line)`))

  const registryBad = broker('registry-bad', { registry_file: badRegistry })
  refuses(t, latchkey(['broker', '-c', registryBad]), [/^broker\.registry_file .*bad-agents\.yaml: .*colour/], 'registry that does not validate')
  checkRefuses(t, registryBad, /^ {2}broker\.registry_file: .*bad-agents\.yaml: .*colour/m)
  const registryMissing = broker('registry-missing', { registry_file: missing('agents.yaml') })
  refuses(t, latchkey(['broker', '-c', registryMissing]), [/^broker\.registry_file .*missing-agents\.yaml: cannot read file: ENOENT$/], 'registry missing')
  checkWarns(t, registryMissing, /^warning: broker\.registry_file: .*missing-agents\.yaml: cannot read \(ENOENT\)/m)
})

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
  checkRefuses(t, controlPort, /sidecar\.control\.url: must be grpc:\/\/host:port with a port from 1 to 65535/)

  const collectorPort = base('collector-port', { audit: { collector: { address: '127.0.0.1:99999', sidecar_id: 's', token_secret: 'COL' } } })
  refuses(t, latchkey(['sidecar', '-c', collectorPort], env), [/invalid configuration:$/, re('  audit.collector.address: must be host:port with a port from 1 to 65535')], 'audit.collector.address port out of range')
  checkRefuses(t, collectorPort, /audit\.collector\.address: must be host:port with a port from 1 to 65535/)

  const samePort = base('same-port', {}, { admin: { port: 19711 } })
  refuses(t, latchkey(['sidecar', '-c', samePort]), [/invalid configuration:$/, re('  sidecar.admin.port: the same as sidecar.listen.port (19711): each listener needs its own port')], 'listen.port == admin.port')
  checkRefuses(t, samePort, /sidecar\.admin\.port: the same as sidecar\.listen\.port/)
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
    checkRefuses(t, config, new RegExp(`^  secrets\\.file: ${file.replace(/[.]/g, '\\.')}: ${why.source}`, 'm'))
  }
  const ctlChar = join(dir, 'secrets-control.yaml')
  writeFileSync(ctlChar, 'S: "a-secret-long\\u0001-enough"\n')
  const ctlConfig = base('secrets-control', { secrets: { file: ctlChar }, credentials: [{ id: 'c', audience: 'https://api.example', source: 'static', secret: 'S', inject: { type: 'bearer' } }] })
  refuses(t, latchkey(['sidecar', '-c', ctlConfig]), [/^credential "c": secret S cannot be sent in a header/], 'a control character in a header secret')
  checkRefuses(t, ctlConfig, /^ {2}credentials\[0\]\.secret: credential "c": secret S cannot be sent in a header/m)
  const unreadable = base('secrets-missing', { secrets: { file: join(dir, 'no-secrets.yaml') } })
  checkWarns(t, unreadable, /^warning: secrets\.file: .*no-secrets\.yaml: cannot read \(ENOENT\) \(the sidecar would not start on this machine\)$/m)

  const state = join(dir, 'corrupt-state.json')
  writeFileSync(state, '{"format": ')
  const corrupt = base('state', {}, { control: { url: 'grpc://127.0.0.1:19713', token_secret: 'CTL', state_file: state } })
  refuses(t, latchkey(['sidecar', '-c', corrupt], env), [/^sidecar\.control\.state_file .*corrupt-state\.json: not a usable revocation state file/], 'a corrupt state file')
  checkRefuses(t, corrupt, /^ {2}sidecar\.control\.state_file: .*corrupt-state\.json: not a usable revocation state file/m)

  const aFile = join(dir, 'a-file')
  writeFileSync(aFile, 'x')
  const spool = base('spool', { audit: { collector: { address: '127.0.0.1:19714', sidecar_id: 's', token_secret: 'COL', spool_dir: join(aFile, 'spool') } } })
  refuses(t, latchkey(['sidecar', '-c', spool], env), [re(`audit.collector.spool_dir ${join(aFile, 'spool')}: cannot use it as the audit spool (ENOTDIR: not a directory, mkdir '${join(aFile, 'spool')}')`)], 'a spool_dir under a file')
  checkWarns(t, spool, re(`warning: audit.collector.spool_dir: ${join(aFile, 'spool')}: ${aFile} is not a directory (the sidecar would not start on this machine)`))
  const spoolIsFile = base('spool-file', { audit: { collector: { address: '127.0.0.1:19714', sidecar_id: 's', token_secret: 'COL', spool_dir: aFile } } })
  refuses(t, latchkey(['sidecar', '-c', spoolIsFile], env), [/^audit\.collector\.spool_dir .*a-file: cannot use it as the audit spool \(EEXIST/], 'a spool_dir that is a file')
  checkWarns(t, spoolIsFile, re(`warning: audit.collector.spool_dir: ${aFile}: is not a directory (the sidecar would not start on this machine)`))
})

t.test('a sync that fails at shutdown is one line naming audit.jsonl.path', async (t) => {
  const config = writeYaml(join(dir, 's-dev-full.yaml'), { version: 1, sidecar: { listen: { port: 19721 }, admin: { port: 19722 } }, audit: { jsonl: { path: '/dev/full' } } })
  const proc = spawn(process.execPath, ['dist/bin/latchkey.js', 'sidecar', '-c', config], { stdio: ['ignore', 'pipe', 'pipe'] })
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

t.test('collector: TLS files, a store that is not a database, a directory that is not there, a PostgreSQL URL that does not parse', async (t) => {
  const collector = (name: string, grpc: Record<string, unknown>, store: Record<string, unknown>) =>
    writeYaml(join(dir, `c-${name}.yaml`), {
      version: 1,
      collector: { grpc: { host: '127.0.0.1', port: 19731, ...grpc }, http: { host: '127.0.0.1', port: 19732 }, store, sidecars: [{ id: 's', token_sha256: '0'.repeat(64) }] },
    })
  const sqlite = (name: string) => ({ kind: 'sqlite', path: join(dir, `${name}.db`) })
  const ca = join(dir, 'missing-ca.pem')
  const tls = collector('tls-missing', { tls: { cert_file: join(dir, 'missing-cert.pem'), key_file: join(dir, 'missing-key.pem'), client_ca_file: ca } }, sqlite('tls'))
  refuses(
    t,
    latchkey(['collector', '-c', tls]),
    [/^collector\.grpc\.tls\.cert_file .*missing-cert\.pem: cannot read \(ENOENT\)$/, /^collector\.grpc\.tls\.key_file .*missing-key\.pem: cannot read \(ENOENT\)$/, re(`collector.grpc.tls.client_ca_file ${ca}: cannot read (ENOENT)`)],
    'TLS files missing',
  )
  checkWarns(t, tls, re(`warning: collector.grpc.tls.client_ca_file: ${ca}: cannot read (ENOENT) (the collector would not start on this machine)`))

  const notDb = join(dir, 'not-a-db.db')
  writeFileSync(notDb, 'this is not a SQLite database, and it is longer than its header\n')
  const store = collector('not-db', {}, { kind: 'sqlite', path: notDb })
  refuses(t, latchkey(['collector', '-c', store]), [re(`collector.store: cannot open the store at ${notDb}: file is not a database`)], 'a store file that is not a database')
  checkRefuses(t, store, re(`  collector.store.path: ${notDb}: not a SQLite database`))

  const nowhere = join(dir, 'no-such-dir', 'audit.db')
  const noDir = collector('no-dir', {}, { kind: 'sqlite', path: nowhere })
  refuses(t, latchkey(['collector', '-c', noDir]), [new RegExp(`^collector\\.store: cannot open the store at ${nowhere.replace(/[.]/g, '\\.')}: `)], 'a store in a directory that is not there')
  checkWarns(t, noDir, /^warning: collector\.store\.path: .*audit\.db: its directory .*no-such-dir does not exist \(the collector would not start on this machine\)$/m)

  const badUrl = collector('bad-url', {}, { kind: 'postgres', url: 'postgres://u@[::1/db' })
  refuses(t, latchkey(['collector', '-c', badUrl]), [/invalid configuration:$/, re('  collector.store.url: not a URL (postgres://user@host:port/database expected)')], 'a PostgreSQL URL that does not parse')
  checkRefuses(t, badUrl, /collector\.store\.url: not a URL/)
  const notPostgres = collector('not-postgres', {}, { kind: 'postgres', url: 'mysql://db/x' })
  checkRefuses(t, notPostgres, /collector\.store\.url: must match pattern "\^postgres\(ql\)\?:\/\/"/)
})

t.test('check-config reads its file once: a pipe, /dev/stdin and <(…) work', async (t) => {
  for (const [file, what] of [
    ['deploy/examples/up.yaml', /^\/dev\/stdin: valid \(version 1/],
    ['deploy/examples/collector.yaml', /^\/dev\/stdin: valid collector config/],
    ['deploy/examples/agents.yaml', /^\/dev\/stdin: valid agent registry/],
  ] as const) {
    const r = spawnSync('bash', ['-c', `cat ${file} | ${process.execPath} dist/bin/latchkey.js check-config /dev/stdin`], { encoding: 'utf8', timeout: 20_000 })
    t.equal(r.status, 0, `${file} through a pipe: ${r.stderr}`)
    t.match(r.stdout, what)
  }
  const sub = spawnSync('bash', ['-c', `${process.execPath} dist/bin/latchkey.js check-config <(cat deploy/examples/collector.yaml)`], { encoding: 'utf8', timeout: 20_000 })
  t.equal(sub.status, 0, `process substitution: ${sub.stderr}`)
  t.match(sub.stdout, /^\/dev\/fd\/\d+: valid collector config/)
})

t.test('an override that misspells a nested key is named as the culprit', async (t) => {
  const problems = (env: NodeJS.ProcessEnv, text = 'version: 1\n') => {
    try {
      parseConfig(text, 'x.yaml', env)
      return []
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err
      return err.problems.map((p) => `${p.path}: ${p.message}`)
    }
  }
  t.same(problems({ LATCHKEY__SIDECAR__LISTENN__PORT: '1' }), ['sidecar.listenn: unknown key (set by LATCHKEY__SIDECAR__LISTENN__PORT)'])
  t.same(problems({ LATCHKEY__SIDECARR__LISTEN__PORT: '1' }), ['sidecarr: unknown key (set by LATCHKEY__SIDECARR__LISTEN__PORT)'])
  t.same(problems({ LATCHKEY__SIDECAR__LISTEN__PROT: '1' }), ['sidecar.listen.prot: unknown key (set by LATCHKEY__SIDECAR__LISTEN__PROT)'])
  // A key the file has is not the override's to answer for when the problem is elsewhere in it.
  t.same(problems({ LATCHKEY__SIDECAR__LISTEN__PORT: '16001' }, 'version: 1\nsidecar: { listen: { hots: x } }\n'), ['sidecar.listen.hots: unknown key'])
  const r = latchkey(['check-config', 'deploy/examples/up.yaml'], { LATCHKEY__SIDECAR__LISTENN__PORT: '1' })
  t.equal(r.status, 1)
  t.match(r.stderr, /^ {2}sidecar\.listenn: unknown key \(set by LATCHKEY__SIDECAR__LISTENN__PORT\)$/m)
})
