// The local upstream `latchkey up` starts so a newcomer has something to call. It reports what
// arrived, and whether the credential the sidecar injected is the expected one, without ever
// echoing the credential: the agent must not see it, even here.
import { createServer, type Server } from 'node:http'
import { timingSafeEqual } from 'node:crypto'
import { once } from 'node:events'

export async function startDemoUpstream(host: string, port: number, expectedAuthorization: string): Promise<Server> {
  const expected = Buffer.from(expectedAuthorization)
  const server = createServer((req, res) => {
    const auth = Buffer.from(req.headers.authorization ?? '')
    const credential =
      auth.length === 0 ? 'none' : auth.length === expected.length && timingSafeEqual(auth, expected) ? 'injected by latchkey (verified)' : 'present but not the expected one'
    const body = JSON.stringify({ upstream: 'latchkey demo', method: req.method, path: req.url, credential }, null, 2) + '\n'
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body)
  })
  server.listen(port, host)
  await once(server, 'listening')
  return server
}
