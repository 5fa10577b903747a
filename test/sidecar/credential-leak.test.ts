// A credential goes to its exact origin and nowhere else: not to a look-alike host, another
// port, the other scheme, a redirect target, an error body, a log line or an audit event.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

const run = promisify(execFile)

t.test('credential leak table', async (t) => {
  const api = await startUpstream({
    handler: (req, res) => {
      if (req.url.startsWith('/redirect')) {
        res.writeHead(302, { location: `http://localhost:${other.port}/steal` }).end()
        return true
      }
      return false
    },
  })
  const other = await startUpstream()
  const tls = await startUpstream({ tls: true })
  const closedPort = await (async () => {
    const u = await startUpstream()
    await u.close()
    return u.port
  })()
  const ports = [api.port, other.port, tls.port, closedPort]
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'loop', action: 'allow', hosts: ['127.0.0.1', 'localhost'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports }] },
    credentials: [
      { id: 'api', audience: api.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
      { id: 'tls', audience: `https://localhost:${tls.port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
      { id: 'down', audience: `http://127.0.0.1:${closedPort}`, source: 'static', secret: 'CANARY', inject: { type: 'query', name: 'key' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await api.close()
    await other.close()
    await tls.close()
  })
  const bodies: string[] = []
  const get = async (url: string, extra = '') => {
    const r = await rawRequest(s.sidecar.port, `GET ${url} HTTP/1.1\r\nHost: x\r\n${extra}Connection: close\r\n\r\n`)
    bodies.push(r.raw)
    return r
  }

  await t.test('look-alike host for the same address gets nothing', async (t) => {
    await get(`http://localhost:${api.port}/lookalike`)
    t.equal(api.requests.at(-1)?.url, '/lookalike')
    t.equal(api.requests.at(-1)?.headers.authorization, undefined)
  })
  await t.test('another port gets nothing', async (t) => {
    await get(`http://127.0.0.1:${other.port}/port`)
    t.equal(other.requests.at(-1)?.headers.authorization, undefined)
  })
  await t.test('the other scheme gets nothing', async (t) => {
    const r = await get(`http://localhost:${tls.port}/scheme`)
    t.equal(r.status, 502, 'plain HTTP to a TLS port fails upstream')
    t.equal(tls.requests.length, 0)
    const audit = await s.audit()
    t.equal(audit.at(-1)?.credential, null, 'no credential was attached to the plain-HTTP call')
  })
  await t.test('redirects are returned, never followed, and the next hop is judged afresh', async (t) => {
    const r = await get(`http://127.0.0.1:${api.port}/redirect`)
    t.equal(r.status, 302)
    t.equal(r.headers.location, `http://localhost:${other.port}/steal`)
    t.equal(other.requests.filter((q) => q.url === '/steal').length, 0, 'the sidecar did not follow')
    const followed = await run('curl', ['-sS', '-L', '-o', '/dev/null', '-w', '%{http_code}', '-x', s.proxy, `http://127.0.0.1:${api.port}/redirect`])
    t.equal(followed.stdout, '200')
    const stolen = other.requests.filter((q) => q.url === '/steal')
    t.equal(stolen.length, 1, 'the agent followed it itself')
    t.equal(stolen[0]!.headers.authorization, undefined, 'and the redirect target got no credential')
  })
  await t.test('agent-sent query parameters named like the injected one are removed', async (t) => {
    const down = await get(`http://127.0.0.1:${closedPort}/q?key=agent&%6Bey=sneaky&a=1`)
    t.equal(down.status, 502)
    t.equal(down.headers['x-latchkey-error'], 'LK_UPSTREAM_UNREACHABLE')
    t.notMatch(down.body, /key=/, 'the error names no URL')
  })
  await t.test('a failing upstream leaks nothing in the error', async (t) => {
    const r = await get(`http://127.0.0.1:${closedPort}/x`)
    t.equal(r.status, 502)
    t.same(Object.keys(JSON.parse(r.body)).sort(), ['code', 'error', 'reason', 'retryable', 'rule'])
  })
  assertNoCanary(t, s, ...bodies)
})

t.test('the query injector writes exactly one parameter', async (t) => {
  const api = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [api.port] }] },
    credentials: [{ id: 'q', audience: api.origin, source: 'static', secret: 'CANARY', inject: { type: 'query', name: 'key' } }],
  })
  t.teardown(async () => {
    await s.close()
    await api.close()
  })
  const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${api.port}/q?key=agent&%6Bey=sneaky&a=1&key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(r.status, 200)
  const url = new URL(api.requests[0]!.url, 'http://x')
  t.same(url.searchParams.getAll('key'), [CANARY])
  t.equal(url.searchParams.get('a'), '1')
  t.equal([...url.searchParams.keys()].length, 2)
  const audit = await s.audit()
  t.equal(audit[0]?.path, '/q', 'the audited path carries no query, so no query credential')
  assertNoCanary(t, s, r.raw)
})
