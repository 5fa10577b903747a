// Edges found by probing the running sidecar: a drain that still took new calls on open
// connections, a reason phrase node:http would not write, a task handle that was not valid
// percent-encoding, and CONNECT or upgrade requests pipelined ahead of owed responses.
import t from 'tap'
import { createServer, type Server } from 'node:net'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { ProxyAgent, fetch as undiciFetch } from 'undici'
import { startBearerRig, startSlowCallRig, startTestSidecar, loopbackPolicy, rawRequest, assertNoCanary, startUpstream } from '../helpers/harness.js'
import { clientHello } from '../helpers/client-hello.js'

/** A sidecar (drain_ms `drainMs`) with one call in flight that its upstream answers after `delayMs`. */
async function slowCallInFlight(t: { teardown(fn: () => unknown): void }, delayMs: number, drainMs: number) {
  const { upstream, s, host } = await startSlowCallRig(t, delayMs, { timeouts: { drain_ms: drainMs } })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  await once(sock, 'connect')
  sock.on('error', () => {})
  sock.write(`GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (upstream.requests.length === 0) await new Promise((r) => setTimeout(r, 10))
  return { s, sock }
}

/** A raw connection to the sidecar, and everything it has received so far. */
async function openRaw(port: number): Promise<{ sock: Socket; raw: () => string }> {
  const sock = connect(port, '127.0.0.1')
  await once(sock, 'connect')
  let raw = ''
  sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
  return { sock, raw: () => raw }
}

t.test('while draining, the call in flight is answered with Connection: close, and its connection ends', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 300, { timeouts: { drain_ms: 3000 } })
  const { sock, raw } = await openRaw(s.sidecar.port)
  sock.write(`GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  await new Promise((r) => setTimeout(r, 50))
  const closing = s.close()
  // Read once the connection has ended (after the answer), not after a fixed wait: on a loaded
  // machine the 300 ms upstream and the relay can take longer than any sleep chosen here.
  if (!sock.destroyed) await once(sock, 'close')
  t.match(raw(), /^HTTP\/1\.1 200 OK[\s\S]*late/, 'the call in flight when the drain began is answered')
  t.match(raw(), /^[^]*?\r\nconnection: close\r\n[^]*?\r\n\r\n/i, 'telling its client not to reuse the connection')
  t.pass('and the connection ends with it')
  await closing
  t.same(upstream.requests.map((r) => r.url), ['/slow'])
  t.match(await s.audit(), [{ path: '/slow', status: 200, error: null }])
})

