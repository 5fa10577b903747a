// An agent that goes away while its call waits on the upstream: the upstream request is aborted
// (its connection closed before it answered), nothing is written back, and the call is recorded
// 499 LK_CLIENT_CLOSED. Pinned for every way a client's side ends, because the sidecar sees
// only a FIN for most of them: `socket.destroy()` (and a killed process) sends the same FIN as
// `socket.end()` or `shutdown(SHUT_WR)`, the socket still writable either way; only a reset is
// told apart. So a client that half-closes after its request gets no response (ARCHITECTURE.md,
// "A client's FIN ends its calls in flight": answering it sent calls, credential and all, for
// agents that had left; the half-close change was made and reverted for that).
import t from 'tap'
import { connect, type Socket } from 'node:net'
import { createServer } from 'node:http'
import { once } from 'node:events'
import { sidecarInFrontOf, startBearerRig } from '../helpers/harness.js'

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

t.test('an agent gone mid-upload: the upstream request is aborted at once, whatever the framing, and recorded 499', async (t) => {
  // Every upload is under way (the upstream has some of its body) when the agent leaves; none is
  // ever answered. A Content-Length body used to be stopped only by a 1 s timer meant for refusals
  // nobody reads: the upstream kept the half-sent request a second longer, and so did the record.
  const seen = new Map<string, { bytes: number; abortedAt: number | null; complete: boolean }>()
  const upstream = createServer((req, res) => {
    const rec = { bytes: 0, abortedAt: null as number | null, complete: false }
    seen.set(req.url ?? '', rec)
    req.on('data', (d: Buffer) => (rec.bytes += d.length))
    req.on('end', () => (rec.complete = true))
    res.once('close', () => {
      if (!rec.complete) rec.abortedAt = performance.now()
    })
  })
  const { s, port } = await sidecarInFrontOf(t, upstream)
  const host = `127.0.0.1:${port}`
  const part = Buffer.alloc(64 * 1024, 0x61)
  const cl = (path: string) => `POST http://${host}${path} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n`
  const chunkedHead = (path: string) => `POST http://${host}${path} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n`
  const chunk = Buffer.concat([Buffer.from(`${part.length.toString(16)}\r\n`), part, Buffer.from('\r\n')])
  const cases: [string, string, Buffer, (sock: Socket) => void][] = [
    ['/cl-end', cl('/cl-end'), part, (sock) => sock.end()],
    ['/cl-destroy', cl('/cl-destroy'), part, (sock) => sock.destroy()],
    ['/cl-reset', cl('/cl-reset'), part, (sock) => sock.resetAndDestroy()],
    ['/chunked-end', chunkedHead('/chunked-end'), chunk, (sock) => sock.end()],
    // Inside a plaintext tunnel (Node's fetch through HTTP_PROXY), parsed by the inner server.
    ['/tunnelled-cl-end', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n` + cl('/tunnelled-cl-end').replace(`http://${host}`, ''), part, (sock) => sock.end()],
  ]
  const left = new Map<string, { at: number; wall: number }>()
  for (const [path, head, body, leave] of cases) {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    let got = ''
    sock.on('data', (d: Buffer) => (got += d.toString('latin1')))
    sock.write(head)
    sock.write(body)
    const sent = Date.now()
    while ((seen.get(path)?.bytes ?? 0) < part.length && Date.now() - sent < 3000) await new Promise((r) => setTimeout(r, 5))
    t.equal(seen.get(path)?.bytes, part.length, `${path}: the upload is under way upstream`)
    left.set(path, { at: performance.now(), wall: Date.now() })
    leave(sock)
    while (seen.get(path)!.abortedAt === null && Date.now() - sent < 4000) await new Promise((r) => setTimeout(r, 5))
    const after = seen.get(path)!.abortedAt! - left.get(path)!.at
    // Generous for a loaded machine: the bug was a full second.
    t.ok(after < 500, `${path}: the upstream request was aborted ${Math.round(after)} ms after the agent left`)
    t.notOk(seen.get(path)!.complete, `${path}: and never completed upstream`)
    t.equal(got.replace(/^HTTP\/1\.1 200 Connection Established\r\n\r\n/, ''), '', `${path}: nothing was written back`)
    sock.destroy()
  }
  const audit = await s.audit()
  t.same(
    audit.map((e) => [e.path, e.status, e.error, e.bytes_in, e.reason]),
    cases.map(([path]) => [path, 499, 'LK_CLIENT_CLOSED', part.length, 'the agent closed the connection before its request body was complete']),
    'each recorded as the agent leaving mid-body, bytes_in what went on',
  )
  for (const e of audit) {
    const ended = Date.parse(e.ts as string) + (e.duration_ms as number) - left.get(e.path as string)!.wall
    t.ok(ended < 500, `${e.path as string}: the record ends ${Math.round(ended)} ms after the agent left, not a second later`)
  }
})

t.test('a whole Content-Length body then a FIN is not taken for an upload cut short', async (t) => {
  // The half-close itself is answered as before (see the top of this file: a FIN ends the call);
  // what changed for an agent gone mid-body must not reach one that sent all of its body.
  const outcomes = new Map<string, { body: string; aborted: boolean }>()
  const { s, host } = await startBearerRig(t, {
    handler: (req, res) => {
      const rec = { body: req.body, aborted: false }
      outcomes.set(req.url, rec)
      const timer = setTimeout(() => res.writeHead(200, { 'content-type': 'text/plain' }).end('late'), HOLD_MS)
      res.once('close', () => {
        clearTimeout(timer)
        rec.aborted = !res.writableEnded
      })
      return true
    },
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  // Body and FIN in one go: the parser meets the end of the stream right after the last byte.
  sock.end(`POST http://${host}/whole HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world`)
  const sent = Date.now()
  while (!outcomes.get('/whole')?.aborted && Date.now() - sent < 3000) await new Promise((r) => setTimeout(r, 10))
  t.equal(outcomes.get('/whole')?.body, 'hello world', 'the whole body reached the upstream')
  t.match(await s.audit(), [{ path: '/whole', status: 499, error: 'LK_CLIENT_CLOSED', bytes_in: 11, reason: 'the agent closed the connection before the response was complete' }])
  sock.destroy()
})
