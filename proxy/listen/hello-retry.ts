// A TLS tunnel's handshake, watched past its first ClientHello until the server's first answer
// says whether the client gets a second say. TLS 1.3's HelloRetryRequest (RFC 8446 §4.1.4) asks
// the client for another ClientHello, and that one carries a server name of its own: held to the
// first check (tunnel.ts) alone, an agent forces a retry (a key share the server does not take)
// and names another tenant of the same CDN in the second, domain fronting past the policy. So:
//   - the server's bytes go on to the agent as they come; the watch only reads its first
//     handshake message's head: a ServerHello whose random is RFC 8446's HelloRetryRequest value
//     asks for a second ClientHello, anything else ends the watch;
//   - the agent's records go on meanwhile but for handshake records (a second ClientHello sent
//     ahead, unasked), which are held until the server has answered: no real client sends one
//     before then (0-RTT data, a ChangeCipherSpec and alerts are other record types);
//   - after a retry request, the second ClientHello is read whole as the first was and judged the
//     same way before a byte of it goes on.
// Then the relay is a plain pipe. TLS 1.2 renegotiation's ClientHello is encrypted: not seen.
import { LatchkeyError } from '../errors.js'
import { readClientHello, MAX_HELLO_BUFFER } from './client-hello.js'

const RECORD_CHANGE_CIPHER_SPEC = 20
const RECORD_ALERT = 21
const RECORD_HANDSHAKE = 22
const RECORD_APPLICATION_DATA = 23
const HANDSHAKE_SERVER_HELLO = 2
/** RFC 8446 §4.1.3: a ServerHello with this random is a HelloRetryRequest (SHA-256 of "HelloRetryRequest"). */
const HELLO_RETRY_RANDOM = Buffer.from('cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c', 'hex')
/** A ServerHello's head up to the end of its random: type, length (3), legacy_version (2), random (32). */
const SERVER_HELLO_HEAD = 1 + 3 + 2 + 32
/** Records the server's first message head may be spread over before the tunnel is refused: real servers use one. */
const MAX_SERVER_HEAD_RECORDS = 8

export type WatchStep =
  /** Bytes of the agent's that may go upstream now (maybe none); `done`: the watch is over, pipe the rest. */
  | { send: Buffer; done: boolean }
  /** The tunnel is refused: why. */
  | LatchkeyError

const EMPTY = Buffer.alloc(0)

/**
 * The watch's state, fed what each side sends. `judge` holds a second ClientHello's server name
 * to what the tunnel was decided for (as the first was), returning the refusal or null.
 */
export class HelloRetryWatch {
  private phase: 'first-answer' | 'second-hello' | 'done' = 'first-answer'
  /** The agent's bytes not yet sent upstream. */
  private pending: Buffer = EMPTY
  /** Bytes left of the agent's record being passed through (its header read: not a handshake record). */
  private passLeft = 0
  /** The server's bytes read so far, up to its first message's head. */
  private serverSeen: Buffer = EMPTY

  constructor(private readonly judge: (serverName: string | null) => LatchkeyError | null) {}

  get done(): boolean {
    return this.phase === 'done'
  }

  /** The agent sent `chunk`. */
  client(chunk: Buffer): WatchStep {
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk])
    return this.drain()
  }

  /** The server sent `chunk` (on its way to the agent already). */
  server(chunk: Buffer): WatchStep {
    if (this.phase !== 'first-answer') return { send: EMPTY, done: this.done }
    this.serverSeen = this.serverSeen.length === 0 ? chunk : Buffer.concat([this.serverSeen, chunk])
    const answer = readFirstAnswer(this.serverSeen)
    if (answer === 'partial') return { send: EMPTY, done: false }
    if (answer instanceof LatchkeyError) return answer
    this.serverSeen = EMPTY
    this.phase = answer === 'retry' ? 'second-hello' : 'done'
    return this.drain()
  }

  /** Sends on what may go; holds a handshake record until the server's answer says what it is. */
  private drain(): WatchStep {
    if (this.phase === 'done') return this.take(this.pending.length, true)
    let sendable = 0
    const b = this.pending
    for (;;) {
      if (this.passLeft > 0) {
        const n = Math.min(this.passLeft, b.length - sendable)
        sendable += n
        this.passLeft -= n
        if (sendable === b.length) break
        continue
      }
      if (b.length - sendable < 5) break
      const type = b[sendable]!
      if (type === RECORD_CHANGE_CIPHER_SPEC || type === RECORD_ALERT || type === RECORD_APPLICATION_DATA) {
        this.passLeft = 5 + b.readUInt16BE(sendable + 3)
        continue
      }
      if (this.phase === 'first-answer') break
      // The second ClientHello (or what stands in its place), read as the first was.
      const hello = readClientHello(b.subarray(sendable))
      if (hello.kind === 'partial') break
      if (hello.kind === 'malformed') return new LatchkeyError('LK_BAD_REQUEST', `after the server's HelloRetryRequest, ${hello.reason}`)
      const refusal = this.judge(hello.serverName)
      if (refusal !== null) return new LatchkeyError(refusal.code, `in the ClientHello after the server's HelloRetryRequest, ${refusal.reason}`, refusal.rule)
      this.phase = 'done'
      return this.take(b.length, true)
    }
    if (b.length - sendable > MAX_HELLO_BUFFER) {
      return new LatchkeyError('LK_BAD_REQUEST', `the tunnel's TLS client sent over ${MAX_HELLO_BUFFER} bytes of handshake before the server's first answer asked for any`)
    }
    return this.take(sendable, false)
  }

  private take(n: number, done: boolean): WatchStep {
    const send = n === this.pending.length ? this.pending : this.pending.subarray(0, n)
    this.pending = n === this.pending.length ? EMPTY : this.pending.subarray(n)
    return { send, done }
  }
}

/**
 * The server's first handshake message, from the start of what it sent: a HelloRetryRequest
 * ('retry'), anything else ('other': a ServerHello, an alert, not TLS at all), or 'partial'.
 */
function readFirstAnswer(b: Buffer): 'retry' | 'other' | 'partial' | LatchkeyError {
  const head = Buffer.alloc(SERVER_HELLO_HEAD)
  let held = 0
  let at = 0
  for (let records = 0; ; records++) {
    if (b.length - at < 5) return 'partial'
    if (b[at] !== RECORD_HANDSHAKE) return records === 0 ? 'other' : new LatchkeyError('LK_UPSTREAM_PROTOCOL', "the tunnel's TLS server interrupted its first handshake message with another record type")
    if (records === MAX_SERVER_HEAD_RECORDS) return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the tunnel's TLS server spread its first handshake message's head over more than ${MAX_SERVER_HEAD_RECORDS} records`)
    const length = b.readUInt16BE(at + 3)
    const available = Math.min(length, b.length - at - 5, SERVER_HELLO_HEAD - held)
    b.copy(head, held, at + 5, at + 5 + available)
    held += available
    if (held >= 1 && head[0] !== HANDSHAKE_SERVER_HELLO) return 'other'
    if (held === SERVER_HELLO_HEAD) return head.subarray(6).equals(HELLO_RETRY_RANDOM) ? 'retry' : 'other'
    if (available < length) return 'partial'
    at += 5 + length
  }
}
