// An upstream connection carries one task's calls only. Against an upstream with a CL.0 desync
// (it answers a POST without reading its body, and reads that body as the next request on the
// connection), a task could smuggle a request whose body was whatever came next on the pooled
// connection: another task's call, its injected credential included, stored where the first task
// read it back. A login an upstream ties to the connection (NTLM, Negotiate) likewise served
// whoever came next. The upstream here is a raw socket server, so it can be that broken.
import t from 'tap'
import { createServer, type Socket } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startTestSidecar, rawRequest, loopbackPolicy, assertNoCanary, openTask } from '../helpers/harness.js'

/** Answers each request with the connection it came on; `POST /ignore` leaves its body unread; `POST /comment` stores its body; `GET /comments` returns what was stored. */
async function desyncUpstream() {
  const comments: string[] = []
  let connections = 0
  const server = createServer((socket: Socket) => {
    const conn = ++connections
    let buf = Buffer.alloc(0)
    const answer = (body: string) => socket.write(`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`)
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      for (;;) {
        const end = buf.indexOf('\r\n\r\n')
        if (end === -1) return
        const head = buf.subarray(0, end).toString('latin1')
        const [method, path] = head.split(' ')
        if (!/^[A-Z]+$/.test(method ?? '')) {
          socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
          return
        }
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0)
        // The desync: this handler never reads its body, so the body is the next request.
        const bodyLength = path === '/ignore' ? 0 : length
        if (buf.length < end + 4 + bodyLength) return
        const body = buf.subarray(end + 4, end + 4 + bodyLength).toString('latin1')
        buf = buf.subarray(end + 4 + bodyLength)
        if (path === '/comment') {
          comments.push(body)
          answer('comment stored')
        } else if (path === '/comments') {
          answer(comments.join('\n---\n'))
        } else {
          answer(`conn=${conn} path=${path}`)
        }
      }
    })
    socket.on('error', () => {})
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as AddressInfo).port
  return { port, origin: `http://127.0.0.1:${port}`, close: () => new Promise<void>((r) => server.close(() => r())) }
}

t.test("one task's calls never share an upstream connection with another's", async (t) => {
  const upstream = await desyncUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    credentials: [{ id: 'up', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    // The upstream first: the sidecar's pooled connections to it end with it.
    const closed = upstream.close()
    await s.close()
    await closed
  })
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
