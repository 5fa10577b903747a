// WebSocket upgrades pass on allowed routes with the credential injected; denied ones get the
// same structured 403 as any request.
import t from 'tap'
import { createServer } from 'node:http'
import { connect, type AddressInfo } from 'node:net'
import { once } from 'node:events'
import { createHash } from 'node:crypto'
import { startTestSidecar, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

t.test('websocket through a reverse route and through absolute-form', async (t) => {
  const seen: Record<string, string | undefined>[] = []
  const ws = createServer((_req, res) => res.writeHead(426).end())
  ws.on('upgrade', (req, socket) => {
    seen.push({ url: req.url, authorization: req.headers.authorization, host: req.headers.host })
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
    socket.on('data', (d: Buffer) => socket.write(Buffer.concat([Buffer.from('echo:'), d])))
  })
  ws.listen(0, '127.0.0.1')
  await once(ws, 'listening')
  const port = (ws.address() as AddressInfo).port
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }, { id: 'ws', action: 'allow', hosts: ['127.0.0.1'], ports: [port] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] },
    routes: { live: `http://127.0.0.1:${port}` },
    credentials: [{ id: 'ws', audience: `http://127.0.0.1:${port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    ws.closeAllConnections()
    ws.close()
  })
  const handshake = (target: string) =>
    `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer agent-own\r\n\r\n`

  for (const target of ['/live/feed?x=1', `http://127.0.0.1:${port}/feed?x=1`]) {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    await once(sock, 'connect')
    sock.write(handshake(target))
    const [head] = (await once(sock, 'data')) as [Buffer]
    t.match(head.toString(), /^HTTP\/1\.1 101 Switching Protocols/, `${target}: switched`)
    t.match(head.toString(), /Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=/)
    sock.write('ping')
    const [echo] = (await once(sock, 'data')) as [Buffer]
    t.equal(echo.toString(), 'echo:ping', 'frames flow both ways')
    sock.destroy()
  }
  t.same(seen, [
    { url: '/feed?x=1', authorization: `Bearer ${CANARY}`, host: `127.0.0.1:${port}` },
    { url: '/feed?x=1', authorization: `Bearer ${CANARY}`, host: `127.0.0.1:${port}` },
  ])
  const denied = await rawRequest(s.sidecar.port, handshake('/live/admin/x'))
  t.equal(denied.status, 403)
  t.equal(denied.headers['x-latchkey-rule'], 'no-admin')
  t.equal(seen.length, 2, 'the denied upgrade never reached the upstream')
  await new Promise((r) => setTimeout(r, 1000))
  const audit = await s.audit()
  t.same(audit.map((e) => [e.via, e.status]).sort(), [['upgrade', 101], ['upgrade', 101], ['upgrade', 403]])
  assertNoCanary(t, s, denied.raw)
})
