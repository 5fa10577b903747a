// A relayed WebSocket closed as the sidecar goes away (the drain): each side gets a Close frame,
// 1001 Going Away (RFC 6455 §7.4.1), so the agent's client reconnects (to the next sidecar)
// where a cut at the drain's deadline read as an abnormal closure (1006) after a reset.
//
// A Close frame can only go between two frames: bytes of a frame already begun are its payload
// to the reader, whatever they are. So the frames each way are followed as they pass (headers
// only: each payload is skipped by its length, RFC 6455 §5.2), and at the drain each direction is
// taken off its pipe: the rest of the frame under way goes, then the Close, then nothing more.
// Towards the agent what is followed is what the agent is sent (the scrubber's output on a
// credentialed socket: websocket-scrub.ts keeps every frame's length, and passes them in order).
// Towards the upstream the Close is masked, as a client's frames are (§5.1).
//
// The agent answers with its own Close, and is then ended (§7.1.1: the server closes the TCP
// connection first); whatever else comes either way is dropped. Either side not done within
// GRACE_MS (a frame half-sent that never ends, an agent that does not answer) is cut. That
// includes a credentialed message whose fragment ended on bytes the scrubber holds (they could
// begin the credential) while the next fragment does not come: they are not let go early.
//
// A relay cut on purpose (its agent or task revoked, its task ended, a new policy denying it) is
// cut at once, with no grace for a frame under way: a revocation stops the agent within the
// second, and nothing is relayed after it either way. Each side that is at a frame boundary gets
// a Close, 1008 Policy Violation (§7.4.1), and then its FIN, so the agent reads why (its error
// code, and a denial's rule) where a bare cut read as a network fault (1006); a side mid-frame
// gets its FIN without one, as a Close there would be payload.
import { randomBytes } from 'node:crypto'
import type { Socket } from 'node:net'
import type { Readable, Writable } from 'node:stream'

const GRACE_MS = 1_000
const GOING_AWAY = 1001
const REASON = 'proxy shutting down'
const POLICY_VIOLATION = 1008
/** A control frame's payload is at most 125 bytes (§5.5): 2 of them are the status code. */
const MAX_REASON_BYTES = 123

/** The relays open, by their agent's socket: what a drain closes (goAway), and what a cut closes (cutWebSocket). */
const relays = new WeakMap<Socket, ClosableWebSocket>()

/** Sends each relayed WebSocket among `sockets` its Close frames (the others are tunnels, left alone). */
export function goAway(sockets: Iterable<Socket>): void {
  for (const socket of sockets) relays.get(socket)?.goAway()
}

/**
 * If `socket` is a relayed WebSocket's agent socket, cuts it now for `code` (and a denial's
 * `rule`): nothing more relayed, a 1008 Close each way that is at a frame boundary, both sockets
 * ended (see cutWithClose). Returns whether it was one: its sockets are then not to be destroyed
 * by the caller. The agent's reason is the code and the rule, the upstream's the code alone (the
 * operator's rules are not the upstream's to read): nothing of the request, never a credential.
 */
export function cutWebSocket(socket: Socket, code: string, rule: string | null): boolean {
  return relays.get(socket)?.cutWithClose(closeReason(rule === null ? code : `${code}, rule ${rule}`), closeReason(code)) ?? false
}

/** Where a stream of frames stands, followed header by header; payloads are skipped by length. */
class FrameEdges {
  /** At most 2 + 8 length bytes + a 4-byte masking key. */
  private readonly header = Buffer.alloc(14)
  private headerLength = 0
  /** Payload bytes of the frame under way still to come. */
  private left = 0
  private opcode = 0
  /** A Close frame was whole (none more may be sent that way). */
  closed = false

  get atEdge(): boolean {
    return this.headerLength === 0 && this.left === 0
  }

