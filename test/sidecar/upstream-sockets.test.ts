// Upstream sockets are descriptors, and idle keep-alive ones outlive the agent connections that
// opened them. An upstream offering `Keep-Alive: timeout=600` had undici keep each for 600 s; with
// a pool per task and origin, bursts left thousands open and later calls failed with EMFILE. Here:
// an idle socket is closed after timeouts.upstream_idle_ms, upstream sockets stay within
// sidecar.max_connections (idle pools closed first to make room, a dial refused only with none
// idle), and /metrics says how many are open. Counted where it is real: at the upstream servers.
import t from 'tap'
import { createServer, request, type Server } from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { once } from 'node:events'
import { startTestSidecar, loopbackPolicy, type TestSidecar } from '../helpers/harness.js'
import { PinnedPools } from '../../proxy/forward/pools.js'
import { LatchkeyError } from '../../proxy/errors.js'
import { request as undiciRequest } from 'undici'

/** Upstream servers that offer `Keep-Alive: timeout=600` and answer after `delayMs`; `open()` counts their sockets, all servers together. */
async function keepAliveUpstreams(n: number, delayMs = 0) {
  let open = 0
  let most = 0
  const servers: Server[] = []
  for (let i = 0; i < n; i++) {
    const server = createServer((_req, res) => {
      setTimeout(() => res.writeHead(200, { 'content-type': 'text/plain' }).end('ok'), delayMs)
    })
    // Node says `Keep-Alive: timeout=600` on every response, and keeps the socket that long itself.
    server.keepAliveTimeout = 600_000
    server.on('connection', (s: Socket) => {
      open++
      s.once('close', () => open--)
      // Sampled a moment later: a socket the sidecar has closed (its descriptor gone) is still
      // counted here until its FIN is read, a loop turn or two after a new one can arrive.
      setTimeout(() => (most = Math.max(most, open)), 10)
    })
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    servers.push(server)
  }
  const ports = servers.map((s) => (s.address() as AddressInfo).port)
  return {
    ports,
    open: () => open,
    most: () => most,
    close: async () => {
      for (const s of servers) s.closeAllConnections()
      await Promise.all(servers.map((s) => new Promise((r) => s.close(r))))
    },
  }
}

/** A GET through the proxy on a connection of its own (closed after): status and body. */
function call(s: TestSidecar, port: number, path = '/'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: s.sidecar.port, path: `http://127.0.0.1:${port}${path}`, headers: { host: `127.0.0.1:${port}` }, agent: false }, (res) => {
      let body = ''
      res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject).end()
  })
}

async function until(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms
  while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 20))
  return cond()
}

async function gauge(s: TestSidecar, kind: 'pooled' | 'relayed'): Promise<number> {
  const text = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  const m = new RegExp(`^latchkey_open_upstream_connections\\{kind="${kind}"\\} (\\d+)$`, 'm').exec(text)
  return m ? Number(m[1]) : NaN
}