t.test('while draining, a request pipelined behind the call in flight is never sent, and is recorded as such', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 300, { timeouts: { drain_ms: 3000 } })
  const { sock, raw } = await openRaw(s.sidecar.port)
  sock.write(`GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://${host}/after HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (upstream.requests.length === 0) await new Promise((r) => setTimeout(r, 10))
  const closing = s.close()
  if (!sock.destroyed) await once(sock, 'close')
  await closing
  t.match(raw(), /^HTTP\/1\.1 200 OK[\s\S]*late/, 'the call in flight is answered')
  t.notOk(raw().slice(1).includes('HTTP/1.1 200'), 'and nothing else succeeds')
  t.same(upstream.requests.map((r) => r.url), ['/slow'], 'nothing new reached the upstream')
  const audit = await s.audit()
  t.match(audit, [
    { path: '/slow', status: 200, error: null },
    { path: '/after', error: 'LK_DRAINING' },
  ])
  t.equal(audit.length, 2)
})

t.test('while draining, a CONNECT or a WebSocket upgrade on a connection kept alive is refused as a plain request is: 503 LK_DRAINING', async (t) => {
  // A response whose head went before the drain began keeps its connection alive; the next request on it comes during the drain.
  const upstream = await startUpstream({
    handler: (req, res) => {
      if (req.url !== '/stream') return false
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write('first ')
      setTimeout(() => res.end('last'), 400)
      return true
    },
  })
  const s = await startTestSidecar({ ...loopbackPolicy([upstream.port]), sidecar: { timeouts: { drain_ms: 3000 } } })
  t.teardown(() => upstream.close())
  const host = `127.0.0.1:${upstream.port}`
  const streams = await Promise.all([openRaw(s.sidecar.port), openRaw(s.sidecar.port)])
  for (const c of streams) c.sock.write(`GET http://${host}/stream HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (!streams.every((c) => c.raw().includes('first'))) await new Promise((r) => setTimeout(r, 10))
  const closing = s.close()
  while (!streams.every((c) => c.raw().includes('last'))) await new Promise((r) => setTimeout(r, 10))
  const [tunnel, ws] = streams.map((c) => ({ ...c, before: c.raw().length }))
  tunnel!.sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  ws!.sock.write(`GET http://${host}/feed HTTP/1.1\r\nHost: ${host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
  for (const [what, c] of [['CONNECT', tunnel!], ['upgrade', ws!]] as const) {
    if (!c.sock.destroyed) await Promise.race([once(c.sock, 'close'), new Promise((r) => setTimeout(r, 2_000))])
    const answer = c.raw().slice(c.before)
    t.match(answer, /^HTTP\/1\.1 503 /, `${what}: refused`)
    t.match(answer, /"code":"LK_DRAINING".*"retryable":true/, `${what}: saying why`)
    c.sock.destroy()
  }
  await closing
  t.same(upstream.requests.map((r) => r.url), ['/stream', '/stream'], 'nothing new reached the upstream')
  t.match((await s.audit()).filter((e) => e.error === 'LK_DRAINING').map((e) => [e.via, e.status, e.port]).sort(), [
    ['connect', 503, upstream.port],
    ['upgrade', 503, upstream.port],
  ], 'each audited with its target')
})

t.test('while draining, a plaintext tunnel opened before it takes no new call: 503, retryable, connection closed', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 300, { timeouts: { drain_ms: 3000 } })
  const { sock, raw } = await openRaw(s.sidecar.port)
  sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (!raw().includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 10))
  t.match(raw(), /^HTTP\/1\.1 200 /, 'tunnel open')
  // A slow call on another connection keeps the drain going.
  const other = await openRaw(s.sidecar.port)
  other.sock.write(`GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (upstream.requests.length === 0) await new Promise((r) => setTimeout(r, 10))
  const closing = s.close()
  await new Promise((r) => setTimeout(r, 50))
  const before = raw().length
  sock.write(`GET /after HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  if (!sock.destroyed) await once(sock, 'close')
  const answer = raw().slice(before)
  t.match(answer, /^HTTP\/1\.1 503 /, 'a new call in the tunnel is refused')
  t.match(answer, /connection: close/i)
  t.match(answer, /"code":"LK_DRAINING".*"retryable":true/)
  await closing
  t.same(upstream.requests.map((r) => r.url), ['/slow'], 'nothing new reached the upstream')
  t.match((await s.audit()).filter((e) => e.via === 'tunnelled'), [{ status: 503, error: 'LK_DRAINING', method: 'GET', host: '127.0.0.1', port: upstream.port, path: '/after' }], 'and audited with its target')
})

t.test('calls still open at the drain deadline are cut and recorded as cut by the shutdown', async (t) => {
  const { s, sock } = await slowCallInFlight(t, 5000, 200)
  await s.close()
  if (!sock.destroyed) await once(sock, 'close')
  const audit = await s.audit()
  t.match(audit, [{ path: '/slow', status: 0, error: 'LK_DRAINING', reason: 'the sidecar shut down before the call finished' }], 'recorded as cut by the shutdown, not as an upstream failure')
  t.equal(audit.length, 1)
})

t.test('a reason phrase node:http will not write is replaced, never a hang', async (t) => {
  const answers = [
    'HTTP/1.1 200 Caf\xe9\r\nContent-Length: 2\r\n\r\nhi',
    'HTTP/1.1 200 Euro \xe2\x82\xac\r\nContent-Length: 2\r\n\r\nhi',
  ]
  const servers: Server[] = []
  for (const answer of answers) {
    const server = createServer((c) => {
      c.on('error', () => {})
      c.once('data', () => c.end(Buffer.from(answer, 'latin1')))
    })
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    servers.push(server)
  }
  const ports = servers.map((x) => (x.address() as AddressInfo).port)
  const s = await startTestSidecar({ ...loopbackPolicy(ports) })
  t.teardown(async () => {
    await s.close()
    for (const x of servers) x.close()
  })
  for (const port of ports) {
    const started = Date.now()
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    t.match(r.raw, /^HTTP\/1\.1 200 OK\r\n/, 'the standard reason phrase')
    t.equal(r.body, 'hi')
    t.ok(Date.now() - started < 1500, 'answered, not hung')
  }
  t.equal((await s.audit()).filter((e) => e.status === 200).length, 2, 'both audited')
})

t.test('a task handle that is not valid percent-encoding is a 400, not an internal error', async (t) => {
  const s = await startTestSidecar({ policy: { default: 'deny' } })
  t.teardown(() => s.close())
  for (const bad of ['%', '%zz', '%E0%A4%A']) {
    for (const method of ['GET', 'DELETE']) {
      const r = await fetch(`${s.sidecar.adminUrl}/v1/tasks/${bad}`, { method })
      t.equal(r.status, 400, `${method} ${bad}`)
      t.match(await r.json(), { error: 'bad_request', reason: /percent-encoding/ })
    }
  }
  t.equal((await fetch(`${s.sidecar.adminUrl}/v1/tasks/nope`)).status, 404, 'a well-formed unknown handle is still a 404')
  const body = JSON.stringify({ purpose: 'x', duration_s: 60 })
  const open = (type: string) => fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': type }, body })
  t.equal((await open('application/jsonx')).status, 415, 'application/jsonx is not JSON')
  t.equal((await open('text/plain')).status, 415)
  t.equal((await open('Application/JSON; charset=utf-8')).status, 201, 'the media type in any case, with parameters')
})

t.test('CONNECT and upgrades pipelined ahead of owed responses are not taken', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 200)
  const ws = `GET http://${host}/ws HTTP/1.1\r\nHost: ${host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`
  const table: [string, string, number[]][] = [
    ['an upgrade behind a slow call', `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n` + ws, [200]],
    ['a CONNECT behind a slow call', `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\nCONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`, [200]],
    ['an upgrade behind a refusal', `GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello` + ws, [403]],
    ['a CONNECT behind a refusal', `GET http://${host}/ HTTP/1.1\r\n\r\nCONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`, [400]],
  ]
  const seen: string[] = []
  for (const [name, bytes, expected] of table) {
    const before = upstream.requests.length
    const auditBefore = (await s.audit()).length
    const r = await rawRequest(s.sidecar.port, bytes)
    seen.push(r.raw)
    t.same([...r.raw.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1])), expected, `${name}: the owed response, in order, then the connection ends`)
    t.same(upstream.requests.slice(before).map((x) => x.url), expected[0] === 200 ? ['/slow'] : [], `${name}: nothing else reached the upstream`)
    const events = (await s.audit()).slice(auditBefore)
    t.equal(events.length, 2, `${name}: both audited`)
    t.match(events.find((e) => e.via === 'upgrade' || e.via === 'connect'), { status: 0, reason: /not sent/ }, `${name}: recorded as not sent`)
  }
  const gauge = (await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()).match(/^latchkey_open_tunnels (\d+)/m)?.[1]
  t.equal(gauge, '0', 'no tunnel was opened or leaked')
  assertNoCanary(t, s, ...seen)
})

