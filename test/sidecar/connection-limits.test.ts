// Floods of connections to the proxy port: at sidecar.max_connections a new connection closes the
// oldest one carrying no call (idle between requests, or its head still arriving), so a flood of
// idle or half-sent sockets cannot keep the agent's calls out; with every connection carrying a
// call (answered, or a tunnel), new ones are closed unread. Either is logged once per burst naming
// the limit, and counted on /metrics.
import t from 'tap'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { Client } from 'undici'
import { startBearerRig, startSlowCallRig, type Upstream } from '../helpers/harness.js'

/** A keep-alive connection that has had one call answered: node has accepted and holds it. */
async function heldConnection(port: number, host: string): Promise<Socket> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.write(`GET http://${host}/held HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  await new Promise<void>((resolve, reject) => {
    let raw = ''
    const onData = (d: Buffer) => {
      raw += d.toString('latin1')
      if (!raw.endsWith('0\r\n\r\n')) return
      sock.off('data', onData).off('close', reject)
      resolve()
    }
    sock.on('data', onData).once('close', reject)
  })
  return sock
}

/** Resolves true if the connection is closed by the sidecar without a byte within `ms`. */
async function closedUnread(port: number, ms: number): Promise<boolean> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  let got = 0
  sock.on('data', (d: Buffer) => (got += d.length))
  const closed = await Promise.race([once(sock, 'close').then(() => true), new Promise<false>((r) => setTimeout(() => r(false), ms).unref())])
  sock.destroy()
  return closed && got === 0
}

/** A connection with a call on it being answered (a `/slow` one, answered `late`): it holds its place. */
async function busyConnection(port: number, host: string): Promise<{ sock: Socket; answer: Promise<string> }> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.write(`GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  const answer = new Promise<string>((resolve) => {
    let raw = ''
    const onData = (d: Buffer) => {
      raw += d.toString('latin1')
      // Chunked or not, the answer is whole once `late` and its framing's end have come.
      if (!/late(\r\n0\r\n\r\n)?$/.test(raw)) return
      sock.off('data', onData)
      resolve(raw)
    }
    sock.on('data', onData).once('close', () => resolve(raw))
  })
  return { sock, answer }
}

/** A CONNECT tunnel read as plain HTTP, idle after one call inside it answered. */
async function plaintextTunnel(port: number, host: string): Promise<Socket> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET /first HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  await new Promise<void>((resolve, reject) => {
    let raw = ''
    const onData = (d: Buffer) => {
      raw += d.toString('latin1')
      // The CONNECT's 200, then the inner call's answer, whole.
      if (!/^HTTP\/1\.1 200[^]*\r\n\r\nHTTP\/1\.1 200[^]*(\r\n0\r\n\r\n|ok)$/.test(raw)) return
      sock.off('data', onData).off('close', reject)
      resolve()
    }
    sock.on('data', onData).once('close', reject)
  })
  return sock
}

async function untilSlowCalls(upstream: Upstream, n: number): Promise<void> {
  for (let i = 0; i < 250 && upstream.requests.filter((r) => r.url === '/slow').length < n; i++) await new Promise((r) => setTimeout(r, 20))
}

/** A slow-loris's connection: a request head begun and never finished. */
async function halfSent(port: number, host: string): Promise<{ sock: Socket; closed: () => boolean }> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  let closed = false
  sock.once('close', () => (closed = true))
  await once(sock, 'connect')
  sock.write(`GET http://${host}/loris HTTP/1.1\r\nHost: ${host}\r\n`)
  return { sock, closed: () => closed }
}

t.test('with every proxy connection carrying a call, new ones are closed unread, logged once and counted', async (t) => {
  const { s, host, upstream } = await startSlowCallRig(t, 2_000, { max_connections: 3 })
  const port = s.sidecar.port
  // A call being answered (the upstream has it), a plaintext tunnel idle after a call inside it,
  // and a tunnel not yet used: each is a call. (Their upstream sockets count against the same
  // limit: the inner call's idle one is closed to make room for the last tunnel's.)
  const held = [await busyConnection(port, host)]
  await untilSlowCalls(upstream, 1)
  const tunnel = await plaintextTunnel(port, host)
  const unused = connect(port, '127.0.0.1')
  unused.on('error', () => {})
  unused.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  t.match(((await once(unused, 'data')) as [Buffer])[0].toString(), /^HTTP\/1\.1 200/, 'a tunnel is opened')
  const extra = await Promise.all([0, 1, 2, 3].map(() => closedUnread(port, 4_000)))
  t.same(extra, [true, true, true, true], 'each connection past the limit is closed unread')
  const warns = s.logs.filter((l) => l.includes('"max_connections":3'))
  t.equal(warns.length, 1, 'one log line for the burst')
  t.match(warns[0], /proxy port at its limit of 3 open connections \(sidecar\.max_connections\)/)
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /latchkey_connections_dropped_total\{port="proxy"\} 4/, 'counted on /metrics')
  // The calls held are answered, and their connections still served.
  t.match(await held[0]!.answer, /^HTTP\/1\.1 200[^]*late/, 'a call being answered is not cut')
  held[0]!.sock.write(`GET http://${host}/again HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  t.match(((await once(held[0]!.sock, 'data')) as [Buffer])[0].toString(), /^HTTP\/1\.1 200/, 'an open connection is still served')
  // The admin port has its own cap: it still answers.
  t.equal((await fetch(`${s.sidecar.adminUrl}/healthz`)).status, 200, 'the admin port answers')
  // Once one goes, a new connection is accepted again (node counts the close when it sees it).
  tunnel.write(`GET /inside HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  const inside = await Promise.race([once(tunnel, 'data').then(([d]) => String(d)), once(tunnel, 'close').then(() => 'closed')])
  t.match(inside, /^HTTP\/1\.1 200/, 'an idle plaintext tunnel is kept, and still served')
  t.notOk(unused.destroyed, 'so is the tunnel not yet used')
  unused.destroy()
  let answered = false
  for (let i = 0; i < 50 && !answered; i++) {
    answered = await heldConnection(port, host).then(
      (c) => (c.destroy(), true),
      () => false,
    )
    if (!answered) await new Promise((r) => setTimeout(r, 20))
  }
  t.ok(answered, 'a new connection is served once there is room')
  held[0]!.sock.destroy()
  tunnel.destroy()
})

