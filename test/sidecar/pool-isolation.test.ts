// An upstream connection carries one task's calls only. Against an upstream with a CL.0 desync
// (it answers a POST without reading its body, and reads that body as the next request on the
// connection), a task could smuggle a request whose body was whatever came next on the pooled
// connection: another task's call, its injected credential included, stored where the first task
// read it back. A login an upstream ties to the connection (NTLM, Negotiate) likewise served
// whoever came next. The upstream here is a raw socket server, so it can be that broken.
import t from 'tap'
import { connect, createServer, type Socket } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startTestSidecar, rawRequest, loopbackPolicy, assertNoCanary, openTask, CANARY } from '../helpers/harness.js'

/** Answers each request with the connection it came on; `POST /ignore` leaves its body unread; `POST /comment` stores its body; `GET /comments` returns what was stored. */
async function desyncUpstream() {
  const comments: string[] = []
  /** Every request line the upstream read, with the Authorization it came with. */
  const seen: { line: string; authorization: string | null }[] = []
  let connections = 0
  const server = createServer((socket: Socket) => {
    const conn = ++connections
    let buf = Buffer.alloc(0)
    const answer = (body: string) => socket.write(`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`)
    // While an answer is held back (`/ignore-slow`), what arrives waits behind it.
    let holding = false
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      parse()
    })
    const parse = () => {
      while (!holding) {
        const end = buf.indexOf('\r\n\r\n')
        if (end === -1) return
        const head = buf.subarray(0, end).toString('latin1')
        const [method, path] = head.split(' ')
        if (!/^[A-Z]+$/.test(method ?? '')) {
          socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
          return
        }
        seen.push({ line: head.slice(0, head.indexOf('\r\n')), authorization: /\r\nauthorization: *([^\r]*)/i.exec(head)?.[1] ?? null })
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0)
        // The desync: this handler never reads its body, so the body is the next request.
        const bodyLength = path === '/ignore' || path === '/ignore-slow' ? 0 : length
        if (buf.length < end + 4 + bodyLength) return
        const body = buf.subarray(end + 4, end + 4 + bodyLength).toString('latin1')
        buf = buf.subarray(end + 4 + bodyLength)
        if (path === '/ignore-slow') {
          // Answered late: a body sent in several writes has all gone by then.
          holding = true
          setTimeout(() => {
            answer(`conn=${conn} path=${path}`)
            holding = false
            parse()
          }, 300)
        } else if (path === '/comment') {
          comments.push(body)
          answer('comment stored')
        } else if (path === '/comments') {
          answer(comments.join('\n---\n'))
        } else {
          answer(`conn=${conn} path=${path}`)
        }
      }
    }
    socket.on('error', () => {})
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as AddressInfo).port
  return { port, origin: `http://127.0.0.1:${port}`, seen, close: () => new Promise<void>((r) => server.close(() => r())) }
}

/**
 * The desync upstream and a sidecar injecting the canary into calls to it (`policy`: the
 * sidecar's policy and network fragment; by default, loopback allowed whole). Both close at the
 * test's end, the upstream first: the sidecar's pooled connections to it end with it.
 */
