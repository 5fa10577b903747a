// Agents that stall: a request body that stops mid-way is cut after timeouts.body_ms with a 408
// LK_IDLE_TIMEOUT, audited, instead of holding the call and an upstream connection for ever; a
// body that keeps coming, however slowly, is not cut.
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startBearerRig, parseRawResponse, assertNoCanary } from '../helpers/harness.js'

/** Sends `head` and body `parts` (`gapMs` apart) on a raw connection; resolves with all it got when it closes. */
async function send(port: number, head: string, parts: string[], gapMs: number, untilMs: number): Promise<string> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  let raw = ''
  sock.on('data', (d: Buffer) => {
    raw += d.toString('latin1')
    // A complete answer (chunked or not) ends the wait as well as a close.
    if (/\r\n0\r\n\r\n$|content-length: \d+\r\n[^]*\r\n\r\n[^]+$/i.test(raw)) sock.end()
  })
  sock.write(head)
  for (const p of parts) {
    await new Promise((r) => setTimeout(r, gapMs))
    sock.write(p)
  }
  await Promise.race([once(sock, 'close'), new Promise((r) => setTimeout(r, untilMs).unref())])
  sock.destroy()
  return raw
}

t.test('a request body that stops mid-way is cut after body_ms with a 408, audited', async (t) => {
  const { s, host } = await startBearerRig(t, { fragment: () => ({ sidecar: { timeouts: { body_ms: 300 } } }) })
  const started = performance.now()
  const raw = await send(s.sidecar.port, `POST http://${host}/upload HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 100\r\n\r\n0123456789`, [], 0, 4_000)
  const r = parseRawResponse(raw)
  t.equal(r.status, 408, 'answered 408')
  t.match(r.body, /LK_IDLE_TIMEOUT/)
  t.ok(performance.now() - started < 4_000, 'within two gaps or so, not held')
  const audit = await s.audit()
  t.match(audit, [{ path: '/upload', status: 408, bytes_in: 10, error: 'LK_IDLE_TIMEOUT' }], 'audited with the bytes that were sent')
  assertNoCanary(t, s, raw)
})

t.test('a chunked request body that stops is cut the same way', async (t) => {
  const { s, host } = await startBearerRig(t, { fragment: () => ({ sidecar: { timeouts: { body_ms: 300 } } }) })
  const raw = await send(s.sidecar.port, `POST http://${host}/chunks HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n`, [], 0, 4_000)
  t.equal(parseRawResponse(raw).status, 408)
  t.match(await s.audit(), [{ path: '/chunks', status: 408, error: 'LK_IDLE_TIMEOUT' }])
})

t.test('a form checked for its _method that stops is cut the same way, and never whole upstream', async (t) => {
  // A DELETE deny makes the method matter, so a POSTed form is scanned for an override as it streams.
  const { s, host, upstream } = await startBearerRig(t, {
    fragment: (up) => ({
      policy: { default: 'deny', rules: [{ id: 'no-delete', action: 'deny', hosts: ['127.0.0.1'], methods: ['DELETE'] }, { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [up.port] }] },
      sidecar: { timeouts: { body_ms: 300 } },
    }),
  })
  const started = performance.now()
  const raw = await send(s.sidecar.port, `POST http://${host}/form HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n_method=DE`, [], 0, 4_000)
  const r = parseRawResponse(raw)
  t.equal(r.status, 408, 'answered 408, not held until the agent leaves')
  t.match(r.body, /LK_IDLE_TIMEOUT/)
  t.ok(performance.now() - started < 4_000)
  t.match(await s.audit(), [{ path: '/form', status: 408, error: 'LK_IDLE_TIMEOUT' }])
  t.equal(upstream.requests.length, 0, 'no whole request reached the upstream')
  assertNoCanary(t, s, raw)
})

t.test('a body trickled in pieces, each well within body_ms, is forwarded whole', async (t) => {
  const { s, host, upstream } = await startBearerRig(t, { fragment: () => ({ sidecar: { timeouts: { body_ms: 1_500 } } }) })
  const raw = await send(s.sidecar.port, `POST http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n`, ['01', '23', '45', '67', '89'], 100, 4_000)
  t.equal(parseRawResponse(raw).status, 200)
  t.equal(upstream.requests[0]?.body, '0123456789', 'the upstream got it all')
})

t.test('an agent that reads none of a large response for body_ms is cut, audited, and the upstream let go', async (t) => {
  let upstreamClosed = false
  const chunk = Buffer.alloc(256 * 1024, 'x')
  const { s, host } = await startBearerRig(t, {
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      res.once('close', () => (upstreamClosed = true))
      // Endless: written as fast as the sidecar takes it.
      const pump = () => {
        while (!res.destroyed && res.write(chunk));
        if (!res.destroyed) res.once('drain', pump)
      }
      pump()
      return true
    },
    fragment: () => ({ sidecar: { timeouts: { body_ms: 300 } } }),
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  // Never read: the socket stays paused, so the kernel buffers fill and the sidecar must wait.
  sock.pause()
  sock.write(`GET http://${host}/endless HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  let audit: Record<string, unknown>[] = []
  for (let i = 0; i < 100 && audit.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 50))
    audit = await s.audit()
  }
  t.match(audit, [{ path: '/endless', status: 200, error: 'LK_IDLE_TIMEOUT', reason: /read none of the response/ }], 'recorded as the agent not reading')
  for (let i = 0; i < 100 && !upstreamClosed; i++) await new Promise((r) => setTimeout(r, 20))
  t.ok(upstreamClosed, 'the upstream connection is let go')
  sock.destroy()
})
