// sidecar.upstream_ca_file adds CAs for the sidecar's own TLS clients: checked at start (and by
// check-config) so a wrong file is named instead of every call failing 502; Node's other trust
// (NODE_EXTRA_CA_CERTS) stays; and the broker and an OAuth token_url are verified with it too.
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client } from 'undici'
import { startChild, writeYaml } from '../collector/process-helpers.js'
import { startUpstream, startTestSidecar, loopbackPolicy, assertNoCanary } from '../helpers/harness.js'
import { testPki } from '../helpers/tls.js'
import type { WorkloadEvidence } from '../../proxy/attest/evidence.js'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { AGENT } from '../helpers/tokens.js'
import { CLI } from '../helpers/cli.js'
import { checkConfig } from '../../cli/check-config.js'

const latchkey = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, ...env } })
/** `latchkey check-config <file>` in-process: the code it exits with and its stderr (config.test runs the command itself; a start is ~0.3 s of CPU). */
const checkConfigOf = async (file: string) => {
  const { code, stderr } = await checkConfig(file, process.env)
  return { status: code, stderr }
}

t.test('a CA file that is missing, not PEM, or a key: check-config names it, the sidecar refuses to start in one line', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ca-'))
  const pki = testPki()
  const key = pki.key
  const files = {
    missing: join(dir, 'missing.pem'),
    garbage: join(dir, 'garbage.pem'),
    key: join(dir, 'key.pem'),
    broken: join(dir, 'broken.pem'),
    unended: join(dir, 'unended.pem'),
  }
  writeFileSync(files.garbage, 'this is not a certificate\n')
  writeFileSync(files.key, key)
  writeFileSync(files.broken, '-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n')
  writeFileSync(files.unended, pki.ca + '-----BEGIN CERTIFICATE-----\nMIIB\n')
  const config = (name: string, extra: Record<string, unknown>) =>
    writeYaml(join(dir, `${name}.yaml`), { version: 1, sidecar: { listen: { port: 0 }, admin: { port: 0 }, ...extra }, audit: { jsonl: { path: join(dir, 'a.jsonl') } } })

  // Missing here: said, not held against the config (as a missing policy file is); start-up names it.
  const missing = config('missing', { upstream_ca_file: files.missing })
  const checkMissing = await checkConfigOf(missing)
  t.equal(checkMissing.status, 0)
  t.match(checkMissing.stderr, `warning: sidecar.upstream_ca_file: ${files.missing}: cannot read (ENOENT) (the sidecar would not start on this machine)`)
  const startMissing = latchkey(['sidecar', '--config', missing])
  t.same([startMissing.status, startMissing.stderr.trim()], [1, `sidecar.upstream_ca_file ${files.missing}: cannot read (ENOENT)`], 'one line, no stack trace')

  for (const [name, why] of [
    ['garbage', 'holds no PEM certificate (-----BEGIN CERTIFICATE-----)'],
    ['key', 'block 1 is a PRIVATE KEY, not a CERTIFICATE (a CA file holds certificates only)'],
    ['broken', 'certificate 1 cannot be parsed'],
    ['unended', 'holds a PEM block that does not end'],
  ] as const) {
    const file = config(name, { upstream_ca_file: files[name] })
    const check = await checkConfigOf(file)
    t.same([check.status, check.stderr.trim()], [1, `${file}: invalid configuration:\n  sidecar.upstream_ca_file: ${files[name]}: ${why}`], `${name}: check-config calls the config invalid`)
    const start = latchkey(['sidecar', '--config', file])
    t.same([start.status, start.stderr.trim()], [1, `sidecar.upstream_ca_file ${files[name]}: ${why}`], `${name}: the sidecar does not start`)
    t.notMatch(check.stderr + start.stderr, key.split('\n')[1]!, "the file's content is never echoed")
  }

  // The collector's CA file is checked the same way (grpc took garbage and failed every send).
  const collector = writeYaml(join(dir, 'collector.yaml'), {
    version: 1,
    sidecar: { listen: { port: 0 }, admin: { port: 0 } },
    audit: { collector: { address: '127.0.0.1:1', sidecar_id: 's', spool_dir: join(dir, 'spool'), tls: { ca_file: files.garbage, cert_file: join(pki.dir, 'leaf.pem'), key_file: join(pki.dir, 'leaf.key') } } },
  })
  const checkCollector = await checkConfigOf(collector)
  t.same([checkCollector.status, checkCollector.stderr.trim()], [1, `${collector}: invalid configuration:\n  audit.collector.tls.ca_file: ${files.garbage}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)`])
  const startCollector = latchkey(['sidecar', '--config', collector])
  t.same([startCollector.status, startCollector.stderr.trim()], [1, `audit.collector.tls.ca_file ${files.garbage}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)`])
  // Its certificate and key, missing here, are said as other missing files are.
  const collectorKeyGone = writeYaml(join(dir, 'collector-key.yaml'), {
    version: 1,
    sidecar: { listen: { port: 0 }, admin: { port: 0 } },
    audit: { collector: { address: '127.0.0.1:1', sidecar_id: 's', spool_dir: join(dir, 'spool'), tls: { ca_file: pki.caFile, cert_file: join(pki.dir, 'leaf.pem'), key_file: files.missing } } },
  })
  const checkKeyGone = await checkConfigOf(collectorKeyGone)
  t.same([checkKeyGone.status, checkKeyGone.stderr.trim()], [0, `warning: audit.collector.tls.key_file: ${files.missing}: cannot read (ENOENT) (the sidecar would not start on this machine)`])

  // A bundle with comments between its certificates, one of them in OpenSSL's trusted form (Node takes both).
  const bundle = join(dir, 'bundle.pem')
  const trusted = execFileSync('openssl', ['x509', '-in', pki.caFile, '-trustout', '-addtrust', 'serverAuth'], { encoding: 'utf8' })
  writeFileSync(bundle, `# internal CA\n${pki.ca}\n# the same, with trust settings\n${trusted}`)
  for (const file of [pki.caFile, bundle]) {
    const checkGood = await checkConfigOf(config('good', { upstream_ca_file: file }))
    t.same([checkGood.status, checkGood.stderr], [0, ''], 'a real CA file is valid and not warned about')
  }
})