t.test('a flood of idle or half-sent proxy connections cannot keep the agent\'s calls out: the oldest carrying no call makes room', async (t) => {
  const { s, host, upstream } = await startSlowCallRig(t, 1_500, { max_connections: 6 })
  const port = s.sidecar.port
  const idle: Socket[] = []
  const loris: { sock: Socket; closed: () => boolean }[] = []
  t.teardown(() => [...idle, ...loris.map((l) => l.sock)].forEach((c) => c.destroy()))
  // A call being answered, the oldest connection: never the one closed.
  const busy = await busyConnection(port, host)
  await untilSlowCalls(upstream, 1)
  // Two keep-alive connections idle after a call, then three slow-loris heads: the port is full.
  for (let i = 0; i < 2; i++) idle.push(await heldConnection(port, host))
  const idleClosed = idle.map((c) => {
    let closed = false
    c.once('close', () => (closed = true))
    return () => closed
  })
  for (let i = 0; i < 3; i++) loris.push(await halfSent(port, host))
  await new Promise((r) => setTimeout(r, 200))
  t.equal(loris.filter((l) => l.closed()).length + idleClosed.filter((c) => c()).length, 0, 'the port holds all six')
  // A behaving call on a new connection is answered: the oldest idle one went for it.
  const first = await heldConnection(port, host).then(
    (c) => (c.destroy(), 'answered'),
    () => 'closed unread',
  )
  t.equal(first, 'answered', 'a new call is answered at the limit')
  t.same(idleClosed.map((c) => c()), [true, false], 'the oldest idle connection was closed for it')
  // The flood keeps coming: each half-sent head takes the place of the oldest carrying no call,
  // and the agent's calls still get in.
  for (let i = 0; i < 10; i++) loris.push(await halfSent(port, host))
  const again = await Promise.all([0, 1].map(() => heldConnection(port, host).then((c) => (c.destroy(), 'answered'), () => 'closed unread')))
  t.same(again, ['answered', 'answered'], 'calls are answered while the flood goes on')
  t.match(await busy.answer, /^HTTP\/1\.1 200[^]*late/, 'the call being answered was never cut')
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  const dropped = Number(/latchkey_connections_dropped_total\{port="proxy"\} (\d+)/.exec(metrics)?.[1])
  t.ok(dropped >= 11 && dropped <= 13, `each connection closed to make room is counted (${dropped})`)
  t.ok(s.logs.some((l) => /proxy port at its limit of 6 open connections \(sidecar\.max_connections\): for each new one the oldest carrying no call/.test(l)), 'and logged')
  busy.sock.destroy()
})

t.test('a flood of half-sent connections to the admin port cannot keep its probes out: the oldest not being answered makes room', async (t) => {
  const { s } = await startBearerRig(t)
  const admin = Number(new URL(s.sidecar.adminUrl).port)
  /** A slow-loris's connection: a request head begun and never finished. */
  const halfSent = async (): Promise<{ sock: Socket; closed: () => boolean }> => {
    const sock = connect(admin, '127.0.0.1')
    sock.on('error', () => {})
    let closed = false
    sock.once('close', () => (closed = true))
    await once(sock, 'connect')
    sock.write('GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n')
    return { sock, closed: () => closed }
  }
  const held: { sock: Socket; closed: () => boolean }[] = []
  t.teardown(() => held.forEach((h) => h.sock.destroy()))
  for (let i = 0; i < 256; i++) held.push(await halfSent())
  await new Promise((r) => setTimeout(r, 200))
  t.equal(held.filter((h) => h.closed()).length, 0, '256 half-sent connections are held')
  const probe = async (): Promise<number> => {
    const c = new Client(s.sidecar.adminUrl)
    try {
      return (await c.request({ path: '/healthz', method: 'GET', headersTimeout: 3_000 })).statusCode
    } catch {
      return 0
    } finally {
      await c.destroy()
    }
  }
  t.same(await Promise.all([probe(), probe(), probe()]), [200, 200, 200], 'probes are answered at the limit')
  t.same(held.slice(0, 3).map((h) => h.closed()), [true, true, true], 'each closed the oldest half-sent connection')
  t.equal(held.slice(3).filter((h) => h.closed()).length, 0, 'and no other')
  // The flood opens more: each takes the place of the oldest, and a probe still gets in.
  for (let i = 0; i < 20; i++) held.push(await halfSent())
  t.equal(await probe(), 200, 'a probe is answered while the flood goes on')
  const metrics = await new Client(s.sidecar.adminUrl).request({ path: '/metrics', method: 'GET' }).then((r) => r.body.text())
  t.match(metrics, /latchkey_connections_dropped_total\{port="admin"\} 2[0-5]\n/, 'each connection closed to make room is counted')
  t.ok(s.logs.some((l) => l.includes('admin port at its limit of 256 open connections (fixed): for each new one the oldest not being answered')), 'and logged')
})
