// A request smuggled in a request body. An upstream with a CL.0 desync (it answers a request
// without reading its body) reads the body as the next request on the connection, and the next
// call sent on it as the rest of that request: a body of `DELETE /admin/x HTTP/1.1\r\nX: ` made
// the agent's next call (its request line, its headers, the injected credential) the smuggled
// request's last header. The upstream ran a request the policy denies, with the credential, and
// the audit recorded the next call in its place (on an origin allowed whole, a request the audit
// never saw). A connection carries one task's calls only (pools.ts), so this is the task's own
// next call.
// A request line names its HTTP version (`HTTP/1.1`; llhttp, Node's parser, also takes `RTSP/1.0`
// and `ICE/1.0`), so a body holding `HTTP/`, `RTSP/` or `ICE/` (in any case) may smuggle one. So may a body whose first line is a request line without a version, HTTP/0.9's
// `GET /admin/x`: Python's http.server (BaseHTTPRequestHandler, and what is built on it) reads
// headers after it all the same, and a body of `GET /admin/x\r\nX: ` made the next call's request
// line and headers, injected credential included, that request's (a POST it left unread, on
// protocol_version HTTP/1.1). A body of either kind closes the connection that carried it after
// its response, and it carries nothing more. Every other body (nearly all: JSON, forms, binary,
// text whose first line is not two words, the first a method's token) keeps its connection alive. undici decides whether a connection is
// used again when a response completes (its socket's kReset); the chunk that holds the version is
// told by identity when undici writes it to the socket, before the body's last byte goes, so
// before the response to it can complete.
import type { Socket } from 'node:net'
import undiciSymbols from 'undici/lib/core/symbols.js'

/** undici's: set on a socket, it is closed once its responses complete. */
const { kReset } = undiciSymbols
const SLASH = 0x2f
/**
 * The protocol names a request line's version is spelled with, lower case (a letter's byte | 0x20,
 * which maps no other byte to them): `HTTP/`, and the `RTSP/` and `ICE/` llhttp also reads a
 * request with headers by (Node's http server answers `GET /admin RTSP/1.0` as HTTP/1.0). `ICE/`
 * only after the space that comes before a version: bare, it ends `service/`, `device/`, `price/`,
 * which bodies hold all the time, and each would have cost its connection.
 */
const VERSION_NAMES: readonly (readonly number[])[] = [
  [0x68, 0x74, 0x74, 0x70],
  [0x72, 0x74, 0x73, 0x70],
  [0x20, 0x69, 0x63, 0x65],
]

const LF = 0x0a
/** Bytes of a body's first line read for a versionless request line: Python's http.server reads at most 65,536 (then 414). */
const MAX_LINE_BYTES = 65_537
/** A method longer than this is none any server knows (llhttp's longest is 13). */
const MAX_METHOD_BYTES = 32

/** States of a body's first line read as a request line without a version (RequestLineScanner.firstLine). */
const enum Line {
  Lead,
  Method,
  AfterMethod,
  Target,
  AfterTarget,
  Done,
}

/** Whitespace to Python's str.split() in a Latin-1 line, the line's end (LF) apart: HT, VT, FF, CR, FS-US, space, NEL, NBSP. */
function isLineSpace(b: number): boolean {
  return b === 0x20 || b === 0x09 || b === 0x0b || b === 0x0c || b === 0x0d || (b >= 0x1c && b <= 0x1f) || b === 0x85 || b === 0xa0
}

/** A byte of an HTTP token (RFC 9110 §5.6.2), as a method is spelled. */
function isTokenByte(b: number): boolean {
  return TOKEN_BYTES[b] === 1
}
const TOKEN_BYTES = new Uint8Array(256)
for (const c of "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") TOKEN_BYTES[c.charCodeAt(0)] = 1

/** Body chunks that hold the end of an `HTTP/`, or of a first line that is a versionless request line: the socket that writes one closes after its response. */
const flagged = new WeakSet<object>()

/**
 * Finds `HTTP/`, `RTSP/` or ` ICE/` (any case) in a body fed chunk by chunk, across chunk
 * boundaries. Looks only at each `/` and the four bytes before it: a pass of indexOf over bodies
 * that hold none.
 */
export class RequestLineScanner {
  /** The last four bytes fed, lower-cased, oldest first. */
  private readonly tail = [0, 0, 0, 0]
  /** Where the body's first line stands as a request line without a version (firstLine); Done once it cannot be one. */
  private line = Line.Lead
  private lineBytes = 0
  private methodBytes = 0

  /** Whether `chunk` completes a version (`HTTP/`, `RTSP/`, `ICE/`), or a first line that is a request line without a version (see watchRequestLine). */
  feed(chunk: Buffer): boolean {
    if (this.line !== Line.Done && this.firstLine(chunk)) return true
    for (let at = chunk.indexOf(SLASH); at !== -1; at = chunk.indexOf(SLASH, at + 1)) {
      for (const name of VERSION_NAMES) {
        const n = name.length
        let k = 0
        while (k < n && (at - n + k >= 0 ? chunk[at - n + k]! | 0x20 : this.tail[4 - n + k + at]!) === name[k]) k++
        if (k === n) return true
      }
    }
    this.keepTail(chunk)
    return false
  }

  /**
   * Reads the body's first line on from where the last chunk left it: whether `chunk` ends it as
   * two words (the first a method's token) and nothing more, as HTTP/0.9's request line is. Words
   * are split as Python's str.split() splits a line read as Latin-1 (so a form feed, NBSP or a CR
   * separates them too), and leading blank space and lines are passed over (nginx skips blank
   * lines before a request). A third word is a version (`HTTP/`, found by feed) or no request
   * line: either way the line is done with. Costs the first line's bytes only.
   */
  private firstLine(chunk: Buffer): boolean {
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!
      const space = isLineSpace(b)
      // Past what any server reads as a request line (Python's is 64 KiB), or a method longer than any: no request line.
      if (++this.lineBytes > MAX_LINE_BYTES) return this.done()
      switch (this.line) {
        case Line.Lead:
          if (space || b === LF) continue
          if (!isTokenByte(b)) return this.done()
          this.line = Line.Method
          this.methodBytes = 1
          continue
        case Line.Method:
          if (b === LF) return this.done()
          if (space) this.line = Line.AfterMethod
          else if (!isTokenByte(b) || ++this.methodBytes > MAX_METHOD_BYTES) return this.done()
          continue
        case Line.AfterMethod:
          if (b === LF) return this.done()
          if (!space) this.line = Line.Target
          continue
        case Line.Target:
        case Line.AfterTarget:
          if (b === LF) {
            this.line = Line.Done
            return true
          }
          if (space) this.line = Line.AfterTarget
          else if (this.line === Line.AfterTarget) return this.done()
          continue
      }
    }
    return false
  }

  private done(): false {
    this.line = Line.Done
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
 * A body's next chunk, as it goes: fed to `scanner`, and once it completes a version or a
 * versionless request line, flagged so that the connection writing it closes after its response.
 * Returns the scanner to feed the next chunk to, or null once the body has been flagged (nothing
 * more to look for).
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
