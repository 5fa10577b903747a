// An agent that stops sending its request body mid-way. The proxy port has no request timeout
// (long uploads work), so without this a stalled body held the call, the agent's connection and,
// once forwarding, an upstream connection for ever. Used where a body streams upstream (forward.ts).
import type { IncomingMessage } from 'node:http'
import { LatchkeyError } from '../errors.js'

/**
 * Calls `stop` with a 408 LK_IDLE_TIMEOUT once the agent has sent none of `req`'s body for
 * `gapMs` (timeouts.body_ms, as for the upstream's body the other way). Progress is the
 * connection's bytes read, looked at every quarter gap, so the cut comes between one gap and a
 * quarter more after the last byte (looked at every gap, it came up to two gaps after); a
 * body held back because the upstream is slow to take it is not the agent's stall: bytes buffered
 * unread, or bytes sent on (`sent`) since the last look. The second closes a race: an upstream
 * that took nothing for a whole gap, then took the buffer in the check's own turn, left the
 * socket unread that gap and the buffer empty, and a call the agent had sent 4 MB of was cut as
 * stalled (seen once in CI, under load).
 */
export function watchBodyStall(req: IncomingMessage, gapMs: number, stop: (err: Error) => void, sent: () => number): void {
  const socket = req.socket
  let seen = socket.bytesRead
  let sentSeen = sent()
  let lastProgress = performance.now()
  const timer = setInterval(() => {
    if (req.complete || req.destroyed || socket.destroyed) return void clearInterval(timer)
    if (socket.bytesRead !== seen || req.readableLength > 0 || sent() !== sentSeen) {
      seen = socket.bytesRead
      sentSeen = sent()
      lastProgress = performance.now()
      return
    }
    // Timers fire late, never early: a look at 3.9 quarters is not yet a gap.
    if (performance.now() - lastProgress < gapMs) return
    clearInterval(timer)
    stop(new LatchkeyError('LK_IDLE_TIMEOUT', `the agent sent none of its request body for ${gapMs} ms (timeouts.body_ms)`))
  }, Math.max(1, gapMs / 4))
  timer.unref()
  req.once('end', () => clearInterval(timer))
  req.once('close', () => clearInterval(timer))
}
