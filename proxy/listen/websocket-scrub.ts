// WebSocket messages from the upstream on a credentialed connection, checked for the credential
// as response bodies are (forward/body-scrub.ts): an upstream that reflects what it was sent (a
// debug socket echoing its handshake, an error message quoting the token) must not hand the
// agent the secret. Frames are read as RFC 6455 §5.2 lays them out and each payload goes through
// one BodyScrubber per message, so a match is overwritten in place and every frame keeps its
// length: headers are relayed as they were, only payload bytes change.
//
// A match may cross the fragments of one message. The bytes at the end of a fragment that could
// begin one wait, as in a body, and whatever comes after them on the wire (the next fragment's
// header, a control frame between fragments, §5.4) waits behind them, in order. A message's
// last fragment releases everything. Control frames (close reason, ping, pong) are checked whole.
//
// A control frame cannot go ahead of the held bytes: they are the tail of a frame whose header,
// with its length, has gone, so the agent reads whatever comes next as that frame's payload
// (§5.4 lets a control frame in between fragments, not into one). What waits is bounded: while
// bytes are held, the frames behind them (control frames, the next fragment's header) are counted,
// each at constant cost, and past MAX_WAITING_FRAMES or MAX_WAITING_BYTES the connection is cut,
// LK_UPSTREAM_PROTOCOL. Without a bound an upstream that left a message on such a byte and then
// sent pings (or empty fragments) grew the queue without end, none of it reaching the agent.
//
// What is looked for is asked again at each message's start and for each control frame (`needles`
// given as a function): a WebSocket outlives the calls around it, and a token issued after it
// opened (another task's, a refresh) was not looked for, so an upstream streaming its request log
// down the socket handed that token over whole. Within a message the needles stay as they were:
// the bytes held at a fragment's end belong to that message's scrubber.
//
// Messages cannot be read compressed: the handshake offers no extension (upgrade.ts), and a frame
// with a reserved bit set, or masked (a server never masks, §5.1), ends the connection.
import { Transform, type TransformCallback } from 'node:stream'
import { BodyScrubber, type BodyNeedles } from '../forward/body-scrub.js'
import { LatchkeyError } from '../errors.js'

/**
 * At most this many frames wait behind held bytes. They wait only while a message stands
 * mid-fragment on bytes that could begin the credential, and no payload comes to settle them:
 * what a real server sends then is a keep-alive ping every few seconds and a pong for each of
 * the agent's pings, a few a minute. 1024 is over a quarter of an hour of one a second.
 */
export const MAX_WAITING_FRAMES = 1024
/**
 * At most this many bytes of frames wait behind held bytes: a control frame is at most 127
 * bytes and a fragment's header 10, and keep-alive pings carry a few bytes, so a real server's
 * waiting frames come to a few KiB. (The held bytes themselves are about a needle's length: what
 * may begin one, or a copy that may go on.)
 */
export const MAX_WAITING_BYTES = 64 * 1024

const enum At {
  Header,
  Payload,
  Control,
}

export class WebSocketScrubber extends Transform {
  private at = At.Header
  /** Whether the data frame being read ends its message. */
  private fin = false
  /** Header bytes read so far (at most 2 + 8: a server frame carries no masking key). */
  private readonly headerBytes = Buffer.alloc(10)
  private headerLength = 0

  /** Payload bytes of the current frame still to come. */
  private left = 0
  private control: Buffer[] = []
  private controlHeader: Buffer | null = null
  private scrubber: BodyScrubber
  /** Whether a data frame without FIN has come and its message not yet ended. */
  private inMessage = false
  /**
   * What waits behind the bytes the scrubber holds, in wire order: once they are released,
   * `after` of them are the held payload, then `bytes` go. Empty when nothing is held.
   */
  private readonly queued: { after: number; bytes: Buffer }[] = []
  /** The sum of `after` over `queued`: kept, so queueing a frame costs the same however many wait. */
  private queuedAfter = 0
  /** The sum of `bytes.length` over `queued`. */
  private queuedBytes = 0
  /** Payload bytes the scrubber holds now (it returns them, in order, before anything newer). */
  private held = 0

  /** `needles`, when a function, is asked what to look for as each message and control frame starts. */
  constructor(private readonly needles: BodyNeedles | (() => BodyNeedles)) {
    super()
    this.scrubber = new BodyScrubber(this.needlesNow())
  }

  private needlesNow(): BodyNeedles {
    return typeof this.needles === 'function' ? this.needles() : this.needles
  }

  /** The upstream closed mid-message: what is held is less than any needle, and goes as it is. */
  override _flush(done: TransformCallback): void {
    const rest = this.scrubber.end()
    if (rest) this.release(rest)
    for (const q of this.queued.splice(0)) this.send(q.bytes)
    this.held = this.queuedAfter = this.queuedBytes = 0
    this.sendAll()
    done()
  }

  /** What a chunk read from the upstream lets go, gathered: pushed once per chunk (sendAll). */
  private outgoing: Buffer[] = []

  private send(bytes: Buffer): void {
    this.outgoing.push(bytes)
  }

  /**
   * One push per chunk read, not one per frame piece: the relay writes each push to the agent's
   * socket, and a flood of empty frames (2 bytes each) cost a write apiece, 61% of the CPU; the
   * other agents' calls waited seconds (the resource probe).
   */
  private sendAll(): void {
    const out = this.outgoing
    if (out.length === 0) return
    this.outgoing = []
    this.push(out.length === 1 ? out[0] : Buffer.concat(out))
  }

