// A task's egress ends with the task. Streams, CONNECT tunnels and WebSockets opened under a task
// are cut when the task is ended (DELETE /v1/tasks/<handle>) or expires, and recorded with
// LK_TASK_ENDED; the agent's other tasks keep theirs. All real: broker, sidecar, upstream API.
import t from 'tap'
import { once } from 'node:events'
import { connect } from 'node:net'
import { startRig, viaProxy, openStream, openTunnel, openWebSocket, until } from './rig.js'
import { framePayloads } from '../helpers/websocket-frames.js'

t.test('ending a task cuts its open streams, tunnel and WebSocket; the other task keeps its own', async (t) => {
  const { api, s } = await startRig(t, 'agent:summarizer:prod:ender')
  const ending = await s.openTask()
  const staying = await s.openTask()

  const stream = await openStream(s, ending.handle, `${api.origin}/stream`)
  t.equal(stream.status, 200)
  await until('stream flowing', () => stream.chunks() > 0)
  const { tunnel, head } = await openTunnel(s, ending.handle, api.port)
  t.match(head, /^HTTP\/1\.1 200/, 'tunnel open')
  const tunnelClosed = once(tunnel, 'close')
  // A tunnel of plain HTTP that has carried a call and sits idle: no call of its own is open.
  const plain = await openTunnel(s, ending.handle, api.port)
  plain.tunnel.write(`GET /x HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\n\r\n`)
  const [answer] = (await once(plain.tunnel, 'data')) as [Buffer]
  t.match(answer.toString(), /^HTTP\/1\.1 200/, 'a call through the plain tunnel')
  const plainClosed = once(plain.tunnel, 'close')
  const ws = await openWebSocket(s, ending.handle, api)
  const wsClosed = once(ws, 'close')
  const other = await openWebSocket(s, staying.handle, api)
  let otherClosed = false
  other.on('close', () => (otherClosed = true))

  const t0 = performance.now()
  const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks/${encodeURIComponent(ending.handle)}`, { method: 'DELETE' })
  t.equal(res.status, 204, 'task ended')
  await Promise.all([stream.ended, tunnelClosed, plainClosed, wsClosed])
  const ms = performance.now() - t0
  t.ok(ms < 1000, `the task's stream, tunnel and WebSocket were cut within a second (${ms.toFixed(1)} ms)`)
  t.ok(tunnel.destroyed && ws.destroyed)

  other.write('ping')
  const [echo] = (await once(other, 'data')) as [Buffer]
  t.equal(framePayloads(echo)[0]?.payload.toString(), 'echo:ping', "the other task's WebSocket still relays")
  t.notOk(otherClosed)
  t.equal((await viaProxy(s, staying.handle, `${api.origin}/x`)).status, 200, 'the other task still calls out')
  t.equal((await viaProxy(s, ending.handle, `${api.origin}/x`)).status, 407, 'the ended task is refused')
  other.destroy()

  await until('cut calls audited', async () => (await s.audit()).filter((e) => e.error === 'LK_TASK_ENDED').length === 4)
  const cut = (await s.audit()).filter((e) => e.error === 'LK_TASK_ENDED')
  t.same(cut.map((e) => e.via).sort(), ['absolute', 'connect', 'connect', 'upgrade'], 'the stream, both tunnels and the WebSocket, each recorded as cut')
  t.ok(cut.every((e) => e.task === ending.id && e.reason === 'the task ended'))
  t.notOk((await s.audit()).some((e) => e.task === staying.id && e.error === 'LK_TASK_ENDED'), 'nothing of the other task was cut')
})

t.test('a task that expires has its WebSocket cut by the expiry sweep', async (t) => {
  let offset = 0
  const { api, s } = await startRig(t, 'agent:summarizer:prod:expirer', { options: { now: () => Date.now() + offset } })
  const task = await s.openTask()
  const ws = await openWebSocket(s, task.handle, api)
  const closed = once(ws, 'close')
  ws.write('ping')
  t.equal(framePayloads(((await once(ws, 'data')) as [Buffer])[0])[0]?.payload.toString(), 'echo:ping', 'relaying while the task is open')
  // The rig opens tasks for 200 s: move the sidecar's clock past that; the once-a-second sweep ends it.
  offset = 201_000
  await closed
  t.ok(ws.destroyed, 'the expired task\'s WebSocket was cut')
  await until('cut audited', async () => (await s.audit()).some((e) => e.error === 'LK_TASK_ENDED' && e.task === task.id))
})

t.test('a call the upstream has, cut by its task ending before any answer: the agent gets the cut, not a refusal that reads as never sent', async (t) => {
  const { api, s } = await startRig(t, 'agent:summarizer:prod:sent')
  const task = await s.openTask()
  const sock = connect(s.sidecar.port, '127.0.0.1')
  await once(sock, 'connect')
  let received = ''
  sock.on('data', (d: Buffer) => (received += d.toString('latin1')))
  sock.on('error', () => {})
  const closed = once(sock, 'close')
  sock.write(`POST ${api.origin}/hold HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\nProxy-Authorization: Bearer ${task.handle}\r\nContent-Length: 5\r\n\r\norder`)
  await until('the upstream has the POST', () => api.paths.includes('/hold'))
  t.equal((await fetch(`${s.sidecar.adminUrl}/v1/tasks/${encodeURIComponent(task.handle)}`, { method: 'DELETE' })).status, 204)
  await closed
  t.equal(received, '', 'no response at all: a 407 would tell the agent its POST was never sent, and it was')
  await until('audited', async () => (await s.audit()).some((e) => e.path === '/hold'))
  t.match((await s.audit()).find((e) => e.path === '/hold'), { status: 0, error: 'LK_TASK_ENDED', method: 'POST' }, 'recorded as cut by the task ending, with no status')
})