t.test('relays are recorded once at shutdown: one the agent ends during the drain, one cut at its deadline', async (t) => {
  // An upstream that never closes its side on the peer's FIN, as a plain socket server does not:
  // the relay is recorded only once that side has closed too, after the agent's.
  const upstream = createServer({ allowHalfOpen: true }, (c) => {
    c.on('data', (d: Buffer) => c.write(d))
    c.on('error', () => {})
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] }, sidecar: { timeouts: { drain_ms: 1500 } } })
  t.teardown(async () => {
    await s.close()
    upstream.close()
  })
  const tunnel = async () => {
    const { sock, raw } = await openRaw(s.sidecar.port)
    sock.on('error', () => {})
    sock.write(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`)
    while (!raw().includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
    // A ClientHello (naming no server, as to an address): relayed as it is, not read as HTTP, and echoed after the 200's 39 bytes.
    const hello = clientHello(null)
    sock.write(hello)
    while (raw().length < 39 + hello.length) await new Promise((r) => setTimeout(r, 5))
    return sock
  }
  const endedByAgent = await tunnel()
  const cut = await tunnel()
  const closing = s.sidecar.close()
  setTimeout(() => endedByAgent.end(), 300)
  const started = Date.now()
  await closing
  t.ok(Date.now() - started < 3000, 'the shutdown ended at its deadline')
  if (!cut.destroyed) await once(cut, 'close')
  const audit = (await s.audit()).filter((e) => e.via === 'connect')
  t.equal(audit.length, 2, 'each tunnel recorded, once')
  t.match(
    audit.map((e) => e.error),
    [null, 'LK_DRAINING'],
    'the one the agent ended as it ended; the other as cut by the shutdown',
  )
})

t.test('an idle or half-sent connection on the admin port does not hold the shutdown open', async (t) => {
  const s = await startTestSidecar({ policy: { default: 'deny' }, sidecar: { timeouts: { drain_ms: 200 } } })
  t.teardown(() => s.close())
  const idle = await openRaw(s.sidecar.adminPort)
  const halfSent = await openRaw(s.sidecar.adminPort)
  halfSent.sock.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n')
  for (const c of [idle, halfSent]) c.sock.on('error', () => {})
  const started = Date.now()
  await s.sidecar.close()
  t.ok(Date.now() - started < 1500, `stopped in ${Date.now() - started} ms, not when the admin clients let go`)
  t.ok(idle.sock.destroyed || (await Promise.race([once(idle.sock, 'close').then(() => true), new Promise((r) => setTimeout(() => r(false), 1000).unref())])), 'their connections were closed')
})

t.test('a connection on the proxy port that never sent a byte does not hold the shutdown to drain_ms', async (t) => {
  // Node's fetch opens a fresh connection after an agent aborts a stream, and may never use it;
  // node:http's closeIdleConnections leaves a connection alone until a request has been read on it.
  const { s, host } = await startBearerRig(t, { fragment: () => ({ sidecar: { timeouts: { drain_ms: 10_000 } } }) })
  const unused = await openRaw(s.sidecar.port)
  const used = await openRaw(s.sidecar.port)
  for (const c of [unused, used]) c.sock.on('error', () => {})
  used.sock.write(`GET http://${host}/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  // Answered, and kept alive: idle, which node:http's own closeIdleConnections closes.
  for (let i = 0; i < 500 && !used.raw().endsWith('\r\n0\r\n\r\n'); i++) await new Promise((r) => setTimeout(r, 10))
  t.match(used.raw(), /^HTTP\/1\.1 200 /)
  const unusedClosed = once(unused.sock, 'close')
  const started = Date.now()
  await s.sidecar.close()
  const took = Date.now() - started
  t.ok(took < 5000, `stopped in ${took} ms, not at drain_ms (10 s)`)
  t.ok(await Promise.race([unusedClosed.then(() => true), new Promise((r) => setTimeout(() => r(false), 1000).unref())]), 'the unused connection was closed')
  t.equal(unused.raw(), '', 'and sent nothing')
})

