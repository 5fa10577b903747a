// An open CONNECT tunnel with no bytes either way for timeouts.tunnel_idle_ms is closed and
// recorded LK_IDLE_TIMEOUT: one opened and never used held its upstream connection as long as
// the agent kept it. Bytes in either direction keep it open; a plaintext tunnel, once its HTTP
// is parsed, is timed by the HTTP server instead.
import t from 'tap'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { spawn } from 'node:child_process'
import { startTestSidecar, startSlowCallRig, loopbackPolicy, startTcpUpstream, openTunnel } from '../helpers/harness.js'
import { clientHello } from '../helpers/client-hello.js'

/** A ClientHello naming no server, as a TLS client's to an address is: what opens these tunnels' relays. */
const HELLO = clientHello(null)

const IDLE_MS = 300
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function sidecarFor(t: { teardown(fn: () => unknown): void }, port: number) {
  const s = await startTestSidecar({ ...loopbackPolicy([port]), sidecar: { timeouts: { tunnel_idle_ms: IDLE_MS } } })
  t.teardown(() => s.close())
  return s
}

async function closedWithin(sock: Socket, ms: number): Promise<boolean> {
  if (sock.destroyed || sock.readableEnded) return true
  return Promise.race([once(sock, 'close').then(() => true), sleep(ms).then(() => false)])
}

t.test('a tunnel opened and never used is closed after tunnel_idle_ms, its upstream connection with it', async (t) => {
  const up = await startTcpUpstream(t)
  const s = await sidecarFor(t, up.port)
  const opened = performance.now()
  const { sock } = await openTunnel(s.sidecar.port, up.port)
  t.equal(up.sockets.length, 1, 'the upstream was dialled')
  t.ok(await closedWithin(sock, IDLE_MS * 6), 'the agent side is closed')
  const after = performance.now() - opened
  t.ok(after >= IDLE_MS - 20, `not before the idle time (${Math.round(after)} ms)`)
  while (up.closed.length === 0) await sleep(10)
  t.pass('and the upstream connection is closed too')
  t.match(await s.audit(1), [{ via: 'connect', method: 'CONNECT', port: up.port, status: 200, error: 'LK_IDLE_TIMEOUT', reason: /no bytes either way for 300 ms/ }])
})

t.test('a TLS-looking relay that goes quiet is closed too, counting the bytes it did carry', async (t) => {
  const up = await startTcpUpstream(t, (s) => s.once('data', () => s.write('server-hello')))
  const s = await sidecarFor(t, up.port)
  const { sock, received } = await openTunnel(s.sidecar.port, up.port)
  sock.write(HELLO)
  while (received().length < 12) await sleep(5)
  t.equal(received().toString(), 'server-hello', 'relayed both ways')
  t.ok(await closedWithin(sock, IDLE_MS * 6), 'closed once quiet')
  t.match(await s.audit(1), [{ via: 'connect', status: 200, error: 'LK_IDLE_TIMEOUT', bytes_in: HELLO.length, bytes_out: 12 }])
})

t.test('bytes either way keep a relay open: the agent sending, or only the upstream sending', async (t) => {
  // One upstream that echoes what it is sent, and for a connection opened by "push", sends a byte
  // every 100 ms of its own accord.
  const pushers: NodeJS.Timeout[] = []
  const up = await startTcpUpstream(t, (s) => {
    s.on('data', (d: Buffer) => {
      if (d.includes('push')) {
        const timer = setInterval(() => !s.destroyed && s.write('.'), 100)
        pushers.push(timer)
        s.on('close', () => clearInterval(timer))
      } else s.write(d)
    })
  })
  t.teardown(() => pushers.forEach(clearInterval))
  const s = await sidecarFor(t, up.port)

  const talker = await openTunnel(s.sidecar.port, up.port)
  talker.sock.write(HELLO)
  for (let i = 0; i < 10; i++) {
    await sleep(100)
    talker.sock.write('x')
  }
  t.notOk(talker.sock.destroyed, 'an agent sending every 100 ms keeps its tunnel past 3 idle periods')
  for (let i = 0; i < 50 && talker.received().length < HELLO.length + 10; i++) await sleep(10)
  t.equal(talker.received().length, HELLO.length + 10, 'and every byte came back')
  talker.sock.destroy()

  const listener = await openTunnel(s.sidecar.port, up.port)
  listener.sock.write(Buffer.concat([HELLO, Buffer.from('push')]))
  await sleep(IDLE_MS * 3)
  t.notOk(listener.sock.destroyed, 'an upstream sending every 100 ms keeps the tunnel open, the agent silent')
  t.ok(listener.received().length >= 5, 'its bytes arrive')
  listener.sock.destroy()
  t.same((await s.audit(2)).map((e) => [e.via, e.status, e.error]), [['connect', 200, null], ['connect', 200, null]], 'no tunnel was recorded as idle')
})

