// Start-up errors of `latchkey collector`; check-config reading its file once; an override naming
// a nested key that is not there (see helpers.ts).
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { writeYaml } from '../collector/process-helpers.js'
import { parseConfig, ConfigError } from '../../lib/config/load.js'
import { dir, latchkey, refuses, checkRefuses, checkWarns, re } from './helpers.js'
import { CLI } from '../helpers/cli.js'

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
  await checkWarns(t, tls, re(`warning: collector.grpc.tls.client_ca_file: ${ca}: cannot read (ENOENT) (the collector would not start on this machine)`))

  const notDb = join(dir, 'not-a-db.db')
  writeFileSync(notDb, 'this is not a SQLite database, and it is longer than its header\n')
  const store = collector('not-db', {}, { kind: 'sqlite', path: notDb })
  refuses(t, latchkey(['collector', '-c', store]), [re(`collector.store: cannot open the store at ${notDb}: file is not a database`)], 'a store file that is not a database')
  await checkRefuses(t, store, re(`  collector.store.path: ${notDb}: not a SQLite database`))

  const nowhere = join(dir, 'no-such-dir', 'audit.db')
  const noDir = collector('no-dir', {}, { kind: 'sqlite', path: nowhere })
  refuses(t, latchkey(['collector', '-c', noDir]), [new RegExp(`^collector\\.store: cannot open the store at ${nowhere.replace(/[.]/g, '\\.')}: `)], 'a store in a directory that is not there')
  await checkWarns(t, noDir, /^warning: collector\.store\.path: .*audit\.db: its directory .*no-such-dir does not exist \(the collector would not start on this machine\)$/m)

  const badUrl = collector('bad-url', {}, { kind: 'postgres', url: 'postgres://u@[::1/db' })
  refuses(t, latchkey(['collector', '-c', badUrl]), [/invalid configuration:$/, re('  collector.store.url: not a URL (postgres://user@host:port/database expected)')], 'a PostgreSQL URL that does not parse')
  await checkRefuses(t, badUrl, /collector\.store\.url: not a URL/)
  const notPostgres = collector('not-postgres', {}, { kind: 'postgres', url: 'mysql://db/x' })
  await checkRefuses(t, notPostgres, /collector\.store\.url: must match pattern "\^postgres\(ql\)\?:\/\/"/)
})

t.test('check-config reads its file once: a pipe, /dev/stdin and <(…) work', async (t) => {
  for (const [file, what] of [
    ['deploy/examples/up.yaml', /^\/dev\/stdin: valid \(version 1/],
    ['deploy/examples/collector.yaml', /^\/dev\/stdin: valid collector config/],
    ['deploy/examples/agents.yaml', /^\/dev\/stdin: valid agent registry/],
  ] as const) {
    const r = spawnSync('bash', ['-c', `cat ${file} | ${process.execPath} ${CLI} check-config /dev/stdin`], { encoding: 'utf8', timeout: 20_000 })
    t.equal(r.status, 0, `${file} through a pipe: ${r.stderr}`)
    t.match(r.stdout, what)
  }
  const sub = spawnSync('bash', ['-c', `${process.execPath} ${CLI} check-config <(cat deploy/examples/collector.yaml)`], { encoding: 'utf8', timeout: 20_000 })
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
