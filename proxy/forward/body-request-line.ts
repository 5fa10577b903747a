// A request smuggled in a request body. An upstream with a CL.0 desync (it answers a request
// without reading its body) reads the body as the next request on the connection, and the next
// call sent on it as the rest of that request: a body of `DELETE /admin/x HTTP/1.1\r\nX: ` made
// the agent's next call (its request line, its headers, the injected credential) the smuggled
// request's last header. The upstream ran a request the policy denies, with the credential, and
// the audit recorded the next call in its place (on an origin allowed whole, a request the audit
// never saw). A connection carries one task's calls only (pools.ts), so this is the task's own
// next call.
// Every request an upstream reads headers for names its HTTP version (`HTTP/1.1`; HTTP/0.9 has no
// headers to carry a credential), so only a body holding `HTTP/` (in any case) can smuggle one:
// the connection that carried such a body closes after its response, and carries nothing more.
// Every other body (nearly all) keeps its connection alive. undici decides whether a connection is
// used again when a response completes (its socket's kReset); the chunk that holds the version is
// told by identity when undici writes it to the socket, before the body's last byte goes, so
// before the response to it can complete.
import type { Socket } from 'node:net'
import undiciSymbols from 'undici/lib/core/symbols.js'

/** undici's: set on a socket, it is closed once its responses complete. */
const { kReset } = undiciSymbols
const SLASH = 0x2f
/** `h`, `t`, `t`, `p` (lower case: a letter's byte | 0x20, which maps no other byte to them). */
const HTTP = [0x68, 0x74, 0x74, 0x70] as const

/** Body chunks that hold the end of an `HTTP/`: the socket that writes one closes after its response. */
const flagged = new WeakSet<object>()

/**
 * Finds `HTTP/` (any case) in a body fed chunk by chunk, across chunk boundaries. Looks only at
 * each `/` and the four bytes before it: a pass of indexOf over bodies that hold none.
 */
export class RequestLineScanner {
  /** The last four bytes fed, lower-cased, oldest first. */
  private readonly tail = [0, 0, 0, 0]

  /** Whether `chunk` completes an `HTTP/` (see watchRequestLine). */
  feed(chunk: Buffer): boolean {
    for (let at = chunk.indexOf(SLASH); at !== -1; at = chunk.indexOf(SLASH, at + 1)) {
      let k = 0
      while (k < 4 && (at - 4 + k >= 0 ? chunk[at - 4 + k]! | 0x20 : this.tail[k + at]!) === HTTP[k]) k++
      if (k === 4) return true
    }
    this.keepTail(chunk)
    return false
  }

  private keepTail(chunk: Buffer): void {
    const n = chunk.length
    if (n >= 4) {
      for (let i = 0; i < 4; i++) this.tail[i] = chunk[n - 4 + i]! | 0x20
      return
    }
    // A chunk shorter than four bytes: what came before it still counts.
    for (let i = 0; i < 4 - n; i++) this.tail[i] = this.tail[i + n]!
    for (let i = 0; i < n; i++) this.tail[4 - n + i] = chunk[i]! | 0x20
  }
}

/**
 * A body's next chunk, as it goes: fed to `scanner`, and once it completes an `HTTP/`, flagged so
 * that the connection writing it closes after its response. Returns the scanner to feed the next
 * chunk to, or null once the body has been flagged (nothing more to look for).
 */
export function watchRequestLine(scanner: RequestLineScanner | null, chunk: Buffer): RequestLineScanner | null {
  if (scanner === null || !scanner.feed(chunk)) return scanner
  flagged.add(chunk)
  return null
}

/** Makes `socket` close after the response to a request whose body held a flagged chunk. */
export function closeAfterFlaggedBody(socket: Socket): void {
  const write = socket.write
  socket.write = function (this: Socket, chunk: unknown, ...rest: unknown[]): boolean {
    // Strings are undici's heads and chunk-size lines: only a Buffer can be a body's chunk.
    if (typeof chunk === 'object' && chunk !== null && flagged.has(chunk)) {
      flagged.delete(chunk)
      ;(this as unknown as Record<symbol, boolean>)[kReset] = true
    }
    return (write as (...args: unknown[]) => boolean).call(this, chunk, ...rest)
  } as typeof socket.write
}