t.test('asked to close urgently (a second SIGTERM), the drain ends now and what was open is recorded as cut', async (t) => {
  const { s } = await slowCallInFlight(t, 10_000, 10_000)
  const started = Date.now()
  const first = s.sidecar.close()
  await new Promise((r) => setTimeout(r, 200))
  const second = s.sidecar.close(true)
  await Promise.all([first, second])
  t.ok(Date.now() - started < 2500, `stopped in ${Date.now() - started} ms, not after drain_ms (10 s)`)
  const audit = await s.audit()
  t.match(audit, [{ path: '/slow', status: 0, error: 'LK_DRAINING' }], 'the call cut is recorded')
})

t.test('a connection that sends no complete head is cut soon after client_headers_ms, on both ports and inside a tunnel', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'up', action: 'allow', hosts: ['127.0.0.1'], ports: [upstream.port] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
    sidecar: { timeouts: { client_headers_ms: 1000 } },
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  // A tunnel's plain HTTP is parsed by a server of its own, to an upstream or to the sidecar itself.
  const tunnelTo = (host: string) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`
  const cases = [
    [s.sidecar.port, 'listener', ''],
    [s.sidecar.adminPort, 'admin', ''],
    [s.sidecar.port, 'a tunnel to an upstream', tunnelTo(`127.0.0.1:${upstream.port}`)],
    [s.sidecar.port, 'a tunnel to the sidecar', tunnelTo(`127.0.0.1:${s.sidecar.port}`)],
  ] as const
  const results = await Promise.all(
    cases.flatMap(([port, name, opening]) =>
      [false, true].map(async (trickled) => {
        const c = await openRaw(port)
        c.sock.on('error', () => {})
        if (opening !== '') {
          c.sock.write(opening)
          while (!c.raw().includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
        }
        const opened = c.raw()
        c.sock.write('GET / HTTP/1.1\r\n')
        const started = Date.now()
        // A byte every 100 ms: never idle, never a whole head.
        const trickle = trickled ? setInterval(() => c.sock.writable && c.sock.write('X'), 100) : null
        await once(c.sock, 'close')
        if (trickle) clearInterval(trickle)
        return { name: `${name}${trickled ? ', trickled' : ''}`, opening, opened, answer: c.raw().slice(opened.length), ms: Date.now() - started }
      }),
    ),
  )
  for (const r of results) {
    if (r.opening !== '') t.match(r.opened, /^HTTP\/1\.1 200 /, `${r.name}: the tunnel opened`)
    // node:http's own check runs every 30 s unless told otherwise.
    t.ok(r.ms < 2500, `${r.name}: cut after ${r.ms} ms`)
    t.match(r.answer, /^HTTP\/1\.1 408 [^\r]*\r\n[\s\S]*\r\n\r\n\{"error":"request_timeout","code":"LK_REQUEST_TIMEOUT"[^}]*"retryable":true\}\n?$/, `${r.name}: told it was too slow, not that it was malformed`)
  }
  t.equal(upstream.requests.length, 0, 'nothing reached the upstream')
})

t.test('a tunnel opened for plain HTTP only, cut, is recorded as opened, not as a denial with a 200', async (t) => {
  const { upstream, s, host } = await startBearerRig(t, {
    fragment: (up) => ({
      policy: {
        default: 'deny',
        rules: [
          { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] },
          { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [up.port] },
        ],
      },
      sidecar: { timeouts: { drain_ms: 200 } },
    }),
  })
  const { sock, raw } = await openRaw(s.sidecar.port)
  sock.on('error', () => {})
  sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (!raw().includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
  sock.write(`GET /ok HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (upstream.requests.length === 0 || !/\r\n\r\nHTTP\/1\.1 200 [^]*\r\n\r\n/.test(raw())) await new Promise((r) => setTimeout(r, 5))
  await s.close()
  const audit = await s.audit()
  t.match(
    audit.map((e) => [e.via, e.status, e.decision, e.error]),
    [
      ['tunnelled', 200, 'allow', null],
      ['connect', 200, 'allow', 'LK_DRAINING'],
    ],
  )
  t.match(audit[1], { rule: 'no-admin', reason: /the sidecar shut down/ })
})

