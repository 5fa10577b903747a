// watchBodyStall on its own. The request is a stand-in (an EventEmitter with the fields the
// watcher reads): the fault is a race, an upstream taking the buffered body in the very turn the
// check runs, which no real socket produces on demand. The real paths are in slow-clients and
// chunked-bodies.
import t from 'tap'
import { EventEmitter } from 'node:events'
import type { IncomingMessage } from 'node:http'
import { watchBodyStall } from '../proxy/forward/body-stall.js'

function standIn() {
  return Object.assign(new EventEmitter(), { socket: { bytesRead: 100, destroyed: false }, readableLength: 0, complete: false, destroyed: false })
}

t.test('bytes sent on since the last look are progress, though the socket was not read and nothing is buffered', async (t) => {
  const req = standIn()
  let sent = 0
  let stopped: Error | null = null
  // The upstream takes what was held back, a little at a time; the agent's socket is not read meanwhile.
  const taking = setInterval(() => (sent += 16_384), 5)
  watchBodyStall(req as unknown as IncomingMessage, 30, (err) => (stopped = err), () => sent)
  await new Promise((r) => setTimeout(r, 200))
  t.equal(stopped, null, 'not cut while the body goes on upstream')
  clearInterval(taking)
  await new Promise((r) => setTimeout(r, 150))
  t.match(stopped, { code: 'LK_IDLE_TIMEOUT', message: /sent none of its request body for 30 ms/ }, 'cut once nothing moves at all')
})

t.test('with nothing read, buffered or sent, the body is stalled; a buffered one is not', async (t) => {
  const idle = standIn()
  let stopped = 0
  watchBodyStall(idle as unknown as IncomingMessage, 20, () => stopped++, () => 0)
  const held = standIn()
  held.readableLength = 1024
  let heldStopped = 0
  watchBodyStall(held as unknown as IncomingMessage, 20, () => heldStopped++, () => 0)
  await new Promise((r) => setTimeout(r, 120))
  t.equal(stopped, 1, 'cut, once')
  t.equal(heldStopped, 0, 'bytes waiting in the request buffer are the upstream being slow')
  held.complete = true
})

t.test('the cut comes one gap after the last byte, not up to two', async (t) => {
  // Looked at once a gap, a byte just after a look was only seen at the next, and the cut came a
  // whole gap later: up to twice timeouts.body_ms after the agent's last byte.
  const req = standIn()
  const gap = 600
  let stoppedAt = 0
  const started = performance.now()
  watchBodyStall(req as unknown as IncomingMessage, gap, () => (stoppedAt = performance.now()), () => 0)
  // A byte half a gap in, then the last one just after the first full gap, where a look once a
  // gap had just been and the next only saw it a whole gap later.
  await new Promise((r) => setTimeout(r, gap / 2))
  req.socket.bytesRead += 10
  await new Promise((r) => setTimeout(r, gap / 2 + 30))
  req.socket.bytesRead += 10
  const lastByte = performance.now()
  await new Promise((r) => setTimeout(r, 2.5 * gap))
  t.ok(stoppedAt > 0, 'cut')
  t.ok(stoppedAt - lastByte >= gap - 5, `not before a gap without a byte (${Math.round(stoppedAt - lastByte)} ms)`)
  t.ok(stoppedAt - lastByte < 1.6 * gap, `within a gap and a half of the last byte (${Math.round(stoppedAt - lastByte)} ms), not two`)
  t.ok(stoppedAt - started > gap, 'the byte counted as progress')
})
