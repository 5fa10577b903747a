// An agent that goes away while its call waits on the upstream: the upstream request is aborted
// (its connection closed before it answered), nothing is written back, and the call is recorded
// 499 LK_CLIENT_CLOSED. Pinned for every way a client's side ends, because the sidecar sees
// only a FIN for most of them: `socket.destroy()` (and a killed process) sends the same FIN as
// `socket.end()` or `shutdown(SHUT_WR)`, the socket still writable either way; only a reset is
// told apart. So a client that half-closes after its request gets no response (ARCHITECTURE.md,
// "A client's FIN ends its calls in flight": answering it sent calls, credential and all, for
// agents that had left; the half-close change was made and reverted for that).
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startBearerRig } from '../helpers/harness.js'

const HOLD_MS = 1500

t.test('an agent gone while the upstream thinks: the upstream request is aborted, the call recorded 499', async (t) => {
  const outcomes = new Map<string, 'aborted' | 'answered'>()
  const { upstream, s, host } = await startBearerRig(t, {
    handler: (req, res) => {
      const timer = setTimeout(() => {
        outcomes.set(req.url, 'answered')
        res.writeHead(200, { 'content-type': 'text/plain' }).end('late')
      }, HOLD_MS)
      res.once('close', () => {
        clearTimeout(timer)
        if (!res.writableEnded) outcomes.set(req.url, 'aborted')
      })
      return true
    },
  })
  const cases: [string, string, (sock: import('node:net').Socket) => void][] = [
    ['destroy', `GET http://${host}/destroy HTTP/1.1\r\nHost: ${host}\r\n\r\n`, (sock) => sock.destroy()],
    ['reset', `GET http://${host}/reset HTTP/1.1\r\nHost: ${host}\r\n\r\n`, (sock) => sock.resetAndDestroy()],
    ['half-close after a GET', `GET http://${host}/half-close HTTP/1.1\r\nHost: ${host}\r\n\r\n`, (sock) => sock.end()],
    ['half-close after a POST body', `POST http://${host}/half-close-post HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello`, (sock) => sock.end()],
  ]
  for (const [name, request, leave] of cases) {
    const path = /^\w+ http:\/\/[^/]+(\S+)/.exec(request)![1]!
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    let got = ''
    sock.on('data', (d: Buffer) => (got += d.toString('latin1')))
    sock.write(request)
    // The call is with the upstream, which holds its answer.
    const sent = Date.now()
    while (!upstream.requests.some((r) => r.url === path) && Date.now() - sent < 2000) await new Promise((r) => setTimeout(r, 10))
    t.ok(upstream.requests.some((r) => r.url === path), `${name}: the call reached the upstream`)
    leave(sock)
    await new Promise((r) => setTimeout(r, 300))
    t.equal(outcomes.get(path), 'aborted', `${name}: the upstream request was aborted, well before the upstream would have answered`)
    t.equal(got, '', `${name}: nothing was written back`)
    sock.destroy()
  }
  const audit = await s.audit()
  t.same(
    audit.map((e) => [e.path, e.status, e.error]),
    cases.map(([, request]) => [/^\w+ http:\/\/[^/]+(\S+)/.exec(request)![1]!, 499, 'LK_CLIENT_CLOSED']),
    'each recorded as the agent having gone, not as an upstream fault',
  )
})