t.test('shutdown closes an idle plaintext tunnel to the sidecar itself at once, not at drain_ms', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: (up) => ({ routes: { api: up.origin }, sidecar: { timeouts: { drain_ms: 5000 } } }) })
  // Node's fetch with HTTP_PROXY set tunnels its calls to a route through a CONNECT to the sidecar.
  const sock = connect(s.sidecar.port, '127.0.0.1')
  await once(sock, 'connect')
  let got = ''
  sock.on('data', (d: Buffer) => (got += d.toString('latin1')))
  sock.on('error', () => {})
  sock.write(`CONNECT 127.0.0.1:${s.sidecar.port} HTTP/1.1\r\nHost: 127.0.0.1:${s.sidecar.port}\r\n\r\nGET /api/x HTTP/1.1\r\nHost: 127.0.0.1:${s.sidecar.port}\r\n\r\n`)
  while (!/HTTP\/1\.1 200 OK[\s\S]*\r\n\r\n/.test(got)) await new Promise((r) => setTimeout(r, 10))
  t.equal(upstream.requests.length, 1, 'the call in the tunnel was made; the tunnel is idle, kept alive')
  const t0 = performance.now()
  await s.close()
  const ms = performance.now() - t0
  t.ok(ms < 1500, `closed in ${Math.round(ms)} ms`)
  t.ok(sock.destroyed || sock.readableEnded, 'the tunnel is closed')
})

