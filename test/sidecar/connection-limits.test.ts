// Floods of connections to the proxy port: past sidecar.max_connections new ones are closed
// unread, logged once per burst naming the limit, and counted on /metrics; the connections
// already open are still served, and a new one is once the flood goes.
import t from 'tap'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { Client } from 'undici'
import { startBearerRig } from '../helpers/harness.js'

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

t.test('past sidecar.max_connections, new proxy connections are closed unread, logged once and counted', async (t) => {
  const { s, host } = await startBearerRig(t, { fragment: () => ({ sidecar: { max_connections: 3 } }) })
  const port = s.sidecar.port
  const held = await Promise.all([0, 1, 2].map(() => heldConnection(port, host)))
  const extra = await Promise.all([0, 1, 2, 3].map(() => closedUnread(port, 4_000)))
  t.same(extra, [true, true, true, true], 'each connection past the limit is closed unread')
  const warns = s.logs.filter((l) => l.includes('"max_connections":3'))
  t.equal(warns.length, 1, 'one log line for the burst')
  t.match(warns[0], /proxy port at its limit of 3 open connections \(sidecar\.max_connections\)/)
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /latchkey_connections_dropped_total\{port="proxy"\} 4/, 'counted on /metrics')
  // The held connections are still served.
  held[0]!.write(`GET http://${host}/again HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  t.match(((await once(held[0]!, 'data')) as [Buffer])[0].toString(), /^HTTP\/1\.1 200/, 'an open connection is still served')
  // The admin port has its own cap: it still answers.
  t.equal((await fetch(`${s.sidecar.adminUrl}/healthz`)).status, 200, 'the admin port answers')
  // Once one goes, a new connection is accepted again (node counts the close when it sees it).
  held[1]!.destroy()
  let answered = false
  for (let i = 0; i < 50 && !answered; i++) {
    answered = await heldConnection(port, host).then(
      (c) => (c.destroy(), true),
      () => false,
    )
    if (!answered) await new Promise((r) => setTimeout(r, 20))
  }
  t.ok(answered, 'a new connection is served once there is room')
  for (const c of held) c.destroy()
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