  /**
   * Follows `chunk` from `from`; with `stop`, up to the first frame edge reached. Returns where it
   * stopped.
   */
  follow(chunk: Buffer, from = 0, stop = false): number {
    let i = from
    while (i < chunk.length) {
      if (this.left > 0) {
        const n = Math.min(this.left, chunk.length - i)
        i += n
        this.left -= n
        if (this.left === 0 && this.frameEnd(stop)) return i
        continue
      }
      this.header[this.headerLength++] = chunk[i++]!
      if (this.headerLength < this.headerSize()) continue
      const len7 = this.header[1]! & 0x7f
      this.left = len7 === 126 ? this.header.readUInt16BE(2) : len7 === 127 ? Number(this.header.readBigUInt64BE(2)) : len7
      this.opcode = this.header[0]! & 0x0f
      this.headerLength = 0
      if (this.left === 0 && this.frameEnd(stop)) return i
    }
    return i
  }

  /** A frame is whole; returns whether to stop there. */
  private frameEnd(stop: boolean): boolean {
    if (this.opcode === 0x8) this.closed = true
    return stop
  }

  private headerSize(): number {
    if (this.headerLength < 2) return 2
    const b1 = this.header[1]!
    const len7 = b1 & 0x7f
    return 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0) + (b1 & 0x80 ? 4 : 0)
  }
}

/** One direction of the relay: `from` piped to `to`, its frames followed. */
class Direction {
  readonly edges = new FrameEdges()
  private closing = false
  /** Our Close (or one already under way) has gone: nothing more is passed on. */
  ended = false

  constructor(
    private readonly from: Readable,
    private readonly to: Writable,
    private readonly closeFrame: () => Buffer,
    /** A Close frame came from `from` after this direction ended: the peer answered ours. */
    private readonly onAnswer: () => void,
  ) {
    from.on('data', this.onData)
  }

  /** Writes bytes to `to` that do not come through `from` (the handshake's leftovers), following them. */
  write(bytes: Buffer): void {
    this.edges.follow(bytes)
    this.send(bytes)
  }

  /**
   * Off the pipe, no error listener of its own is left on `to`: a side already ending (its peer's
   * FIN: relay.ts) is written nothing, as a write after end would be an unheard error.
   */
  private send(bytes: Buffer): void {
    if (this.to.writable) this.to.write(bytes)
  }

  /** Off the pipe now, nothing more passed on: `frame` goes only at a frame boundary, and if no Close went that way. */
  cut(frame: Buffer): void {
    this.closing = true
    this.from.unpipe(this.to)
    // Read on, and dropped: bytes left unread make the socket's close a reset (see cutWithClose).
    this.from.resume()
    if (!this.ended && this.edges.atEdge && !this.edges.closed) this.send(frame)
    this.ended = true
  }

  /** Off the pipe: the frame under way goes on, then the Close. */
  close(): void {
    this.closing = true
    this.from.unpipe(this.to)
    // unpipe pauses a stream left with no pipe: its bytes are read here from now on.
    this.from.resume()
    if (this.edges.atEdge) this.end()
  }

  private end(): void {
    this.ended = true
    if (!this.edges.closed) this.send(this.closeFrame())
  }

  private readonly onData = (chunk: Buffer): void => {
    // On the pipe, which writes the chunk: followed only.
    if (!this.closing) return void this.edges.follow(chunk)
    let i = 0
    if (!this.ended) {
      i = this.edges.follow(chunk, 0, true)
      if (i > 0) this.send(chunk.subarray(0, i))
      if (!this.edges.atEdge) return
      this.end()
    }
    // Dropped, and followed for the peer's Close.
    while (i < chunk.length) {
      const wasClosed = this.edges.closed
      i = this.edges.follow(chunk, i, true)
      if (this.edges.closed && !wasClosed) this.onAnswer()
    }
  }
}

export class ClosableWebSocket {
  private readonly toAgent: Direction
  private readonly toUpstream: Direction
  private goingAway = false
  private answered = false
  private cut = false
  /** Cut on purpose (cutWithClose): its Closes sent, its sockets ending. */
  private cutting = false

