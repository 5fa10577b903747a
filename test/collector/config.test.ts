// The collector's config file: the example validates, and every mistake is named by its path.
import t from 'tap'
import { loadCollectorConfig, parseCollectorConfig, validateCollectorConfig } from '../../collector/config.js'
import { envOverrides } from '../../lib/config/load.js'

const hash = 'a'.repeat(64)

t.test('the example config is valid and gets its defaults', async (t) => {
  const c = loadCollectorConfig('deploy/examples/collector.yaml')
  t.same(c.collector.store, { kind: 'sqlite', path: 'latchkey-audit.db' })
  t.same(c.collector.grpc, { host: '127.0.0.1', port: 15100, max_batch_bytes: 8 * 1024 * 1024, max_clock_skew_ms: 300_000, tls: null, insecure_plaintext: false })
  t.equal(c.collector.nats, null)
  const pg = validateCollectorConfig({ version: 1, collector: { store: { kind: 'postgres', url: 'postgres://x@h/db' }, sidecars: [] } })
  t.same(pg.collector.store, { kind: 'postgres', url: 'postgres://x@h/db', schema: 'latchkey', pool_size: 4, migrate: true })
  t.same(pg.collector.http, { host: '127.0.0.1', port: 15101 })
  t.same(validateCollectorConfig({ version: 1, collector: { sidecars: [] } }).collector.store, { kind: 'sqlite', path: 'latchkey-audit.db' })
})

t.test('mistakes are named by path', async (t) => {
  const bad = (collector: Record<string, unknown>) => () => validateCollectorConfig({ version: 1, collector }, 'c.yaml')
  t.throws(bad({ sidecars: [], bogus: 1 }), { code: 'LK_CONFIG_INVALID', message: /collector\.bogus: unknown key/ })
  t.throws(bad({ sidecars: [{ id: 's', token_sha256: 'my-plain-token' }] }), { message: /collector\.sidecars\[0\]\.token_sha256: must be the hex SHA-256 of the token/ })
  t.throws(bad({ sidecars: [{ id: 's', token_sha256: hash }, { id: 's', token_sha256: hash }] }), { message: /collector\.sidecars\[1\]\.id: duplicate sidecar id "s"/ })
  t.throws(bad({ sidecars: [], store: { kind: 'postgres' } }), { message: /collector\.store: missing required key "url"/ })
  t.throws(bad({}), { message: /collector: missing required key "sidecars"/ })
  // Less than an event may be (256 KiB): the sidecar cannot send one such event in a batch the collector takes.
  t.throws(bad({ sidecars: [], grpc: { max_batch_bytes: 256 * 1024 } }), { code: 'LK_CONFIG_INVALID', message: /collector\.grpc\.max_batch_bytes/ })
  t.doesNotThrow(bad({ sidecars: [], grpc: { max_batch_bytes: 1024 * 1024 } }), '1 MiB is taken: the sidecar sends smaller batches to it')
  t.doesNotThrow(bad({ sidecars: [], grpc: { max_batch_bytes: 64 * 1024 * 1024 }, store: { kind: 'postgres', url: 'postgres://h/db', pool_size: 100 } }), 'the largest of each is taken')
  t.throws(() => loadCollectorConfig('/nonexistent/collector.yaml'), { message: /cannot read file: ENOENT/ })
})

