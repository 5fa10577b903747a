// A call that waits on I/O before it is sent (here a token exchange held back by a slow broker)
// is looked at again when the wait ends: a call whose agent hung up, or whose task ended, while it
// waited sends nothing upstream, the token it was handed included, and is still recorded.
import t from 'tap'
import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http'
import { connect } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startTestBroker } from '../helpers/broker.js'
import { startTokenRig } from '../helpers/tokens.js'

/** The real broker behind a relay that holds each answer `holdMs` (a slow broker, on demand). */
async function slowBroker(brokerUrl: string, holdMs: number) {
  const target = new URL(brokerUrl)
  const srv = createServer((req: IncomingMessage, res: ServerResponse) => {
    const out = request({ host: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers }, (up) => {
      const chunks: Buffer[] = []
      up.on('data', (c: Buffer) => chunks.push(c))
      up.on('end', () => setTimeout(() => res.writeHead(up.statusCode ?? 502, up.headers).end(Buffer.concat(chunks)), holdMs))
    })
    req.pipe(out)
  })
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  return { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`, close: () => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()) }) }
}

/** Sends one proxied GET with the task's proxy credential on a raw socket; resolves once it is written. */
async function sendCall(proxyUrl: string, url: string) {
  const u = new URL(proxyUrl)
  const auth = Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')
  const socket = connect(Number(u.port), u.hostname)
  socket.on('error', () => {})
  await once(socket, 'connect')
  socket.write(`GET ${url} HTTP/1.1\r\nHost: ${new URL(url).host}\r\nProxy-Authorization: Basic ${auth}\r\n\r\n`)
  let got = ''
  socket.on('data', (d: Buffer) => (got += d.toString('latin1')))
  return { socket, got: () => got }
}

t.test('the agent hangs up, or its task ends, while its token is being minted: nothing is sent, the call is recorded', async (t) => {
  const broker = await startTestBroker()
  const slow = await slowBroker(broker.url, 600)
  const rig = await startTokenRig({ broker, brokerUrl: slow.url, sidecar: { sidecar: { broker: { timeout_ms: 5000 } } } })
  t.teardown(async () => {
    await rig.close()
    await slow.close()
  })

  const hungUp = await rig.openTask({ purpose: 'hang up', duration_s: 60 })
  const a = await sendCall(hungUp.body.proxy_url as string, `${rig.api.origin}/hung-up`)
  await new Promise((r) => setTimeout(r, 150))
  a.socket.destroy()

  const ended = await rig.openTask({ purpose: 'ended', duration_s: 60 })
  const b = await sendCall(ended.body.proxy_url as string, `${rig.api.origin}/task-ended`)
  await new Promise((r) => setTimeout(r, 150))
  const del = await fetch(`${rig.sidecar.sidecar.adminUrl}/v1/tasks/${encodeURIComponent(new URL(ended.body.proxy_url as string).password)}`, { method: 'DELETE' })
  t.equal(del.status, 204, 'the task ended while its call waited')

  // Both exchanges have come back by now, and any forward would have reached the API.
  await new Promise((r) => setTimeout(r, 1200))
  t.equal(rig.api.seen.length, 0, 'nothing reached the API: no token left the sidecar for a call that was over')
  t.notMatch(b.got(), /^HTTP\/1\.1 200/, 'the ended task got no upstream answer')
  const audit = await rig.sidecar.audit()
  t.same(
    audit.map((e) => [e.path, e.error]).sort(),
    [
      ['/hung-up', 'LK_CLIENT_CLOSED'],
      ['/task-ended', 'LK_TASK_ENDED'],
    ],
    'each call recorded once, with why it went nowhere',
  )
})
