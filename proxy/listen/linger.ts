// Answering before the agent has sent all of its request body (a refusal, an upstream's early
// 401) ends the connection: the rest of the body cannot be trusted as the next request. Closing
// at once, with the agent's bytes still arriving, makes the kernel reset the connection, and a
// reset can destroy the answer before the agent reads it (curl: "000", Python: ECONNRESET).
// So the sidecar closes as a careful server does: it sends the answer and its FIN, reads and
// drops what the agent still sends until the agent closes too, and gives up after a bound.
import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'

/** How long an agent that keeps sending after its answer is read from before the connection is cut. */
const LINGER_MS = 2_000

/**
 * Connections that take no further request: a response is closing them (Pipeline.isTurnOf
 * records what was pipelined behind as not sent, decided by nobody, never given a credential).
 */
export const closingSockets = new WeakSet<Socket>()

/** Call before a response that will close the connection while `req`'s body is still arriving. */
export function lingerOnClose(req: IncomingMessage): void {
  const socket = req.socket
  if (!socket || req.complete) return
  // What node:http parses from the rest of the stream is not a request: the agent sent it
  // expecting the body before it to be read (an early 401 or 413 left it unread).
  closingSockets.add(socket)
  // Flowing with no listener: whatever more of the body arrives is read and dropped.
  req.resume()
  // node:http ends a connection it will not keep alive with destroySoon() once the response is
  // written; this one half-closes instead, and is destroyed when the agent closes or time is up.
  socket.destroySoon = function (this: Socket) {
    if (this.writable) this.end()
    const cut = setTimeout(() => this.destroy(), LINGER_MS).unref()
    this.once('close', () => clearTimeout(cut))
    this.once('end', () => this.destroy())
  }
}