  /** `fromUpstream` is what the agent's bytes come from: the upstream socket, or the scrubber it is piped through. */
  constructor(
    private readonly client: Socket,
    private readonly upstream: Socket,
    fromUpstream: Readable,
  ) {
    this.toAgent = new Direction(fromUpstream, client, () => closeFrame(false, GOING_AWAY, REASON), () => {})
    this.toUpstream = new Direction(client, upstream, () => closeFrame(true, GOING_AWAY, REASON), () => {
      // §7.1.1: the server ends the TCP connection once the closing handshake is done.
      this.answered = true
      client.end()
    })
    relays.set(client, this)
  }

  /** Bytes for the agent written before the relay's pipes (the 101's leftovers). */
  writeToAgent(bytes: Buffer): void {
    this.toAgent.write(bytes)
  }

  /** Bytes for the upstream written before the relay's pipes (what the agent sent behind its handshake). */
  writeToUpstream(bytes: Buffer): void {
    this.toUpstream.write(bytes)
  }

  goAway(): void {
    if (this.goingAway || this.client.destroyed) return
    this.goingAway = true
    this.toAgent.close()
    this.toUpstream.close()
    this.destroyAfterGrace()
  }

  /**
   * Cut now (see cutWebSocket), each side's Close with `agentReason` and `upstreamReason`; false if
   * its sockets are already gone. Once the drain has begun closing it, a side at a boundary has had
   * its 1001 already: nothing more goes.
   *
   * Each side is then ended (FIN after its Close), not destroyed: a socket closed with bytes unread
   * sends a reset, and a peer that wrote before it read (an agent sending as the cut came) lost the
   * Close to it and read ECONNRESET, 1006 again. What either peer still sends is read and dropped;
   * the sockets close as the peers answer the FIN (relay.ts), or are destroyed after GRACE_MS.
   */
  cutWithClose(agentReason: string, upstreamReason: string): boolean {
    if (this.cutting) return true
    if (this.client.destroyed) return false
    this.cutting = true
    this.toAgent.cut(closeFrame(false, POLICY_VIOLATION, agentReason))
    this.toUpstream.cut(closeFrame(true, POLICY_VIOLATION, upstreamReason))
    this.client.end()
    this.upstream.end()
    this.destroyAfterGrace()
    return true
  }

  /** Both sockets destroyed if the agent's is not closed within GRACE_MS (either closing closes the other: relay.ts watchClose). */
  private destroyAfterGrace(): void {
    const timer = setTimeout(() => {
      this.cut = true
      this.client.destroy()
      this.upstream.destroy()
    }, GRACE_MS)
    timer.unref()
    this.client.once('close', () => clearTimeout(timer))
  }

  /** How a relay the drain closed ended (its audit reason); null if the drain did not close it. */
  get outcome(): string | null {
    if (!this.goingAway) return null
    if (!this.toAgent.ended) return `the sidecar shut down while a frame to the agent was under way, not whole within ${GRACE_MS} ms: cut without a close frame`
    const sent = 'the sidecar shut down: the WebSocket was closed with 1001 (Going Away)'
    if (this.answered) return `${sent}, and the agent answered the close`
    return this.cut ? `${sent}; not closed within ${GRACE_MS} ms: cut` : sent
  }
}

/** A Close frame, `status` and `reason`; masked (a client's) towards the upstream. */
function closeFrame(masked: boolean, status: number, reason: string): Buffer {
  const payload = Buffer.alloc(2 + reason.length)
  payload.writeUInt16BE(status, 0)
  payload.write(reason, 2, 'latin1')
  if (!masked) return Buffer.concat([Buffer.from([0x88, payload.length]), payload])
  const key = randomBytes(4)
  for (let i = 0; i < payload.length; i++) payload[i] = payload[i]! ^ key[i % 4]!
  return Buffer.concat([Buffer.from([0x88, 0x80 | payload.length]), key, payload])
}

/**
 * A Close reason: printable ASCII (a reason must be UTF-8, §5.5.1, and a client fails the
 * connection on one that is not), cut to MAX_REASON_BYTES with `...` (a rule id may be 128 long).
 */
function closeReason(text: string): string {
  const ascii = text.replace(/[^\x20-\x7e]/g, '?')
  return ascii.length > MAX_REASON_BYTES ? `${ascii.slice(0, MAX_REASON_BYTES - 3)}...` : ascii
}