t.test("upstream_ca_file adds to Node's trust: CAs from NODE_EXTRA_CA_CERTS stay", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ca-'))
  const internal = testPki() // given as upstream_ca_file
  const extra = testPki('latchkey extra CA') // given to Node as NODE_EXTRA_CA_CERTS
  const byInternal = await startUpstream({ tls: true })
  const byExtra = await startUpstream({ tls: true, pki: extra })
  t.teardown(async () => {
    await byInternal.close()
    await byExtra.close()
  })
  const file = writeYaml(join(dir, 'c.yaml'), {
    version: 1,
    sidecar: { listen: { port: 0 }, admin: { port: 0 }, upstream_ca_file: internal.caFile },
    ...loopbackPolicy([byInternal.port, byExtra.port]),
    routes: { internal: `https://localhost:${byInternal.port}`, extra: `https://localhost:${byExtra.port}` },
    audit: { jsonl: { path: join(dir, 'a.jsonl') } },
  })
  const child = await startChild(['sidecar', '--config', file], /sidecar listening/, { NODE_EXTRA_CA_CERTS: extra.caFile })
  t.teardown(() => child.kill('SIGTERM'))
  const port = Number(/"port":(\d+)/.exec(child.output())![1])
  const c = new Client(`http://127.0.0.1:${port}`)
  t.teardown(() => c.close())
  for (const route of ['internal', 'extra']) {
    const res = await c.request({ method: 'GET', path: `/${route}/x` })
    t.same([res.statusCode, await res.body.text()], [200, 'ok'], `${route}: verified and answered`)
  }
})

t.test("the broker and an OAuth token_url on an internal CA are verified with upstream_ca_file's CAs", async (t) => {
  // An HTTPS authorization server and an HTTPS broker whose certificates only the test CA vouches for.
  const as = await startUpstream({
    tls: true,
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ access_token: 'cc-token', token_type: 'Bearer', expires_in: 600 }))
      return true
    },
  })
  const broker = await startUpstream({
    tls: true,
    handler: (_req, res) => {
      res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'invalid_target', error_description: 'no such audience' }))
      return true
    },
  })
  const up = await startUpstream()
  t.teardown(async () => {
    await up.close()
    await as.close()
    await broker.close()
  })
  const evidence: WorkloadEvidence = { kind: 'local', tokenType: TOKEN_TYPES.jwt, get: async () => 'evidence', close: () => {} }
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([up.port]),
      sidecar: { agent_id: AGENT, upstream_ca_file: testPki().caFile, broker: { url: `https://localhost:${broker.port}` }, attestation: { local: { key_file: '/replaced/by/the/evidence/below' } } },
      routes: { cc: up.origin, brokered: `http://localhost:${up.port}` },
      credentials: [
        { id: 'cc', audience: up.origin, source: 'client_credentials', oauth: { token_url: `https://localhost:${as.port}/token`, client_id: 'c', client_secret: 'CANARY' }, inject: { type: 'bearer' } },
        { id: 'brokered', audience: `http://localhost:${up.port}`, source: 'broker', inject: { type: 'bearer' } },
      ],
    },
    {},
    { evidence },
  )
  t.teardown(() => s.close())
  const c = new Client(s.proxy)
  t.teardown(() => c.close())
  const cc = await c.request({ method: 'GET', path: '/cc/x' })
  t.same([cc.statusCode, await cc.body.text()], [200, 'ok'])
  t.equal(up.requests[0]?.headers.authorization, 'Bearer cc-token', "the token_url's token, fetched over verified TLS")

  const task = s.sidecar.tasks.open({ purpose: 'p', durationS: 60 })
  const brokered = await c.request({ method: 'GET', path: '/brokered/x', headers: { 'proxy-authorization': `Basic ${Buffer.from(`task:${task.handle}`).toString('base64')}` } })
  const body = (await brokered.body.json()) as { code: string; reason: string }
  t.equal(broker.requests.length, 1, 'the exchange reached the broker (its certificate was accepted)')
  t.match([brokered.statusCode, body.code], [403, 'LK_CREDENTIAL_REFUSED'], "and the broker's own answer came back")
  t.notMatch(body.reason, /UNABLE_TO_VERIFY|unreachable/)
  assertNoCanary(t, s, JSON.stringify(body))
})
