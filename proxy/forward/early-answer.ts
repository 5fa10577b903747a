// An upstream may answer before it has read the request body (a 413, a 401 to an upload) and close
// the connection: its kernel then resets it, and the sidecar's next body write fails (EPIPE,
// ECONNRESET) while the answer still waits, whole, in this side's receive queue. node:net
// destroys a socket on a failed write, so undici never parsed that answer: the agent got a
// retryable 502 "the upstream closed the connection" in place of the 413, and SDKs resent the
// upload. Here a write that fails because the peer has gone is reported as done instead, and the
// socket is left to read what the peer sent: the answer arrives as any response does (undici
// then resets the connection, the body unsent), or, if none came, the reset or end shows up on
// the read side as the same "closed" error it was before. undici's headers timeout bounds the wait.
import type { Socket } from 'node:net'

/** Write errors that mean the peer is gone: what it sent before going may still be unread. */
const PEER_GONE = new Set(['EPIPE', 'ECONNRESET'])

type WriteCallback = (err?: Error | null) => void
type Writer = (this: Socket, ...args: never[]) => void

/** Makes `socket`'s failed writes to a peer that has gone leave the socket to its read side (see above). */
export function readPastPeerGone(socket: Socket): void {
  const s = socket as unknown as { _write: Writer; _writev: Writer }
  s._write = wrap(s._write)
  s._writev = wrap(s._writev)
}

function wrap(write: Writer): Writer {
  return function (this: Socket, ...args: never[]) {
    const cb = args[args.length - 1] as unknown as WriteCallback
    ;(args as unknown[])[args.length - 1] = (err?: Error | null) => {
      if (err && PEER_GONE.has((err as NodeJS.ErrnoException).code ?? '') && !this.destroyed) {
        // The body being sent is lost either way; nothing more is written (each write would fail
        // the same), and the read side still holds whatever the upstream answered.
        this.cork()
        return cb(null)
      }
      cb(err)
    }
    return write.apply(this, args)
  }
}