t.test('a plaintext tunnel is timed by the HTTP server once its requests are parsed, not cut at tunnel_idle_ms', async (t) => {
  // The upstream takes twice the idle time to answer: nothing moves on the tunnel meanwhile.
  const { upstream, s } = await startSlowCallRig(t, IDLE_MS * 2, { timeouts: { tunnel_idle_ms: IDLE_MS } })
  const { sock, received } = await openTunnel(s.sidecar.port, upstream.port)
  const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\n\r\n`
  sock.write(get('/slow'))
  while (!received().toString().includes('late') && !sock.destroyed) await sleep(5)
  t.match(received().toString(), /^HTTP\/1\.1 200 [\s\S]*late/, 'a call slower than the idle time is answered')
  await sleep(IDLE_MS * 2)
  t.notOk(sock.destroyed, 'still open after two idle periods (keep-alive allows 5 s)')
  sock.write(get('/two'))
  while (received().toString().split('HTTP/1.1 200').length < 3 && !sock.destroyed) await sleep(5)
  t.same(upstream.requests.map((r) => r.url), ['/slow', '/two'], 'and it carries the next request')
  sock.destroy()
  // Kept: the calls inside were recorded as answered; this gives a wrong record of the tunnel's
  // close (an idle cut, a connect event) the time to show up.
  await sleep(100)
  t.same((await s.audit(2)).map((e) => [e.via, e.path, e.status, e.error]), [['tunnelled', '/slow', 200, null], ['tunnelled', '/two', 200, null]], 'the calls inside are recorded, and no idle cut')
})

t.test('a tunnel to the sidecar itself, opened for plain HTTP and never used, is closed too', async (t) => {
  const up = await startTcpUpstream(t)
  const s = await sidecarFor(t, up.port)
  const { sock } = await openTunnel(s.sidecar.port, s.sidecar.port)
  t.ok(await closedWithin(sock, IDLE_MS * 6), 'closed')
  t.match(await s.audit(1), [{ via: 'connect', port: s.sidecar.port, status: 200, error: 'LK_IDLE_TIMEOUT' }])
})

t.test('an agent ending a tunnel it never used: the tunnel closes at once and is recorded, dialled or not', async (t) => {
  const up = await startTcpUpstream(t)
  const plainOnly = await startTcpUpstream(t)
  // The default idle time (15 min): only the agent's FIN can close these within the test.
  const s = await startTestSidecar({
    policy: {
      default: 'deny',
      rules: [
        { id: 'relay', action: 'allow', hosts: ['127.0.0.1'], ports: [up.port] },
        // Decidable only by path: a CONNECT here opens for plain HTTP alone, undialled.
        { id: 'api-only', action: 'allow', hosts: ['127.0.0.1'], ports: [plainOnly.port], paths: ['/api/**'] },
      ],
    },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [up.port, plainOnly.port] }] },
  })
  t.teardown(() => s.close())
  for (const [name, port] of [['dialled', up.port], ['the sidecar itself', s.sidecar.port], ['plain HTTP only', plainOnly.port]] as const) {
    const { sock } = await openTunnel(s.sidecar.port, port)
    const ended = performance.now()
    sock.end()
    t.ok(await closedWithin(sock, 2000), `${name}: closed`)
    t.ok(performance.now() - ended < 1000, `${name}: at once (${Math.round(performance.now() - ended)} ms), not at the idle timeout`)
  }
  t.equal(up.sockets.length, 1, 'only the relay dialled')
  while (up.closed.length === 0) await sleep(10)
  t.pass("and the relay's upstream connection is closed")
  t.equal(plainOnly.sockets.length, 0, 'the plain-only tunnel dialled nothing')
  const audit = await s.audit(3)
  t.match(audit, [
    { via: 'connect', port: up.port, status: 200, error: null, bytes_in: 0, bytes_out: 0 },
    { via: 'connect', port: s.sidecar.port, status: 200, error: null },
    { via: 'connect', port: plainOnly.port, status: 200, error: null },
  ], 'each recorded once, as closed by the agent')
  t.equal(audit.length, 3)
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /^latchkey_calls_in_flight 0$/m, 'nothing left in flight')
})

/**
 * An upstream whose TCP connect stalls: a listener with a full accept queue drops SYNs (Linux),
 * until `release()` accepts everything. Reports the bytes each accepted connection brings.
 */
async function startStalledUpstream(t: { teardown(fn: () => unknown): void }) {
  const py = spawn('python3', ['-c', STALLED_PY], { stdio: ['pipe', 'pipe', 'inherit'] })
  t.teardown(() => py.kill())
  let out = ''
  py.stdout.on('data', (d: Buffer) => (out += d.toString()))
  while (!out.includes('\n')) await sleep(10)
  return { port: Number(out.split('\n')[0]), release: () => py.stdin.write('go\n'), received: () => out.split('\n').slice(1).join('\n') }
}
const STALLED_PY = `
import socket, sys, threading
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(0)
port = s.getsockname()[1]
fill = []
for _ in range(3):
    c = socket.socket(); c.setblocking(False); fill.append(c)
    try: c.connect(('127.0.0.1', port))
    except BlockingIOError: pass
print(port, flush=True)
sys.stdin.readline()
def read(c):
    while True:
        d = c.recv(65536)
        if not d: break
        print(repr(d), flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=read, args=(c,), daemon=True).start()
`

t.test('an agent hanging up while the upstream is still being dialled: nothing is sent, the call is recorded, no relay is left', async (t) => {
  const up = await startStalledUpstream(t)
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    credentials: [{ id: 'up', audience: `http://127.0.0.1:${up.port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
    sidecar: { timeouts: { connect_ms: 20_000 } },
  })
  t.teardown(() => s.close())
  const openings = {
    connect: `CONNECT 127.0.0.1:${up.port} HTTP/1.1\r\nHost: 127.0.0.1:${up.port}\r\n\r\n`,
    upgrade: `GET http://127.0.0.1:${up.port}/feed HTTP/1.1\r\nHost: 127.0.0.1:${up.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`,
  }
  let recorded = 0
  for (const [via, opening] of Object.entries(openings)) {
    for (const hangUp of ['end', 'destroy'] as const) {
      const sock = connect(s.sidecar.port, '127.0.0.1')
      sock.on('error', () => {})
      await once(sock, 'connect')
      sock.write(opening)
      await sleep(200)
      sock[hangUp]()
      // The upstream is still stalled (released below): any event now was not waiting on its answer.
      const events = (await s.audit(++recorded)).filter((e) => e.via === via)
      t.equal(events.length, hangUp === 'end' ? 1 : 2, `${via}, agent ${hangUp}s: recorded at once, not when the upstream answers`)
      t.match(events.at(-1), { status: 499, error: 'LK_CLIENT_CLOSED' })
    }
  }
  up.release()
  await sleep(2500)
  t.notMatch(up.received(), /GET|Authorization/i, 'no handshake (and no credential) went out for an agent already gone')
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /^latchkey_open_tunnels 0$/m, 'no relay left open')
  t.match(metrics, /^latchkey_calls_in_flight 0$/m)
})