async function sidecarBefore(t: { teardown: (fn: () => Promise<void>) => void }, policy?: (port: number) => Record<string, unknown>) {
  const upstream = await desyncUpstream()
  const s = await startTestSidecar({
    ...(policy ? policy(upstream.port) : loopbackPolicy([upstream.port])),
    credentials: [{ id: 'up', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    const closed = upstream.close()
    await s.close()
    await closed
  })
  return { upstream, s }
}

t.test("one task's calls never share an upstream connection with another's", async (t) => {
  const { upstream, s } = await sidecarBefore(t)
  const [alice, bob] = [(await openTask(s, 'alice')).proxyAuthorization, (await openTask(s, 'bob')).proxyAuthorization]
  const call = (auth: string | null, method: string, path: string, body = '') =>
    rawRequest(
      s.sidecar.port,
      `${method} ${upstream.origin}${path} HTTP/1.1\r\nHost: x\r\n${auth ? `Proxy-Authorization: ${auth}\r\n` : ''}${body ? `Content-Length: ${Buffer.byteLength(body)}\r\n` : ''}Connection: close\r\n\r\n${body}`,
    )
  const seen: string[] = []

  const a1 = await call(alice, 'GET', '/a1')
  const a2 = await call(alice, 'GET', '/a2')
  const b1 = await call(bob, 'GET', '/b1')
  const d1 = await call(null, 'GET', '/d1')
  seen.push(a1.raw, a2.raw, b1.raw, d1.raw)
  const conn = (r: { body: string }) => /conn=(\d+)/.exec(r.body)?.[1]
  t.equal(conn(a2), conn(a1), "a task's calls still reuse its pooled connection")
  t.not(conn(b1), conn(a1), "another task's call goes on another connection")
  t.not(conn(d1), conn(a1), 'a call in no task is not put on a task\'s connection')
  t.not(conn(d1), conn(b1), '…nor a task\'s call on its connection')

  // Alice smuggles a request whose body is whatever comes next on her connection.
  const smuggled = 'POST /comment HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n'
  seen.push((await call(alice, 'POST', '/ignore', smuggled)).raw)
  const bobs = await call(bob, 'GET', '/bobs-call')
  seen.push(bobs.raw)
  t.match(bobs.body, /^conn=\d+ path=\/bobs-call$/, "bob's call got its own answer, not the smuggled request's")
  // Read with a third identity: alice's own connection is poisoned by her smuggling.
  const comments = await call(null, 'GET', '/comments')
  seen.push(comments.raw)
  t.notMatch(comments.body, /bobs-call/, "bob's request never became the body of alice's smuggled one")
  assertNoCanary(t, s, ...seen)
})

t.test('a request smuggled in a body past a CL.0 upstream never takes the next call: the connection that carried it closes after it', async (t) => {
  const { upstream, s } = await sidecarBefore(t, (port) => ({
    policy: {
      default: 'deny',
      rules: [
        { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] },
        { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [port] },
      ],
    },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] },
  }))
  const head = (method: string, path: string, length: number | null) =>
    `${method} ${upstream.origin}${path} HTTP/1.1\r\nHost: x\r\n${length !== null ? `Content-Length: ${length}\r\n` : ''}Connection: close\r\n\r\n`
  const call = (method: string, path: string, body = '') => rawRequest(s.sidecar.port, head(method, path, body ? Buffer.byteLength(body) : null) + body)
  const conn = (r: { body: string }) => /conn=(\d+)/.exec(r.body)?.[1]
  const seen: string[] = []
  const denied = await call('DELETE', '/admin/everything')
  seen.push(denied.raw)
  t.equal(denied.status, 403, 'the path is denied when asked for')

  // A body that holds no request line keeps the connection alive, as any body does.
  const before = await call('GET', '/before')
  const comment = await call('POST', '/comment', '{"text": "see https://example.com/a/b for the HTTP 1.1 spec"}')
  const after = await call('GET', '/after')
  seen.push(before.raw, comment.raw, after.raw)
  t.equal(comment.body, 'comment stored')
  t.equal(conn(after), conn(before), 'a body without a request line in it keeps the pooled connection')

  // Each body is a request line and a header left open: the next call on the connection,
  // injected credential and all, would become that header's value. In any case, and with the
  // version cut across two of the agent's writes.
  const smuggles: Array<[string, string[]]> = [
    ['as written', ['DELETE /admin/everything HTTP/1.1\r\nX-Ignore: ']],
    ['in lower case', ['DELETE /admin/lower http/1.1\r\nX-Ignore: ']],
    ['cut inside "HTTP/"', ['DELETE /admin/cut HT', 'TP/1.1\r\nX-Ignore: ']],
    ['in a later chunk', ['DELETE /admin/later ', 'HTTP/1.1\r\nX-Ignore: ']],
    // No version at all, HTTP/0.9's request line: Python's http.server reads headers after it
    // anyway, and ran it with the next call's (the injected credential's) as its own.
    ['without a version', ['GET /admin/nine\r\nX-Ignore: ']],
    ['without a version, cut inside its line', ['GET /admin/', 'nine-cut\r\nX-Ignore: ']],
    // A version llhttp (Node's http server) reads as HTTP/1.0, headers and all.
    ['as RTSP/1.0', ['GET /admin/rtsp RTSP/1.0\r\nX-Ignore: ']],
  ]
  for (const [how, parts] of smuggles) {
    const body = parts.join('')
    const socket = connect(s.sidecar.port, '127.0.0.1')
    await once(socket, 'connect')
    const got: Buffer[] = []
    socket.on('data', (c: Buffer) => got.push(c))
    // Answered after the whole body went (a body in one write, a CL.0 upstream answers at once).
    const path = parts.length > 1 ? '/ignore-slow' : '/ignore'
    socket.write(head('POST', path, Buffer.byteLength(body)) + parts[0])
    for (const part of parts.slice(1)) {
      // Apart, so the sidecar reads them as two chunks.
      await new Promise((r) => setTimeout(r, 100))
      socket.write(part)
    }
    // Its answer, whole (an early answer's connection may stay open for the rest of the body).
    for (const stop = Date.now() + 5_000; !Buffer.concat(got).includes(`path=${path}`) && Date.now() < stop; ) await new Promise((r) => setTimeout(r, 10))
    socket.destroy()
    seen.push(Buffer.concat(got).toString('latin1'))
    const next = await call('GET', '/innocent')
    seen.push(next.raw)
    t.match(next.body, /^conn=\d+ path=\/innocent$/, `${how}: the next call is answered as itself`)
  }
  t.same(
    upstream.seen.filter((r) => r.line.includes('/admin')),
    [],
    'the upstream never read a request for a denied path',
  )
  t.ok(upstream.seen.every((r) => r.authorization === 'Bearer ' + CANARY), 'every request it read carried the credential as injected')
  assertNoCanary(t, s, ...seen)
})

t.test('on an origin the policy allows whole, a smuggled request does not run unaudited in place of the next call', async (t) => {
  const { upstream, s } = await sidecarBefore(t)
  const call = (method: string, path: string, body = '') =>
    rawRequest(s.sidecar.port, `${method} ${upstream.origin}${path} HTTP/1.1\r\nHost: x\r\n${body ? `Content-Length: ${Buffer.byteLength(body)}\r\n` : ''}Connection: close\r\n\r\n${body}`)
  // With a version, and without one (HTTP/0.9's `GET /path`, whose headers Python's http.server reads all the same).
  for (const smuggled of ['DELETE /unaudited HTTP/1.1\r\nX-Ignore: ', 'GET /unaudited-0.9\r\nX-Ignore: ']) {
    await call('POST', '/ignore', smuggled)
    const next = await call('GET', '/audited')
    t.match(next.body, /^conn=\d+ path=\/audited$/, `${JSON.stringify(smuggled)}: the next call is answered as itself`)
  }
  t.notOk(upstream.seen.some((r) => r.line.includes('/unaudited')), 'the requests the audit never saw did not run')
  t.same(
    (await s.audit()).map((e) => `${String(e.method)} ${String(e.path)}`),
    ['POST /ignore', 'GET /audited', 'POST /ignore', 'GET /audited'],
    'and the audit holds what the upstream ran',
  )
})