/** A CONNECT on a raw connection, its 200 read; `raw` is what came after it. */
async function openTunnel(port: number, authority: string): Promise<{ sock: Socket; raw: () => string }> {
  const c = await openRaw(port)
  c.sock.on('error', () => {})
  c.sock.write(`CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\n`)
  while (!c.raw().includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
  const opened = c.raw().indexOf('\r\n\r\n') + 4
  return { sock: c.sock, raw: () => c.raw().slice(opened) }
}

/** Sends one request inside a tunnel and waits for the `n`th response there to be whole. */
async function callIn(tunnel: { sock: Socket; raw: () => string }, path: string, host: string, n: number): Promise<void> {
  tunnel.sock.write(`GET ${path} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  // Its end: a chunked body's last chunk, or the last bytes of a short one with a Content-Length.
  const whole = (raw: string) => raw.split(/HTTP\/1\.1 \d{3} /).length - 1 >= n && /(\r\n0\r\n\r\n|\r\n\r\n(ok|late))$/.test(raw)
  const t0 = Date.now()
  while (!whole(tunnel.raw())) {
    if (Date.now() - t0 > 3000) throw new Error(`no whole response in the tunnel: ${JSON.stringify(tunnel.raw())}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

t.test('plaintext tunnels count as open tunnels, and a finished call in one is no call in flight', async (t) => {
  // Node's fetch through HTTP_PROXY (undici's EnvHttpProxyAgent) tunnels http:// and keeps the
  // tunnels open between calls: the gauges read 4 calls in flight and no tunnel after 4 calls.
  const { upstream, s, host } = await startBearerRig(t, {
    handler: (req, res) => {
      if (!req.url.startsWith('/slow')) return false
      const answer = setTimeout(() => res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '4' }).end('late'), 400)
      res.once('close', () => clearTimeout(answer))
      return true
    },
    fragment: (up) => ({ routes: { api: up.origin } }),
  })
  const gauges = async () => {
    const text = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
    return [Number(/^latchkey_calls_in_flight (\d+)$/m.exec(text)?.[1]), Number(/^latchkey_open_tunnels (\d+)$/m.exec(text)?.[1])] as [number, number]
  }
  const own = `127.0.0.1:${s.sidecar.port}`
  // Two dialled to the upstream, one to the sidecar itself (a route), each used for one call.
  const tunnels = [await openTunnel(s.sidecar.port, host), await openTunnel(s.sidecar.port, host), await openTunnel(s.sidecar.port, own)]
  await callIn(tunnels[0]!, '/a', host, 1)
  await callIn(tunnels[1]!, '/b', host, 1)
  await callIn(tunnels[2]!, '/api/c', own, 1)
  t.same(await gauges(), [0, 3], 'three tunnels open, idle: no call in flight')
  tunnels[0]!.sock.write(`GET /slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (!upstream.requests.some((r) => r.url === '/slow')) await new Promise((r) => setTimeout(r, 5))
  t.same(await gauges(), [1, 3], 'a call under way in one of them is one call in flight')
  while (!tunnels[0]!.raw().endsWith('late')) await new Promise((r) => setTimeout(r, 5))
  for (const { sock } of tunnels) sock.destroy()
  // A real client's pooled tunnels.
  const agent = new ProxyAgent({ uri: s.proxy })
  const bodies = await Promise.all([1, 2, 3, 4].map(async (i) => (await undiciFetch(`http://${host}/fetch?i=${i}`, { dispatcher: agent })).text()))
  t.same(bodies, ['ok', 'ok', 'ok', 'ok'])
  const [inFlight, open] = await gauges()
  t.equal(inFlight, 0, "fetch's calls done, its tunnels idle in its pool: no call in flight")
  t.ok(open >= 1 && open <= 4, `and its ${open} pooled tunnels are open tunnels`)
  await agent.close()
  const started = Date.now()
  let after = await gauges()
  while (after[1] !== 0 && Date.now() - started < 3000) {
    await new Promise((r) => setTimeout(r, 20))
    after = await gauges()
  }
  t.same(after, [0, 0], 'every tunnel closed: none counted open, nothing in flight')
})

t.test('shutdown closes an idle plaintext tunnel at once; one with a call under way drains like any call', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 1500, { timeouts: { drain_ms: 6000 } })
  const idle = await openTunnel(s.sidecar.port, host)
  await callIn(idle, '/first', host, 1)
  const busy = await openTunnel(s.sidecar.port, host)
  busy.sock.write(`GET /slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  while (!upstream.requests.some((r) => r.url === '/slow')) await new Promise((r) => setTimeout(r, 5))
  const order: string[] = []
  idle.sock.once('close', () => order.push('idle tunnel closed'))
  busy.sock.once('close', () => order.push(`busy tunnel closed, answered: ${/^HTTP\/1\.1 200 [^]*late/.test(busy.raw())}`))
  const started = Date.now()
  await s.close()
  const ms = Date.now() - started
  if (!busy.sock.destroyed) await once(busy.sock, 'close')
  t.same(order, ['idle tunnel closed', 'busy tunnel closed, answered: true'], 'the idle tunnel closed before the call under way was answered; that one was answered, then closed')
  t.match(busy.raw(), /\r\nconnection: close\r\n/i, 'telling its client the connection ends')
  t.equal(idle.raw().split('HTTP/1.1 ').length - 1, 1, 'the idle tunnel got nothing more')
  t.ok(ms < 4500, `stopped in ${ms} ms, with the call under way, not at drain_ms (6 s)`)
  const audit = await s.audit()
  t.same(
    audit.filter((e) => e.via === 'tunnelled').map((e) => [e.path, e.status, e.error]),
    [
      ['/first', 200, null],
      ['/slow', 200, null],
    ],
  )
  t.match(
    audit.filter((e) => e.via === 'connect'),
    [{ status: 200, error: 'LK_DRAINING', reason: 'the sidecar shut down while the tunnel was idle' }],
    'the idle tunnel recorded as closed by the shutdown',
  )
})