  /**
   * Bytes read from the upstream and not yet passed on: held payload, the frames waiting behind
   * it, and a header or control frame not yet whole. (Not a hot path: read when a relay idles.)
   */
  get waiting(): number {
    let n = this.held + this.queuedBytes + this.headerLength
    if (this.controlHeader) n += this.controlHeader.length
    for (const c of this.control) n += c.length
    return n
  }

  /** Matches overwritten so far, across messages. */
  get found(): number {
    return this.scrubber.found
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    try {
      let i = 0
      while (i < chunk.length) {
        if (this.at === At.Header) i = this.readHeader(chunk, i)
        else {
          const n = Math.min(this.left, chunk.length - i)
          const part = chunk.subarray(i, i + n)
          i += n
          this.left -= n
          if (this.at === At.Payload) this.payload(part)
          else this.control.push(part)
          if (this.left === 0) this.frameEnd()
        }
      }
      this.sendAll()
      done()
    } catch (err) {
      this.sendAll()
      done(err as Error)
    }
  }

  /** Reads header bytes from `chunk` at `i`; returns where it stopped. */
  private readHeader(chunk: Buffer, i: number): number {
    const hb = this.headerBytes
    while (i < chunk.length && this.headerLength < this.headerSize()) hb[this.headerLength++] = chunk[i++]!
    if (this.headerLength < this.headerSize()) return i
    const len7 = hb[1]! & 0x7f
    const h = Buffer.from(hb.subarray(0, this.headerLength))
    this.headerLength = 0
    const b0 = h[0]!
    const b1 = h[1]!
    if (b0 & 0x70) throw protocolError('a frame with a reserved bit set, and no extension was negotiated')
    if (b1 & 0x80) throw protocolError('a masked frame (a server never masks, RFC 6455 §5.1)')
    let length = len7
    if (len7 === 126) length = h.readUInt16BE(2)
    else if (len7 === 127) {
      const big = h.readBigUInt64BE(2)
      if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError('a frame longer than 2^53 bytes')
      length = Number(big)
    }
    const opcode = b0 & 0x0f
    this.left = length
    if (opcode >= 0x8) {
      if (length > 125 || !(b0 & 0x80)) throw protocolError('a control frame longer than 125 bytes or fragmented')
      this.at = At.Control
      this.controlHeader = h
    } else {
      this.at = At.Payload
      this.fin = (b0 & 0x80) !== 0
      // A message starts: nothing is held (its last fragment released it all), so the scrubber can
      // be replaced when what is held for the binding changed; the function caches by that set.
      if (!this.inMessage) {
        const now = this.needlesNow()
        if (now !== this.scrubber.needles) this.scrubber = this.scrubber.lookingFor(now) ?? this.scrubber
      }
      this.inMessage = !this.fin
      this.sendOrQueue(h)
    }
    if (length === 0) this.frameEnd()
    return i
  }

  /** The size of the header being read, as far as its bytes tell: 2 until the length byte is in, then 2, 4 or 10. */
  private headerSize(): number {
    if (this.headerLength < 2) return 2
    const len7 = this.headerBytes[1]! & 0x7f
    return 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0)
  }

  private payload(part: Buffer): void {
    const out = this.scrubber.push(part)
    this.held += part.length - (out?.length ?? 0)
    if (out) this.release(out)
  }

  private frameEnd(): void {
    if (this.at === At.Control) {
      // Checked whole, on its own (≤ 125 bytes): it is no part of the message around it.
      const one = new BodyScrubber(this.needlesNow())
      const body = Buffer.concat(this.control)
      const scrubbed = Buffer.concat([one.push(body) ?? Buffer.alloc(0), one.end() ?? Buffer.alloc(0)])
      this.scrubber.found += one.found
      this.control = []
      this.sendOrQueue(Buffer.concat([this.controlHeader!, scrubbed]))
      this.controlHeader = null
    } else if (this.fin) {
      const rest = this.scrubber.end()
      if (rest) this.release(rest)
      this.held = 0
    }
    this.at = At.Header
  }

  /** Sends payload bytes the scrubber released, with whatever was queued behind them. */
  private release(out: Buffer): void {
    let from = 0
    while (this.queued.length > 0) {
      const q = this.queued[0]!
      const take = Math.min(q.after, out.length - from)
      if (take > 0) this.send(out.subarray(from, from + take))
      from += take
      q.after -= take
      this.queuedAfter -= take
      if (q.after > 0) return
      this.queued.shift()
      this.queuedBytes -= q.bytes.length
      this.send(q.bytes)
    }
    if (from < out.length) this.send(out.subarray(from))
  }

  /** Sends header or control-frame bytes now, or queues them behind the payload the scrubber holds. */
  private sendOrQueue(bytes: Buffer): void {
    if (this.held === 0 && this.queued.length === 0) {
      this.send(bytes)
      return
    }
    const after = this.held - this.queuedAfter
    this.queued.push({ after, bytes })
    this.queuedAfter += after
    this.queuedBytes += bytes.length
    if (this.queued.length > MAX_WAITING_FRAMES || this.queuedBytes > MAX_WAITING_BYTES) {
      throw protocolError(
        `more than ${MAX_WAITING_FRAMES} frames or ${MAX_WAITING_BYTES / 1024} KiB after a message fragment that ended on bytes that could begin the credential, without going on: they wait behind those bytes, and none could reach the agent`,
      )
    }
  }
}

function protocolError(what: string): LatchkeyError {
  return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream's WebSocket sent ${what}`)
}