t.test('a batch size or pool past what it sizes is refused, by check-config and the collector alike, naming the setting', async (t) => {
  const { spawnSync } = await import('node:child_process')
  const { mkdtempSync, writeFileSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const { join } = await import('node:path')
  const { CLI } = await import('../helpers/cli.js')
  const file = join(mkdtempSync(join(tmpdir(), 'lk-collector-cfg-')), 'c.yaml')
  // Above a sidecar's largest message (2 MiB) 32 times over; a pool past PostgreSQL's default max_connections.
  writeFileSync(file, `version: 1\ncollector:\n  grpc: { port: 0, max_batch_bytes: ${64 * 1024 * 1024 + 1} }\n  http: null\n  store: { kind: postgres, url: "postgres://127.0.0.1:1/none", pool_size: 101 }\n  sidecars: []\n`)
  const said = `${file}: invalid configuration:\n  collector.grpc.max_batch_bytes: must be <= 67108864\n  collector.store.pool_size: must be <= 100`
  for (const command of [['check-config', file], ['collector', '-c', file]]) {
    const r = spawnSync(process.execPath, [CLI, ...command], { encoding: 'utf8', timeout: 20_000 })
    t.same([r.status, r.stderr.trim()], [1, said], `${command[0]} refuses it`)
  }
})

t.test("a store mistake is judged by the branch its kind names: one line, not every branch's complaint", async (t) => {
  const said = (store: Record<string, unknown>) => {
    try {
      validateCollectorConfig({ version: 1, collector: { sidecars: [], store } }, 'c.yaml')
    } catch (err) {
      return (err as { problems: { path: string; message: string }[] }).problems.map((p) => `${p.path}: ${p.message}`)
    }
    return []
  }
  t.same(said({ kind: 'sqlite', path: 'x.db', pool_size: 4 }), ['collector.store.pool_size: unknown key'], "a postgres key under sqlite: that, not postgres's missing url")
  t.same(said({ kind: 'postgres', url: 'postgres://h/db', path: 'x.db', pool_size: 0 }), ['collector.store.path: unknown key', 'collector.store.pool_size: must be >= 1'])
  t.same(said({ kind: 'mongo', path: 'x.db' }), ['collector.store.kind: must be one of "sqlite", "postgres"'], 'an unknown kind names the kinds')
  t.same(said({ path: 'x.db' }), ['collector.store: missing required key "kind"'])
  t.same(said({ kind: 'sqlite', path: 'x.db' }), [])
})

t.test('LATCHKEY__COLLECTOR__… overrides the collector config as LATCHKEY__SIDECAR__… does the sidecar\'s, a problem named by its variable', async (t) => {
  const file = 'version: 1\ncollector: { sidecars: [], grpc: { port: 15100 } }\n'
  const said = (env: NodeJS.ProcessEnv) => {
    try {
      parseCollectorConfig(file, 'c.yaml', env)
    } catch (err) {
      return (err as { problems: { path: string; message: string }[] }).problems.map((p) => `${p.path}: ${p.message}`)
    }
    return []
  }
  t.same(said({ LATCHKEY__COLLECTOR__GRPC__PORT: 'abc' }), ['collector.grpc.port: must be integer (set by LATCHKEY__COLLECTOR__GRPC__PORT)'])
  t.same(said({ LATCHKEY__COLLECTOR__GRPC__PROT: '1' }), ['collector.grpc.prot: unknown key (set by LATCHKEY__COLLECTOR__GRPC__PROT)'])
  t.same(said({ LATCHKEY__COLLECTOR__STORE__KIND: 'mongo' }), ['collector.store.kind: must be one of "sqlite", "postgres" (set by LATCHKEY__COLLECTOR__STORE__KIND)'])
  // Set before the defaults are: a store the file does not have is the variables' to complete.
  t.same(said({ LATCHKEY__COLLECTOR__STORE__PATH: '/var/lib/a.db' }), ['collector.store: missing required key "kind" (set by LATCHKEY__COLLECTOR__STORE__PATH)'])
  const c = parseCollectorConfig(file, 'c.yaml', { LATCHKEY__COLLECTOR__GRPC__PORT: '16100', LATCHKEY__COLLECTOR__STORE__KIND: 'sqlite', LATCHKEY__COLLECTOR__STORE__PATH: '/var/lib/a.db' })
  t.same([c.collector.grpc.port, c.collector.store], [16100, { kind: 'sqlite', path: '/var/lib/a.db' }])
  t.same(envOverrides(c), ['LATCHKEY__COLLECTOR__GRPC__PORT (collector.grpc.port)', 'LATCHKEY__COLLECTOR__STORE__KIND (collector.store.kind)', 'LATCHKEY__COLLECTOR__STORE__PATH (collector.store.path)'], 'what the environment set is said')
  const { spawnSync } = await import('node:child_process')
  const { CLI } = await import('../helpers/cli.js')
  const r = spawnSync(process.execPath, [CLI, 'check-config', 'deploy/examples/collector.yaml'], { encoding: 'utf8', env: { ...process.env, LATCHKEY__COLLECTOR__GRPC__PORT: 'abc' } })
  t.same([r.status, r.stderr.trim()], [1, 'deploy/examples/collector.yaml: invalid configuration:\n  collector.grpc.port: must be integer (set by LATCHKEY__COLLECTOR__GRPC__PORT)'], 'check-config judges it')
  const ok = spawnSync(process.execPath, [CLI, 'check-config', 'deploy/examples/collector.yaml'], { encoding: 'utf8', env: { ...process.env, LATCHKEY__COLLECTOR__GRPC__PORT: '16100' } })
  t.same([ok.status, ok.stderr.trim()], [0, 'note: set by the environment, not the file: LATCHKEY__COLLECTOR__GRPC__PORT (collector.grpc.port)'], 'and says what the environment set')
})

t.test('a query API open to the network needs reader tokens', async (t) => {
  const http = (h: Record<string, unknown>) => () => validateCollectorConfig({ version: 1, collector: { sidecars: [], http: { port: 0, ...h } } }, 'c.yaml')
  for (const host of ['0.0.0.0', '::', '10.1.2.3', 'collector.internal']) {
    t.throws(http({ host }), { code: 'LK_CONFIG_INVALID', problems: [{ path: 'collector.http.host', message: `${JSON.stringify(host)} is not a loopback address: set collector.http.reader_tokens_sha256, or anyone who reaches the port reads every agent's audit trail` }] }, host)
    t.throws(http({ host, reader_tokens_sha256: [] }), { code: 'LK_CONFIG_INVALID' }, `${host}: an empty token list opens it too`)
    t.doesNotThrow(http({ host, reader_tokens_sha256: [hash] }), `${host} with a reader token`)
  }
  for (const host of ['127.0.0.1', '::1', 'localhost', '127.0.0.2']) t.doesNotThrow(http({ host }), `${host} is loopback`)
})

t.test('an ingest listener open to the network needs TLS, or says insecure_plaintext', async (t) => {
  const grpc = (g: Record<string, unknown>) => () => validateCollectorConfig({ version: 1, collector: { sidecars: [], grpc: { port: 0, ...g } } }, 'c.yaml')
  const tls = { cert_file: '/c.pem', key_file: '/k.pem', client_ca_file: '/ca.pem' }
  for (const host of ['0.0.0.0', '::', '10.1.2.3', 'collector.internal']) {
    t.throws(grpc({ host }), { code: 'LK_CONFIG_INVALID', problems: [{ path: 'collector.grpc.tls', message: new RegExp(`^required off loopback \\(${host.replace(/\./g, '\\.')}\\): .*insecure_plaintext: true`) }] }, host)
    t.doesNotThrow(grpc({ host, tls }), `${host} with tls`)
    t.doesNotThrow(grpc({ host, insecure_plaintext: true }), `${host} said plaintext by name`)
  }
  t.throws(grpc({ host: '0.0.0.0', tls, insecure_plaintext: true }), { code: 'LK_CONFIG_INVALID', problems: [{ path: 'collector.grpc.insecure_plaintext' }] }, 'both: a contradiction')
  for (const host of ['127.0.0.1', '::1', 'localhost']) t.doesNotThrow(grpc({ host }), `${host} is loopback`)
})

t.test("a YAML problem in the collector's config is said as in the sidecar's: a duplicated key named", async (t) => {
  const said = (text: string) => {
    try {
      parseCollectorConfig(text, 'c.yaml', {})
    } catch (err) {
      return (err as { problems: { path: string; message: string }[] }).problems.map((p) => `${p.path}: ${p.message}`)
    }
    return []
  }
  t.same(said('version: 1\ncollector:\n  sidecars: []\n  sidecars: []\n'), ['line 4: duplicate key "sidecars"'])
  t.same(said('version: 1\n---\nversion: 1\n'), ['line 2: a config file holds one YAML document; remove the second (after ---)'])
})
