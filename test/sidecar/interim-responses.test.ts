// Interim (1xx) responses from an upstream never reach the agent. Python's http.client (under
// requests and urllib3) takes a 103 for the final answer, so a relayed 103 left the real answer
// on the connection, where it was read as the answer to the agent's next request: an upstream
// could answer for another origin, one the agent called with a credential.
import t from 'tap'
import { createServer, type Server } from 'node:net'
import { once } from 'node:events'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startTestSidecar, rawRequest, loopbackPolicy, assertNoCanary } from '../helpers/harness.js'

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
