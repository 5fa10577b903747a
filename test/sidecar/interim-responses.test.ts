// Interim (1xx) responses from an upstream never reach the agent. Python's http.client (under
// requests and urllib3) takes a 103 for the final answer, so a relayed 103 left the real answer
// on the connection, where it was read as the answer to the agent's next request: an upstream
// could answer for another origin, one the agent called with a credential.
import t from 'tap'
import { connect, createServer, type Server } from 'node:net'
import { once } from 'node:events'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startTestSidecar, rawRequest, loopbackPolicy, assertNoCanary } from '../helpers/harness.js'
import { MAX_INTERIM_HEADER_BYTES, MAX_INTERIM_RESPONSES } from '../../proxy/forward/forward.js'

const run = promisify(execFile)

/** A raw upstream answering every request it reads with `answer`, keeping the connection open. */
async function rawUpstream(t: { teardown(fn: () => unknown): void }, answer: string): Promise<number> {
  const server: Server = createServer((s) => {
    s.on('error', () => {})
    let buf = ''
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1')
      for (let end = buf.indexOf('\r\n\r\n'); end !== -1; end = buf.indexOf('\r\n\r\n')) {
        buf = buf.slice(end + 4)
        s.write(answer)
      }
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  return (server.address() as { port: number }).port
}

t.test("an upstream's 103 cannot answer the agent's next call to another origin", async (t) => {
  const hinting = await rawUpstream(t, 'HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfrom hints')
  const other = await rawUpstream(t, 'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfrom other')
  const s = await startTestSidecar({
    ...loopbackPolicy([hinting, other]),
    credentials: [{ id: 'other', audience: `http://127.0.0.1:${other}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(() => s.close())

  // What urllib3 does with HTTP_PROXY: one connection to the proxy for every http:// origin.
  const py = `
import http.client, sys
c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]), timeout=10)
for url in sys.argv[2:]:
    c.request('GET', url)
    r = c.getresponse()
    print(r.status, r.read().decode())
`
  const out = await run('python3', ['-c', py, String(s.sidecar.port), `http://127.0.0.1:${hinting}/first`, `http://127.0.0.1:${other}/second`])
  t.same(out.stdout.trim().split('\n'), ['200 from hints', '200 from other'], 'each call gets its own answer')

  const raw = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${hinting}/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.match(raw.raw, /^HTTP\/1\.1 200 OK\r\n/, 'the agent sees the final response first')
  t.notMatch(raw.raw, /\b103\b/, 'and no interim response at all')

  const audit = await s.audit()
  t.same(audit.map((e) => [e.path, e.status, e.error]), [['/first', 200, null], ['/second', 200, null], ['/raw', 200, null]])
  assertNoCanary(t, s, out.stdout, raw.raw)
})

/** A raw upstream that reads a request and answers it with `interims` 1xx heads, `gapMs` apart, then `final` (none if null). */
async function interimUpstream(t: { teardown(fn: () => unknown): void }, head: string, interims: number, gapMs: number, final: string | null): Promise<number> {
  const server: Server = createServer((s) => {
    s.on('error', () => {})
    s.once('data', () => {
      let sent = 0
      const next = () => {
        if (s.destroyed) return
        if (sent++ < interims) {
          s.write(head)
          if (gapMs > 0) setTimeout(next, gapMs).unref()
          else next()
        } else if (final !== null) s.write(final)
      }
      next()
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  return (server.address() as { port: number }).port
}

t.test('interim responses do not hold a call past timeouts.headers_ms, however many come (undici restarts its timer at each)', async (t) => {
  const processing = 'HTTP/1.1 102 Processing\r\n\r\n'
  const ok = 'HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone'
  const forever = await interimUpstream(t, processing, Infinity, 100, null)
  const slowButDone = await interimUpstream(t, processing, 3, 100, ok)
  const s = await startTestSidecar({ ...loopbackPolicy([forever, slowButDone]), sidecar: { timeouts: { headers_ms: 1500 } } })
  t.teardown(() => s.close())

  const began = performance.now()
  const cut = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${forever}/wait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 2000)
  const tookMs = performance.now() - began
  t.equal(cut.status, 504, 'an upstream sending 102s without end gets a 504 (the old code held the call until the agent gave up)')
  t.match(JSON.parse(cut.body), { code: 'LK_UPSTREAM_TIMEOUT', reason: 'the upstream sent interim (1xx) responses but no final one within 1500 ms (timeouts.headers_ms)', retryable: true })
  t.ok(tookMs >= 1400 && tookMs < 6000, `at headers_ms after the first 102 (${tookMs.toFixed(0)} ms)`)

  const post = await rawRequest(s.sidecar.port, `POST http://127.0.0.1:${forever}/job HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi`, 2000)
  t.equal(post.status, 504)
  t.equal(JSON.parse(post.body).retryable, false, 'a POST the upstream was answering is not called safe to repeat')

  const done = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${slowButDone}/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 1000)
  t.same([done.status, done.body], [200, 'done'], 'a final answer after a few 102s, within the deadline, is relayed')
  t.same((await s.audit()).map((e) => [e.path, e.status, e.error]), [['/wait', 504, 'LK_UPSTREAM_TIMEOUT'], ['/job', 504, 'LK_UPSTREAM_TIMEOUT'], ['/slow', 200, null]], 'each audited as what it was')
})

t.test('a flood of interim responses is cut, by count or by bytes: each is parsed and dropped, with no agent reading to slow it', async (t) => {
  const hint = 'HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n'
  const fat = `HTTP/1.1 103 Early Hints\r\nLink: <${'a'.repeat(60 * 1024)}>\r\n\r\n`
  const ok = 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'
  const fatHeads = Math.ceil(MAX_INTERIM_HEADER_BYTES / (60 * 1024))
  const ports = [
    await interimUpstream(t, hint, MAX_INTERIM_RESPONSES + 1, 0, ok),
    await interimUpstream(t, hint, MAX_INTERIM_RESPONSES, 0, ok),
    await interimUpstream(t, fat, fatHeads + 1, 0, ok),
    await interimUpstream(t, fat, fatHeads - 1, 0, ok),
  ]
  const s = await startTestSidecar(loopbackPolicy(ports))
  t.teardown(() => s.close())
  const get = (port: number) => rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  const refusal = `the upstream sent more interim (1xx) responses than the sidecar takes before a final one (${MAX_INTERIM_RESPONSES}, or ${MAX_INTERIM_HEADER_BYTES / 1024} KiB of headers)`
  const [overCount, atCount, overBytes, underBytes] = [await get(ports[0]!), await get(ports[1]!), await get(ports[2]!), await get(ports[3]!)]
  t.same([overCount.status, JSON.parse(overCount.body).reason], [502, refusal], `${MAX_INTERIM_RESPONSES + 1} small interim responses: refused`)
  t.same([atCount.status, atCount.body], [200, 'ok'], `${MAX_INTERIM_RESPONSES}: the final answer relayed`)
  t.same([overBytes.status, JSON.parse(overBytes.body).reason], [502, refusal], `${fatHeads + 1} heads of 60 KiB: refused`)
  t.same([underBytes.status, underBytes.body], [200, 'ok'], `${fatHeads - 1} of them: the final answer relayed`)
  t.same((await s.audit()).map((e) => [e.status, e.error]), [[502, 'LK_UPSTREAM_PROTOCOL'], [200, null], [502, 'LK_UPSTREAM_PROTOCOL'], [200, null]])
})

t.test('the deadline for the final response starts when the agent has sent its body, not while it uploads', async (t) => {
  const forever = await interimUpstream(t, 'HTTP/1.1 102 Processing\r\n\r\n', Infinity, 100, null)
  const s = await startTestSidecar({ ...loopbackPolicy([forever]), sidecar: { timeouts: { headers_ms: 1500 } } })
  t.teardown(() => s.close())
  const socket = connect(s.sidecar.port, '127.0.0.1')
  await once(socket, 'connect')
  let answer = ''
  socket.on('data', (d: Buffer) => (answer += d.toString('latin1')))
  // Half the body; 102s start coming at once (the upstream answers its head).
  socket.write(`POST http://127.0.0.1:${forever}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab`)
  await new Promise((r) => setTimeout(r, 2000))
  t.equal(answer, '', 'still uploading past headers_ms: not cut')
  const bodyEnd = performance.now()
  socket.write('cd')
  // Without the deadline nothing ever comes: given up at 8 s.
  await Promise.race([once(socket, 'close'), new Promise((r) => setTimeout(r, 8000))])
  socket.destroy()
  const afterMs = performance.now() - bodyEnd
  t.match(answer, /^HTTP\/1\.1 504 /, 'then a 504')
  t.ok(afterMs >= 1400 && afterMs < 6000, `headers_ms after the body's end (${afterMs.toFixed(0)} ms)`)
})