t.test("an idle upstream socket is closed after timeouts.upstream_idle_ms, whatever the upstream's Keep-Alive offers", async (t) => {
  const up = await keepAliveUpstreams(1)
  const s = await startTestSidecar({ ...loopbackPolicy(up.ports), sidecar: { timeouts: { upstream_idle_ms: 300 } } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const r = await call(s, up.ports[0]!)
  t.equal(r.status, 200, 'the call is answered')
  t.equal(up.open(), 1, 'its upstream socket is kept open, idle, after the call')
  t.equal(await gauge(s, 'pooled'), 1, 'latchkey_open_upstream_connections{kind="pooled"} counts it')
  t.ok(await until(() => up.open() === 0, 2_000), 'the sidecar closes it within upstream_idle_ms (not the 600 s the upstream offered)')
  t.equal(await gauge(s, 'pooled'), 0, 'and the gauge goes back to 0')
})

t.test('bursts to several upstreams never hold more upstream sockets than sidecar.max_connections; idle pools make room', async (t) => {
  const up = await keepAliveUpstreams(4, 60)
  const s = await startTestSidecar({ ...loopbackPolicy(up.ports), sidecar: { max_connections: 8 } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const statuses: number[] = []
  // Two rounds over four upstreams, five calls at once each: each burst leaves five idle sockets.
  for (const port of [...up.ports, ...up.ports]) {
    const burst = await Promise.all([0, 1, 2, 3, 4].map(() => call(s, port)))
    statuses.push(...burst.map((r) => r.status))
    // Each call's own connection to the proxy closes after it: let the sidecar see those go.
    await new Promise((r) => setTimeout(r, 30))
  }
  t.same([...new Set(statuses)], [200], `every call in the bursts is answered (${statuses.length})`)
  t.ok(up.most() <= 8, `at most 8 upstream sockets open at once at the upstreams (saw ${up.most()})`)
  t.ok(up.open() <= 8, `at most 8 open after the bursts (${up.open()})`)
  t.equal(await gauge(s, 'pooled'), up.open(), 'the gauge reports the sockets the upstreams see')
  // Ordinary calls go on: each to whichever upstream, one after another.
  const after = []
  for (const port of up.ports) after.push((await call(s, port)).status)
  t.same(after, [200, 200, 200, 200], 'ordinary calls after the bursts are answered')
  t.ok(up.most() <= 8, `still at most 8 (saw ${up.most()})`)
})

t.test('a CONNECT tunnel is counted as a relayed upstream connection', async (t) => {
  const up = await keepAliveUpstreams(1)
  const s = await startTestSidecar({ ...loopbackPolicy(up.ports) })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.write(`CONNECT 127.0.0.1:${up.ports[0]} HTTP/1.1\r\nHost: 127.0.0.1:${up.ports[0]}\r\n\r\n`)
  t.match(((await once(sock, 'data')) as [Buffer])[0].toString(), /^HTTP\/1\.1 200/, 'the tunnel opens')
  t.equal(await gauge(s, 'relayed'), 1, 'latchkey_open_upstream_connections{kind="relayed"} is 1')
  sock.destroy()
  t.ok(await until(() => up.open() === 0, 2_000), 'the upstream sees the tunnel close')
  let relayed = NaN
  for (let i = 0; i < 50 && relayed !== 0; i++) {
    relayed = await gauge(s, 'relayed')
    if (relayed !== 0) await new Promise((r) => setTimeout(r, 20))
  }
  t.equal(relayed, 0, 'and 0 once it has closed')
})

/** PinnedPools allowed `max` upstream sockets, torn down with the test; `get` calls an upstream port through them. */
function limitedPools(t: { teardown(fn: () => unknown): void }, up: { close(): Promise<void> }, max: number) {
  const refused: number[] = []
  const pools = new PinnedPools({ connect_ms: 2_000, headers_ms: 5_000, body_ms: 5_000, upstream_idle_ms: 30_000 }, 16, undefined, { max, onRefused: (m) => refused.push(m) })
  t.teardown(async () => {
    await pools.close()
    await up.close()
  })
  const identity = { agentId: 'agent:local:dev:0', taskId: null } as never
  const resolved = { address: '127.0.0.1', family: 4 } as never
  const get = (port: number) =>
    undiciRequest(`http://127.0.0.1:${port}/`, { dispatcher: pools.get({ scheme: 'http', host: '127.0.0.1', port, hostIsIp: true } as never, resolved, identity) })
  return { pools, refused, get }
}

t.test('a dial past the limit with no pool idle is refused with a retryable 503 LK_UPSTREAM_LIMIT naming the setting', async (t) => {
  const up = await keepAliveUpstreams(2, 300)
  const { pools, refused, get } = limitedPools(t, up, 1)
  // One call in flight holds the only socket allowed; a call to another origin needs a second.
  const first = get(up.ports[0]!)
  await until(() => pools.pooled === 1, 1_000)
  const second = await get(up.ports[1]!).then(
    () => null,
    (err: unknown) => err,
  )
  t.ok(second instanceof LatchkeyError, 'the second dial is refused with a coded error')
  const e = second as LatchkeyError
  t.equal(e.code, 'LK_UPSTREAM_LIMIT')
  t.equal(e.status, 503)
  t.equal(e.retryable, true, 'retryable: nothing was sent')
  t.match(e.reason, /limit of 1 upstream connections open \(sidecar\.max_connections\)/, 'the reason names the setting')
  t.same(refused, [1], 'the refusal is reported')
  const r = await first
  await r.body.text()
  t.equal(up.open(), 1, 'the upstreams saw one socket, not two')
  // Now the first pool is idle: the next dial closes it to make room, and goes through.
  const third = await get(up.ports[1]!)
  t.equal(third.statusCode, 200, 'with an idle pool to close, the dial goes through')
  await third.body.text()
  t.equal(pools.pooled, 1, 'one pooled socket is counted')
  t.ok(await until(() => up.open() === 1, 1_000), 'the idle one was closed at the upstream')
})

t.test("a pool's idle keep-alive sockets make room too while it has a call running: only sockets all busy refuse a dial", async (t) => {
  const up = await keepAliveUpstreams(2, 300)
  const limited = limitedPools(t, up, 3)
  const { pools, refused } = limited
  const get = async (port: number) => {
    const r = await limited.get(port)
    await r.body.text()
    return r.statusCode
  }
  const [a, b] = [up.ports[0]!, up.ports[1]!]
  // Three calls at once to A leave it three idle keep-alive sockets: the limit.
  t.same(await Promise.all([get(a), get(a), get(a)]), [200, 200, 200])
  t.equal(pools.pooled, 3)
  // (undici marks a socket free again a tick after its response: a call in the same tick dials.)
  await new Promise((r) => setTimeout(r, 50))
  // One call to A keeps that pool busy; a call to B needs a socket A holds idle.
  const busy = get(a)
  await new Promise((r) => setTimeout(r, 50))
  t.equal(await get(b).catch((err: LatchkeyError) => err.code), 200, 'B is answered: an idle socket of the busy pool was closed for it (the old code: 503 LK_UPSTREAM_LIMIT)')
  t.equal(await busy, 200, "and A's call, running meanwhile, is answered")
  t.same(refused, [], 'nothing refused')
  t.ok(pools.pooled <= 3, `within the limit (${pools.pooled})`)
  t.ok(up.most() <= 3, `at most 3 open at the upstreams at once (saw ${up.most()})`)
  // The busy pool goes on: calls to A again, as many at once as the limit leaves.
  t.same(await Promise.all([get(a), get(a)]), [200, 200], 'the pool that gave up a socket serves on')
})
