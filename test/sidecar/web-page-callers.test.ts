// Reverse routes and the admin API inject credentials and open tasks for whoever addresses the
// sidecar itself, so a web page must not: neither by DNS rebinding (its own name pointed at
// 127.0.0.1, which the Host header still carries) nor by cross-site requests (which a browser
// marks with Origin or Sec-Fetch-Site). Local programs, addressing it by IP or localhost, pass.
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startBearerRig, startTestSidecar, loopbackPolicy, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

t.test('a web page cannot drive reverse routes or the admin API', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: (up) => ({ routes: { api: up.origin } }) })
  const port = s.sidecar.port
  const seen: string[] = []
  const route = (headers: string) => rawRequest(port, `GET /api/x HTTP/1.1\r\n${headers}Connection: close\r\n\r\n`)

  for (const [name, headers] of [
    ['a rebound name', 'Host: rebind.attacker.example:1234\r\n'],
    ['a rebound name with a trailing dot', 'Host: rebind.attacker.example.\r\n'],
    ['a cross-site fetch', `Host: 127.0.0.1:${port}\r\nOrigin: http://attacker.example\r\n`],
    ['a sandboxed page', `Host: 127.0.0.1:${port}\r\nOrigin: null\r\n`],
    ['a cross-site navigation', `Host: localhost:${port}\r\nSec-Fetch-Site: cross-site\r\n`],
    ['a same-site subresource', `Host: localhost:${port}\r\nSec-Fetch-Site: same-site\r\n`],
  ] as const) {
    const r = await route(headers)
    seen.push(r.raw)
    t.equal(r.status, 403, `${name}: 403`)
    t.equal(r.headers['x-latchkey-error'], 'LK_FOREIGN_ORIGIN', `${name}: says why`)
  }
  // A route that does not exist, asked for the same ways: the same 403 (a 404 told a rebound page,
  // which reads the answers, which route names are configured), on every way to the sidecar itself.
  const foreign = [['a rebound name', 'Host: rebind.attacker.example\r\n'], ['a cross-site fetch', `Host: 127.0.0.1:${port}\r\nOrigin: http://attacker.example\r\n`], ['a same-site subresource', `Host: localhost:${port}\r\nSec-Fetch-Site: same-site\r\n`]] as const
  const asked: [string, (path: string, headers: string) => string][] = [
    ['origin-form', (path, headers) => `GET ${path} HTTP/1.1\r\n${headers}Connection: close\r\n\r\n`],
    ['absolute-form to the sidecar', (path, headers) => `GET http://127.0.0.1:${port}${path} HTTP/1.1\r\n${headers}Connection: close\r\n\r\n`],
    ['a WebSocket', (path, headers) => `GET ${path} HTTP/1.1\r\n${headers}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`],
    ['in a tunnel to the sidecar', (path, headers) => `CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\nGET ${path} HTTP/1.1\r\n${headers}Connection: close\r\n\r\n`],
  ]
  for (const [way, request] of asked) {
    for (const [name, headers] of foreign) {
      for (const path of ['/api/x', '/nope/x', '/']) {
        const raw = (await rawRequest(port, request(path, headers))).raw.replace(/^HTTP\/1\.1 200 Connection Established\r\n\r\n/, '')
        seen.push(raw)
        t.match(raw, /^HTTP\/1\.1 403 [^]*x-latchkey-error: LK_FOREIGN_ORIGIN\r\n/i, `${way}, ${name}, ${path}: refused as a page's call`)
      }
    }
  }
  const ws = await rawRequest(port, `GET /api/socket HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nOrigin: http://attacker.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
  seen.push(ws.raw)
  t.equal(ws.status, 403, "a page's WebSocket is refused")
  t.match(JSON.parse(ws.body).reason, /^a request with an Origin header is taken for one from a web page and refused: .*suppress_origin=True\)$/, 'saying what a program that sends Origin itself should leave out')
  t.equal(upstream.requests.length, 0, 'none of them reached the upstream, so no credential was spent for a page')

  for (const headers of [`Host: 127.0.0.1:${port}\r\n`, `Host: localhost:${port}\r\n`, `Host: [::1]:${port}\r\n`, `Host: app.localhost\r\n`, `Host: 127.0.0.1\r\nSec-Fetch-Site: none\r\n`]) {
    const r = await route(headers)
    t.equal(r.status, 200, `${JSON.stringify(headers)}: a local program is served`)
  }
  t.equal(upstream.requests.length, 5)

  const admin = s.sidecar.adminPort
  const metrics = await rawRequest(admin, `GET /metrics HTTP/1.1\r\nHost: rebind.attacker.example\r\nConnection: close\r\n\r\n`)
  t.equal(metrics.status, 403, 'the admin port refuses a rebound name')
  const body = '{"purpose":"x","duration_s":60}'
  const task = await rawRequest(admin, `POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:${admin}\r\nOrigin: http://attacker.example\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`)
  t.equal(task.status, 403, 'a page cannot open a task')
  t.equal(s.sidecar.tasks.size, 0)
  const ok = await rawRequest(admin, `GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:${admin}\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200)

  const audit = await s.audit()
  t.equal(audit.filter((e) => e.error === 'LK_FOREIGN_ORIGIN').length, 7 + 4 * 3 * 3, 'each refused route call is audited')
  t.match(audit[0], { via: 'reverse', status: 403, host: '127.0.0.1', port: upstream.port, path: '/x' })
  assertNoCanary(t, s, ...seen, metrics.raw, task.raw)
  t.notOk(seen.some((r) => r.includes(CANARY)))
})

t.test('the admin port takes a Host that is a loopback authority, spelled as RFC 3986 spells it, and nothing like one', async (t) => {
  const s = await startTestSidecar(loopbackPolicy([1]))
  t.teardown(() => s.close())
  const admin = s.sidecar.adminPort
  const healthz = (host: string) => rawRequest(admin, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 100)
  for (const host of [`[::1]:${admin}`, '[::1]', `[0:0:0:0:0:0:0:1]:${admin}`, `localhost:${admin}`, 'localhost', `127.0.0.1:${admin}`, '127.0.0.1', `127.0.0.1.:${admin}`, `LOCALHOST:${admin}`, `127.1:${admin}`, '2130706433', `0x7f.0.0.1:${admin}`, `0177.1:${admin}`]) {
    t.equal((await healthz(host)).status, 200, `${host}: served`)
  }
  for (const host of [
    'evil.com',
    `evil.com:${admin}`,
    `127.0.0.1.evil.com:${admin}`,
    `localhost.evil.com:${admin}`,
    // Not an authority: an IPv6 address unbracketed (RFC 3986 §3.2.2), or more after the bracket than a port.
    '::1',
    `::1:${admin}`,
    '[::1].evil',
    `[::1].evil:${admin}`,
    `[::1]evil.com:${admin}`,
    `[::1]:${admin}@evil.com`,
    `127.0.0.1:${admin}.evil.com`,
    // Numeric only as an address is: a name whose last label merely looks like a number is no host.
    `127.1.evil:${admin}`,
    `evil.0x7f:${admin}`,
    `add.bed:${admin}`,
    '[::1',
    '[localhost]',
  ]) {
    const r = await healthz(host)
    t.equal(r.status, 403, `${host}: refused`)
    t.equal(r.headers['x-latchkey-error'], 'LK_FOREIGN_ORIGIN', `${host}: as a foreign origin`)
    if (host === `evil.com:${admin}`) t.match(JSON.parse(r.body).reason, /^the Host header names another host than this sidecar/, 'the reason names the header that was wrong')
  }
})

t.test('with allow_remote_clients, a route may be addressed by name; a web page is still refused', async (t) => {
  const { s } = await startBearerRig(t, { fragment: (up) => ({ sidecar: { allow_remote_clients: true }, routes: { api: up.origin } }) })
  const route = (headers: string) => rawRequest(s.sidecar.port, `GET /api/x HTTP/1.1\r\n${headers}Connection: close\r\n\r\n`)
  t.equal((await route('Host: latchkey.agents.svc.cluster.local:15001\r\n')).status, 200, "a Service's name is how remote clients reach it")
  t.equal((await route('Host: latchkey.agents.svc.cluster.local\r\nOrigin: http://attacker.example\r\n')).status, 403, 'a page is still a page')
  t.equal((await rawRequest(s.sidecar.adminPort, 'GET /healthz HTTP/1.1\r\nHost: latchkey-admin\r\nConnection: close\r\n\r\n')).status, 200, 'the admin port too')
})

t.test('the admin port holds a bounded number of connections; idle ones cannot starve it: the oldest makes room', async (t) => {
  const s = await startTestSidecar(loopbackPolicy([1]))
  t.teardown(() => s.close())
  const admin = s.sidecar.adminPort
  const idle = await Promise.all(
    Array.from({ length: 256 }, async () => {
      const c = connect(admin, '127.0.0.1')
      c.on('error', () => {})
      await once(c, 'connect')
      return c
    }),
  )
  const oldestClosed = once(idle[0]!, 'close')
  // The 257th is answered: the oldest idle one makes room for it (listen/cap.ts, capEvictingIdle).
  const over = await rawRequest(admin, `GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  t.equal(over.status, 200, 'the 257th connection is answered')
  await oldestClosed
  t.equal(idle.filter((c) => c.destroyed).length, 1, 'the oldest idle one, and only it, was closed for it')
  const proxy = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  t.equal(proxy.status, 403, 'the proxy keeps answering meanwhile')
  for (const c of idle) c.destroy()
  await new Promise((r) => setTimeout(r, 100))
  const after = await rawRequest(admin, `GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  t.equal(after.status, 200, 'and the admin port answers again once they are gone')
})
