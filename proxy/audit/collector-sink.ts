// The AuditSink that gets every call to the collector, losing none:
//   write():  encodes the event and appends it to the spool with one write(2), synchronously;
//             with recordBeforeResponse the pipeline calls it before the response's last bytes
//             are written, so when the agent has the response the event is in the kernel and a
//             SIGKILL of the sidecar cannot lose it (a power loss can lose what came in the last
//             few tens of ms: the spool is fdatasynced LINGER_MS after an append, and on flush/close).
//             Tried first and rejected: appending from a microtask after the response was sent;
//             one run of the SIGKILL test (test/collector/faults-sidecar.test.ts) lost a completed call.
//   sender:   one gRPC Ingest stream to the collector, reading the spool in order, a few
//             batches in flight; each ack deletes the segments it fully covers. Only records
//             already fdatasynced are sent: the collector never holds a sequence a power loss
//             could take from the spool (the restarted sidecar would reuse it for another
//             event, which the collector refuses for ever). On any stream
//             error it reconnects with exponential backoff and replays from the oldest
//             unacked record; the collector dedupes what it already had.
// A full spool (spool_max_bytes) is the configured choice: "refuse" (default) keeps recording
// but makes accepting() false so the pipeline refuses new egress; "drop" keeps serving and
// counts the events it could not keep. A spool that cannot be written (ENOSPC, EIO, EROFS,
// EMFILE) is treated the same way: with "refuse", new egress stops until an append works again;
// the events that could not be appended are kept in memory (up to MAX_UNWRITTEN) and appended
// first, in order, by a retry every second.
import { BinaryWriter } from '@bufbuild/protobuf/wire'
import { credentials, makeGenericClientConstructor, Metadata, status, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js'
import { Action, AuditIngestServiceService, IngestResponse, SequencedEvent, type AuditEvent as ProtoEvent } from '../../protos/gen/latchkey/v1/audit.js'
import type { AuditEvent, AuditSink } from '../context.js'
import { Spool, SpoolError, type Cursor } from './spool.js'
import { FIELD_LIMITS, SCOPES_TOTAL_BYTES, fitUtf8 } from '../../lib/audit-limits.js'
import { revealsSecret, WITHHELD } from '../forward/scrub.js'

export interface CollectorSinkOptions {
  /** host:port of the collector's gRPC ingest. */
  address: string
  sidecarId: string
  /** Shared token, sent as a bearer; null when mTLS alone authenticates. Read at each connect: a rotated one is sent from the next stream. */
  token: (() => string) | null
  /** mTLS: the collector's CA, and this sidecar's certificate and key (CN = sidecarId). */
  tls: { ca: Buffer; cert: Buffer; key: Buffer } | null
  spoolDir: string
  segmentBytes: number
  maxBytes: number
  onFull: 'refuse' | 'drop'
  batchEvents: number
  backoffMinMs: number
  backoffMaxMs: number
  /** How long close() waits for the collector to ack what is spooled. */
  closeTimeoutMs: number
  /** Tests only: shorter liveness checks than KEEPALIVE_MS / ACK_TIMEOUT_MS. */
  liveness?: { keepaliveMs: number; keepaliveTimeoutMs: number; ackTimeoutMs: number }
  onLog?: (level: 'info' | 'warn' | 'error', fields: Record<string, unknown>, msg: string) => void
}

export interface CollectorSinkStats {
  spooled: number
  acked: number
  dropped: number
  /** Spooled events whose records were taken from the spool under the sidecar before delivery (a segment deleted or cut short). */
  lost: number
  overLimit: number
  batches: number
  reconnects: number
}

const WINDOW = 4
const LINGER_MS = 20
const BATCH_BYTES = 1024 * 1024
/**
 * The least a batch is cut to when the collector refuses one as too large: a record larger than
 * the budget still goes alone (Spool.read), so this bounds only how small batches get.
 */
const MIN_BATCH_BYTES = 16 * 1024
/** Events kept in memory while the spool cannot be written; past it refusals are counted dropped. */
const MAX_UNWRITTEN = 20_000
/** Events per append: what one all-or-nothing write must find room for. */
const APPEND_EVENTS = 256
/** A placeholder while evicting (see appendFailed). */
const DROPPED = {} as AuditEvent
const RETRY_MS = 1000
/**
 * A collector that stops answering without closing (a half-open connection, a black-holed
 * route) is noticed by HTTP/2 pings on the channel, and by a batch left unacked this long.
 */
const KEEPALIVE_MS = 10_000
const KEEPALIVE_TIMEOUT_MS = 5_000
const ACK_TIMEOUT_MS = 30_000

/** The request message written by hand from spooled bytes: no decode/re-encode per event. */
const RawIngestClient = makeGenericClientConstructor(
  { ingest: { ...AuditIngestServiceService.ingest, requestSerialize: (b: Buffer) => b } },
  'latchkey.v1.AuditIngestService',
) as unknown as new (
  address: string,
  creds: ReturnType<typeof credentials.createSsl>,
  options: Record<string, unknown>,
) => { ingest(md: Metadata): ClientDuplexStream<Buffer, IngestResponse>; close(): void }

function varintLength(n: number): number {
  let len = 1
  while (n >= 0x80) {
    n >>>= 7
    len++
  }
  return len
}

function writeVarint(buf: Buffer, at: number, n: number): number {
  while (n >= 0x80) {
    buf[at++] = (n & 0x7f) | 0x80
    n >>>= 7
  }
  buf[at++] = n
  return at
}

const ACTIONS = { allow: Action.ACTION_ALLOW, deny: Action.ACTION_DENY, report: Action.ACTION_REPORT } as const

/**
 * Every string cut to the collector's limit (lib/audit-limits.ts), marked as cut: an agent's
 * 4,879-character host name made an event the collector refused, and the sidecar resent that
 * batch for ever, delivering nothing after it.
 */
export function toProtoEvent(e: AuditEvent): ProtoEvent {
  const f = (s: string) => fitUtf8(s, FIELD_LIMITS.default)
  return {
    id: f(e.id),
    timeUnixMs: Date.parse(e.ts),
    delegation: { user: f(e.user ?? ''), agent: f(e.agent), task: f(e.task ?? '') },
    call: {
      method: f(e.method),
      scheme: f(e.scheme ?? ''),
      host: f(e.host ?? ''),
      port: e.port ?? 0,
      path: fitUtf8(e.path ?? '', FIELD_LIMITS['call.path']),
      destination: fitUtf8(e.destination ?? '', FIELD_LIMITS['call.destination']),
      address: f(e.address ?? ''),
      status: e.status,
      bytesIn: e.bytes_in,
      bytesOut: e.bytes_out,
      durationMs: e.duration_ms,
      upstreamMs: e.upstream_ms ?? undefined,
      traceId: '',
      via: e.via,
    },
    decision: { action: e.decision ? ACTIONS[e.decision] : Action.ACTION_UNSPECIFIED, rule: f(e.rule ?? ''), reason: fitUtf8(e.reason ?? '', FIELD_LIMITS['decision.reason']), error: f(e.error ?? '') },
    // The sidecar's event names the credential, never carries it; issuer-minted tokens come with their SHA-256.
    credential: e.credential ? { provider: f(e.credential.binding), audience: f(e.credential.audience), scopes: fitScopes(e.credential.scopes), jti: f(e.credential.id), tokenSha256: e.credential.token_sha256 ? Buffer.from(e.credential.token_sha256, 'hex') : Buffer.alloc(0) } : undefined,
    process: e.caller ? { pid: e.caller.pid ?? 0, uid: e.caller.uid, executable: f(e.caller.exe ?? '') } : undefined,
  }
}

/** Scopes within FIELD_LIMITS.scopes entries and SCOPES_TOTAL_BYTES in all; the rest are left out. */
function fitScopes(scopes: string[]): string[] {
  let total = 0
  let same = true
  const kept: string[] = []
  for (const s of scopes) {
    const one = fitUtf8(s, FIELD_LIMITS.default)
    total += Buffer.byteLength(one)
    if (kept.length === FIELD_LIMITS.scopes || total > SCOPES_TOTAL_BYTES) break
    // A scope cut to the limit changes the list even when every one is kept: the uncut list was
    // sent then, and the collector refused it at every resend.
    if (one !== s) same = false
    kept.push(one)
  }
  return same && kept.length === scopes.length ? scopes : kept
}

export class CollectorAuditSink implements AuditSink {
  readonly spool: Spool
  readonly stats: CollectorSinkStats = { spooled: 0, acked: 0, dropped: 0, lost: 0, overLimit: 0, batches: 0, reconnects: 0 }
  private pending: AuditEvent[] = []
  private closed = false
  private full = false
  private readonly client: InstanceType<typeof RawIngestClient>
  private call: ClientDuplexStream<Buffer, IngestResponse> | null = null
  private cursor: Cursor
  private inflight = 0
  private attempt = 0
  /**
   * The gRPC status name of the collector's last refusal of this sidecar (a wrong or stale token,
   * an ID it does not know, an agent it may not report, a clock ahead of its own), until a batch
   * is acknowledged again; null otherwise. Calls go on and are spooled meanwhile, so /readyz
   * stays OK: latchkey_audit_collector_refusing is where it shows.
   */
  refusedCode: string | null = null
  private retryTimer: NodeJS.Timeout | null = null
  private pumpTimer: NodeJS.Timeout | null = null
  /** A sync of what was appended, due LINGER_MS after the append: records are sent once synced (Spool.syncedSeq). */
  private syncTimer: NodeJS.Timeout | null = null
  private dirty = false
  private syncing = false
  private readonly ackWaiters: Array<{ seq: number; resolve: () => void }> = []
  /** When 'cannot be read' was last logged (performance.now()). */
  private readErrorLoggedAt = -Infinity
  /** The highest sequence sent on the current stream: no ack may go past it. */
  private sentSeq = 0
  private readonly sidecarField: Uint8Array
  /** Set while appends fail: the last error. */
  private failing: NodeJS.ErrnoException | null = null
  private failRetry: NodeJS.Timeout | null = null
  /** When the oldest batch in flight was sent, or the last ack came (0: nothing in flight). */
  private waitingSince = 0
  private readonly watchdog: NodeJS.Timeout
  private readonly ackTimeoutMs: number
  /**
   * A batch's byte budget: BATCH_BYTES, halved each time the collector refuses a message as larger
   * than it takes (its collector.grpc.max_batch_bytes). A batch is BATCH_BYTES of records and a
   * little more; a collector set to take 1 MiB refused it (RESOURCE_EXHAUSTED) at every resend,
   * and nothing after it was delivered.
   */
  private batchBytes = BATCH_BYTES

  /** The token the stream in progress was opened with: what an error text is checked for. */
  private sentToken: string | null = null

  constructor(private readonly o: CollectorSinkOptions) {
    if (o.maxBytes < 2 * o.segmentBytes) {
      throw new Error(`spool_max_bytes (${o.maxBytes}) must be at least twice segment_bytes (${o.segmentBytes}): acked segments are deleted only once a newer one exists`)
    }
    this.spool = new Spool(o.spoolDir, o.sidecarId, o.segmentBytes)
    const r = this.spool.recovery
    if (r.records > 0 || r.tornBytes > 0 || r.corruptBytes > 0) {
      this.log(r.corruptBytes > 0 ? 'error' : 'info', { ...r, dir: o.spoolDir }, r.corruptBytes > 0 ? 'audit spool damaged: skipped unreadable bytes' : 'audit spool recovered')
    }
    this.cursor = this.spool.start()
    const creds = o.tls ? credentials.createSsl(o.tls.ca, o.tls.key, o.tls.cert) : credentials.createInsecure()
    // The channel's own reconnect backoff (grpc-js: 1 s x1.6 up to 120 s) follows the configured
    // one: otherwise a collector back after a long outage is noticed only tens of seconds later.
    const live = o.liveness ?? { keepaliveMs: KEEPALIVE_MS, keepaliveTimeoutMs: KEEPALIVE_TIMEOUT_MS, ackTimeoutMs: ACK_TIMEOUT_MS }
    this.ackTimeoutMs = live.ackTimeoutMs
    this.client = new RawIngestClient(o.address, creds, {
      'grpc.max_send_message_length': 2 * BATCH_BYTES,
      'grpc.initial_reconnect_backoff_ms': Math.max(1, Math.min(o.backoffMinMs, o.backoffMaxMs)),
      'grpc.max_reconnect_backoff_ms': Math.max(1, o.backoffMaxMs),
      'grpc.keepalive_time_ms': live.keepaliveMs,
      'grpc.keepalive_timeout_ms': live.keepaliveTimeoutMs,
    })
    this.watchdog = setInterval(() => this.checkAcks(), Math.max(10, Math.min(5_000, live.ackTimeoutMs / 4)))
    this.watchdog.unref()
    this.sidecarField = new BinaryWriter().uint32(10).string(o.sidecarId).finish()
    this.updateFull()
    this.connect()
  }

  private scheduleSync(delayMs = LINGER_MS): void {
    if (this.syncTimer || this.syncing || this.closed) return
    this.syncTimer = setTimeout(() => {
      this.syncTimer = null
      this.syncNow()
    }, delayMs)
    this.syncTimer.unref()
  }

  /**
   * fdatasync of what was appended, then send it. Off the event loop: a synchronous fdatasync
   * showed up as p99 stalls. One sync covers everything appended before it began; what came
   * during it waits for the next. A failed sync is tried again after RETRY_MS; nothing it
   * covers is sent meanwhile.
   */
  private syncNow(): void {
    if (!this.dirty || this.syncing) return
    this.dirty = false
    this.syncing = true
    let failed = false
    this.spool
      .syncAsync()
      .then(
        () => this.pump(),
        (err: NodeJS.ErrnoException) => {
          failed = this.dirty = true
          this.log('error', { code: err.code }, 'audit spool fsync failed: what it held is not sent until a sync succeeds')
        },
      )
      .finally(() => {
        this.syncing = false
        if (this.dirty) this.scheduleSync(failed ? RETRY_MS : LINGER_MS)
      })
  }

  private log(level: 'info' | 'warn' | 'error', fields: Record<string, unknown>, msg: string): void {
    this.o.onLog?.(level, fields, msg)
  }

  readonly recordBeforeResponse = true

  write(event: AuditEvent): void {
    if (this.closed) return
    if (this.failing) {
      // The retry appends it, in order; each call trying a write that fails would not. Past
      // MAX_UNWRITTEN only refusals are let go: a call that went out is always kept (there are
      // few: no new egress is admitted meanwhile), a call refused for want of audit is not.
      if (this.pending.length < MAX_UNWRITTEN || event.error !== 'LK_AUDIT_UNAVAILABLE') this.pending.push(event)
      else this.stats.dropped++
      return
    }
    this.pending.push(event)
    this.persist()
  }

  get isFull(): boolean {
    return this.full
  }

  /** Whether appends to the spool are failing now (retried every RETRY_MS). */
  get appendFailing(): boolean {
    return this.failing !== null
  }

  /** False while the spool is full, or cannot be written, and the configured choice is to refuse new egress. */
  accepting(): boolean {
    return !((this.full || this.failing !== null) && this.o.onFull === 'refuse')
  }

  /** False while appends fail and the choice is to refuse: an event written now waits in memory, where a SIGKILL takes it. */
  keepsNow(): boolean {
    return this.failing === null || this.o.onFull !== 'refuse'
  }

  unavailableReason(): string {
    if (this.failing instanceof SpoolError) return `${this.failing.message}; no new egress until then`
    if (this.failing) return `the audit spool cannot be written (${this.failing.code ?? 'error'}); no new egress until it can`
    return 'the audit spool is full; no new egress until the collector catches up'
  }


  private updateFull(): void {
    const was = this.full
    this.full = this.spool.bytes >= this.o.maxBytes
    if (this.full !== was) {
      if (this.full) this.log('error', { bytes: this.spool.bytes, max: this.o.maxBytes, onFull: this.o.onFull }, this.o.onFull === 'refuse' ? 'audit spool full: refusing new egress until the collector catches up' : 'audit spool full: dropping audit events (counted)')
      else this.log('info', { bytes: this.spool.bytes }, 'audit spool has room again')
    }
  }

  private persist(): void {
    let events = this.pending
    if (events.length === 0) return
    this.pending = []
    if (this.full) {
      if (this.o.onFull === 'drop') {
        this.stats.dropped += events.length
        return
      }
      // refuse: calls already under way are still recorded, and so are the refusals, up to an
      // eighth over the limit; past that, refusals (calls that never left) are only counted.
      if (this.spool.bytes >= this.o.maxBytes + this.o.maxBytes / 8) {
        const kept = events.filter((e) => e.error !== 'LK_AUDIT_UNAVAILABLE')
        this.stats.dropped += events.length - kept.length
        events = kept
        if (events.length === 0) return
      }
      this.stats.overLimit += events.length
    }
    // In slices of APPEND_EVENTS, each all or nothing: a backlog after a full disk goes in as room
    // allows, not only once there is room for all of it.
    for (let from = 0; from < events.length; from += APPEND_EVENTS) {
      const slice = events.length <= APPEND_EVENTS ? events : events.slice(from, from + APPEND_EVENTS)
      try {
        let i = 0
        this.spool.append(slice.length, (seq) => SequencedEvent.encode({ sequence: seq, event: toProtoEvent(slice[i++]!) }).finish())
        this.stats.spooled += slice.length
        this.dirty = true
        this.scheduleSync()
      } catch (err) {
        this.appendFailed(err as NodeJS.ErrnoException, events.slice(from))
        break
      }
      if (this.failing && from + slice.length === events.length) {
        this.log('info', { code: this.failing.code, events: events.length }, 'audit spool writable again: what waited is spooled')
        this.failing = null
      }
    }
    events = []
    this.reportRepairs()
    this.updateFull()
    this.schedulePump()
  }

  /**
   * A segment found deleted or cut short under the sidecar (Spool.repairActive, Spool.read) was
   * rewritten from what it held, or passed over: said at error level with the sequences gone that the collector had not acked, and
   * counted (latchkey_audit_events_lost_total); after a rewrite the stream starts again
   * from the oldest record, since the offsets it read by have moved (the collector drops what it
   * already has).
   */
  private reportRepairs(): void {
    const repairs = this.spool.takeRepairs()
    if (repairs.length === 0) return
    for (const r of repairs) {
      const lost = r.lost.filter((q) => q > this.stats.acked)
      this.stats.lost += lost.length
      const what = r.rewritten ? 'rewritten from what it still held' : 'passed over'
      this.log('error', { segment: r.path, kept: r.kept, lost: lost.length, ...(lost.length > 0 ? { lost_from: lost[0], lost_to: lost[lost.length - 1] } : {}) }, `audit spool segment ${r.cause} under the sidecar: ${what}${lost.length > 0 ? '; the events it no longer holds, unacknowledged, are lost unless already in flight' : ''}`)
    }
    const call = this.call
    if (call && repairs.some((r) => r.rewritten)) {
      this.onStreamEnd(call, null)
      call.cancel()
    }
  }

  /**
   * Keeps what could not be appended, first in line for the next try (within MAX_UNWRITTEN; past
   * it, counted dropped), and tries again in RETRY_MS. accepting() is false meanwhile.
   */
  private appendFailed(err: NodeJS.ErrnoException, events: AuditEvent[]): void {
    if (!this.failing) this.log('error', { code: err.code, ...(err instanceof SpoolError ? { reason: err.message } : {}), dir: this.o.spoolDir, onFull: this.o.onFull }, this.o.onFull === 'refuse' ? 'audit spool cannot be written: refusing new egress until it can' : 'audit spool cannot be written: events kept in memory, then dropped (counted)')
    this.failing = err
    // Past MAX_UNWRITTEN, refusals go first (the newest of them): every call that went out stays.
    let kept = events.concat(this.pending)
    if (kept.length > MAX_UNWRITTEN) {
      let over = kept.length - MAX_UNWRITTEN
      for (let i = kept.length - 1; i >= 0 && over > 0; i--) {
        if (kept[i]!.error === 'LK_AUDIT_UNAVAILABLE') {
          kept[i] = DROPPED
          over--
        }
      }
      const before = kept.length
      kept = kept.filter((e) => e !== DROPPED)
      this.stats.dropped += before - kept.length
    }
    this.pending = kept
    if (!this.failRetry && !this.closed) {
      this.failRetry = setTimeout(() => {
        this.failRetry = null
        this.persist()
      }, RETRY_MS)
      this.failRetry.unref()
    }
  }

  /** Sending is off the request path: at most one pump per linger window, batching what arrived. */
  private schedulePump(): void {
    if (this.pumpTimer || !this.call) return
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null
      this.pump()
    }, LINGER_MS)
  }

  private connect(): void {
    if (this.closed || this.call) return
    const md = new Metadata()
    md.set('x-latchkey-sidecar', this.o.sidecarId)
    this.sentToken = this.o.token?.() ?? null
    if (this.sentToken) md.set('authorization', `Bearer ${this.sentToken}`)
    const call = this.client.ingest(md)
    this.call = call
    this.cursor = this.spool.start()
    this.sentSeq = this.stats.acked
    this.inflight = 0
    this.waitingSince = 0
    call.on('data', (ack: IngestResponse) => this.onAck(ack))
    call.on('error', (err: ServiceError) => this.onStreamEnd(call, err))
    call.on('end', () => this.onStreamEnd(call, null))
    this.pump()
  }

  /** A batch unacked for ackTimeoutMs: the stream is given up and opened again (the batches are resent). */
  private checkAcks(): void {
    if (!this.call || this.inflight === 0 || this.waitingSince === 0) return
    const waited = performance.now() - this.waitingSince
    if (waited < this.ackTimeoutMs) return
    this.log('warn', { waited_ms: Math.round(waited), inflight: this.inflight, unacked: this.spool.lastSeq - this.stats.acked }, 'audit stream to collector: no ack in time; reconnecting')
    this.waitingSince = 0
    const call = this.call
    this.onStreamEnd(call, null)
    call.cancel()
  }

  private onAck(ack: IngestResponse): void {
    if (ack.ackedSequence > this.sentSeq) {
      // Taken, it would let the spool delete what was never sent and stop sending what follows.
      // A collector does not do this; something else at its address (on a plaintext loopback
      // port, anything that binds it while the collector is down) might.
      this.log('error', { acked: ack.ackedSequence, sent: this.sentSeq }, 'audit stream to collector: acknowledgement of events never sent; ignored, reconnecting (is the collector what answers at this address?)')
      const call = this.call!
      this.onStreamEnd(call, null)
      call.cancel()
      return
    }
    this.attempt = 0
    this.refusedCode = null
    this.inflight = Math.max(0, this.inflight - 1)
    this.waitingSince = this.inflight > 0 ? performance.now() : 0
    this.stats.batches++
    if (ack.ackedSequence > this.stats.acked) {
      this.stats.acked = ack.ackedSequence
      this.spool.acknowledge(ack.ackedSequence)
      this.updateFull()
      for (let i = this.ackWaiters.length - 1; i >= 0; i--) {
        const w = this.ackWaiters[i]!
        if (w.seq <= ack.ackedSequence) {
          this.ackWaiters.splice(i, 1)
          w.resolve()
        }
      }
    }
    this.pump()
  }

  private onStreamEnd(call: ClientDuplexStream<Buffer, IngestResponse>, err: ServiceError | null): void {
    if (this.call !== call) return
    this.call = null
    if (this.closed) return
    if (err && err.code === status.RESOURCE_EXHAUSTED && this.batchBytes > MIN_BATCH_BYTES) {
      this.batchBytes = Math.max(MIN_BATCH_BYTES, Math.floor(this.batchBytes / 2))
      this.log('error', { code: status[err.code], reason: err.details, batch_bytes: this.batchBytes }, 'audit stream to collector: a batch was refused as too large (collector.grpc.max_batch_bytes); sending smaller ones')
    }
    if (err && err.code !== status.CANCELLED) {
      const refused = err.code === status.UNAUTHENTICATED || err.code === status.PERMISSION_DENIED || err.code === status.INVALID_ARGUMENT || err.code === status.RESOURCE_EXHAUSTED
      if (refused) this.refusedCode = status[err.code]
      const level = refused ? 'error' : 'warn'
      // Whatever answers at this address was sent the bearer token: its error text is logged only if it does not quote it.
      const reason = this.sentToken && err.details && revealsSecret(err.details, [this.sentToken]) ? WITHHELD : err.details
      this.log(level, { code: status[err.code], reason, unacked: this.spool.lastSeq - this.stats.acked, attempt: this.attempt }, 'audit stream to collector lost')
    }
    const delay = Math.min(this.o.backoffMaxMs, this.o.backoffMinMs * 2 ** this.attempt)
    this.attempt = Math.min(this.attempt + 1, 30)
    this.stats.reconnects++
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null
      this.connect()
    }, delay * (0.5 + Math.random() / 2))
    this.retryTimer.unref()
  }

  private pump(): void {
    const call = this.call
    if (!call) return
    while (this.inflight < WINDOW) {
      let batch: ReturnType<Spool['read']>
      try {
        batch = this.spool.read(this.cursor, this.o.batchEvents, this.batchBytes, this.stats.acked, this.spool.syncedSeq)
      } catch (err) {
        // A segment that cannot be opened for reading (EMFILE): tried again on the next pump.
        // Said once a minute, not at every pump (a directory deleted under the sidecar gave 30 lines a second).
        const now = performance.now()
        if (now - this.readErrorLoggedAt >= 60_000) {
          this.readErrorLoggedAt = now
          this.log('error', { code: (err as NodeJS.ErrnoException).code, dir: this.o.spoolDir }, 'audit spool cannot be read: sending paused')
        }
        this.schedulePump()
        return
      }
      const { records, cursor } = batch
      this.cursor = cursor
      // A segment found deleted by this read is said now, not at the next append.
      this.reportRepairs()
      if (this.call !== call) return
      if (records.length === 0) return
      // The IngestRequest written by hand: field 1 (sidecar_id), then field 2 (events) once per
      // record, its spooled SequencedEvent bytes copied once, straight from the read buffer.
      let size = this.sidecarField.length
      for (const r of records) size += 1 + varintLength(r.payload.length) + r.payload.length
      const msg = Buffer.allocUnsafe(size)
      msg.set(this.sidecarField)
      let at = this.sidecarField.length
      for (const r of records) {
        msg[at++] = 18
        at = writeVarint(msg, at, r.payload.length)
        msg.set(r.payload, at)
        at += r.payload.length
      }
      this.sentSeq = records[records.length - 1]!.seq
      if (this.inflight++ === 0) this.waitingSince = performance.now()
      if (!call.write(msg)) {
        call.once('drain', () => this.pump())
        return
      }
    }
  }

  /** Resolves when the collector has acknowledged `seq` (tests, shutdown). */
  waitForAck(seq: number, timeoutMs: number): Promise<boolean> {
    if (this.stats.acked >= seq) return Promise.resolve(true)
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        const i = this.ackWaiters.indexOf(w)
        if (i >= 0) this.ackWaiters.splice(i, 1)
        resolve(false)
      }, timeoutMs)
      const w = {
        seq,
        resolve: () => {
          clearTimeout(t)
          resolve(true)
        },
      }
      this.ackWaiters.push(w)
    })
  }

  flush(): Promise<void> {
    this.persist()
    try {
      this.spool.sync()
    } catch (err) {
      this.log('error', { code: (err as NodeJS.ErrnoException).code }, 'audit spool fsync failed')
    }
    this.pump()
    return Promise.resolve()
  }

  async close(): Promise<void> {
    if (this.closed) return
    await this.flush()
    // Stopping while the spool cannot be written (a pod evicted for disk pressure): what waits in
    // memory is tried until close_timeout_ms, then said to be lost, by count; never silently.
    const deadline = performance.now() + this.o.closeTimeoutMs
    while (this.pending.length > 0 && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100))
      this.persist()
    }
    let lostNow = 0
    if (this.pending.length > 0) {
      lostNow = this.pending.length
      // Refusals for want of audit never left the sidecar; the rest are calls answered otherwise,
      // most of them sent upstream: the operator's next question is how many of those.
      const refused = this.pending.filter((e) => e.error === 'LK_AUDIT_UNAVAILABLE').length
      this.stats.dropped += lostNow
      this.log('error', { lost: lostNow, calls: lostNow - refused, refused_for_audit: refused, code: this.failing?.code, dir: this.o.spoolDir }, 'audit events lost at shutdown: the spool could not be written')
      this.pending = []
    }
    const last = this.spool.lastSeq
    const delivered = await this.waitForAck(last, this.o.closeTimeoutMs)
    if (!delivered) this.log('warn', { unacked: last - this.stats.acked, dir: this.o.spoolDir }, 'audit events left in the spool for the next start')
    this.closed = true
    if (this.retryTimer) clearTimeout(this.retryTimer)
    if (this.pumpTimer) clearTimeout(this.pumpTimer)
    if (this.failRetry) clearTimeout(this.failRetry)
    if (this.syncTimer) clearTimeout(this.syncTimer)
    clearInterval(this.watchdog)
    this.call?.end()
    this.call?.cancel()
    this.call = null
    this.client.close()
    this.spool.close()
    // Events that waited to be spooled and never were make the shutdown fail (exit 1), as the
    // JSON-lines sink's does. Those dropped while running (refusals past the memory or spool
    // bounds, or under on_full: drop) were let go by design, and logged and counted then.
    if (lostNow > 0) {
      throw Object.assign(new Error(`audit.collector.spool_dir ${this.o.spoolDir}: ${lostNow} audit event(s) could not be spooled by shutdown and are lost (${this.failing?.code ?? 'the spool could not be written'})`), { code: 'LK_AUDIT_LOST' })
    }
  }
}
