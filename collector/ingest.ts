// The gRPC ingest service: one bidi stream per sidecar. The stream authenticates once (sidecar id
// + shared token in metadata, checked against the token's SHA-256 from config), then every batch
// is appended to the store in one transaction and acknowledged only after that commit. Batches on
// one stream are handled strictly in order, so an ack for sequence N covers everything the sidecar
// sent before it on this stream.
import { createHash, timingSafeEqual } from 'node:crypto'
import { status, type Metadata, type ServerDuplexStream, type ServiceError } from '@grpc/grpc-js'
import type { AuditIngestServiceServer, IngestRequest, IngestResponse } from '../protos/gen/latchkey/v1/audit.js'
import type { Logger } from '../lib/log.js'
import type { AuditStore, StoredEvent } from './store/types.js'
import { StoreError } from './store/types.js'
import type { SidecarCredential } from './config.js'
import { MAX_BATCH_EVENTS, type ReceivedBatch } from './wire.js'
import { MAX_DATE_MS } from '../lib/max-date.js'

export const SIDECAR_ID_HEADER = 'x-latchkey-sidecar'


export interface IngestStats {
  batches: number
  stored: number
  duplicates: number
  refused: number
}

/** Why a stream or a batch was not taken: the label of latchkey_collector_refusals_total. */
export type RefusalReason = 'unauthenticated' | 'wrong_sidecar' | 'too_many_events' | 'foreign_agent' | 'clock_ahead' | 'bad_batch' | 'store_unavailable' | 'internal'

/** One configured sidecar as the collector has seen it (latchkey_collector_sidecar_*). */
export interface SidecarSeen {
  /** Its ingest streams open now. */
  streams: number
  stored: number
  /** When a batch of its was last stored (ms since the epoch; 0: never since start). */
  lastBatchMs: number
}

/**
 * A name the peer sent, as quoted in a refusal (the status details and the log line): a batch of
 * up to max_batch_bytes could otherwise make both megabytes long, and grpc-js clients never see a
 * status that large (the stream just hangs).
 */
function clip(s: string): string {
  return s.length > 200 ? `${s.slice(0, 200)}… (${s.length} characters)` : s
}

function grpcError(code: status, details: string): Partial<ServiceError> {
  return { code, details, message: details }
}

export class IngestService {
  private readonly tokens: Map<string, Buffer | null>
  /** Per sidecar, whether it may report an agent: absent when its config lists no agents. */
  private readonly mayReport: Map<string, (agent: string) => boolean>
  readonly stats: IngestStats = { batches: 0, stored: 0, duplicates: 0, refused: 0 }
  /** Refusals by reason, for /metrics. */
  readonly refusals = new Map<RefusalReason, number>()
  /** Per configured sidecar: the IDs come from config, so the map (and the metrics' labels) stays that size. */
  readonly sidecars: ReadonlyMap<string, SidecarSeen>
  private readonly streams = new Set<ServerDuplexStream<IngestRequest, IngestResponse>>()

  constructor(
    private readonly store: AuditStore,
    sidecars: SidecarCredential[],
    private readonly log: Logger,
    /** Called with each batch's newly stored events, after the commit (fan-out). */
    private readonly onStored: (events: StoredEvent[]) => void = () => {},
    /** Streams arrive over mTLS: the sidecar is the client certificate's CN. */
    private readonly mtls = false,
    /** collector.grpc.max_clock_skew_ms: an event dated further past the collector's clock is refused. */
    private readonly maxClockSkewMs = 300_000,
  ) {
    this.tokens = new Map(sidecars.map((s) => [s.id, s.token_sha256 ? Buffer.from(s.token_sha256, 'hex') : null]))
    this.mayReport = new Map(sidecars.filter((s) => s.agents).map((s) => [s.id, agentMatcher(s.agents!)]))
    this.sidecars = new Map(sidecars.map((s) => [s.id, { streams: 0, stored: 0, lastBatchMs: 0 }]))
  }

  /** A stream or batch refused for what it is (stats.refused counts these, not the store's failures). */
  private refuse(reason: RefusalReason): void {
    this.stats.refused++
    this.count(reason)
  }

  private count(reason: RefusalReason): void {
    this.refusals.set(reason, (this.refusals.get(reason) ?? 0) + 1)
  }

  /** Returns the authenticated sidecar id, or the reason it is refused (never quoting the token). */
  authenticate(md: Metadata, certCn?: string): { id: string } | { refused: string } {
    const claimed = md.get(SIDECAR_ID_HEADER)[0]
    let id: string
    if (this.mtls) {
      // The TLS layer already refused certificates the client CA did not sign.
      if (!certCn) return { refused: 'client certificate has no CN' }
      if (typeof claimed === 'string' && claimed && claimed !== certCn) return { refused: `metadata names sidecar "${clip(claimed)}" but the client certificate is "${clip(certCn)}"` }
      id = certCn
    } else {
      if (typeof claimed !== 'string' || !claimed) return { refused: `missing ${SIDECAR_ID_HEADER} metadata` }
      id = claimed
    }
    if (!this.tokens.has(id)) return { refused: `sidecar "${clip(id)}" is not known to this collector` }
    const want = this.tokens.get(id)
    if (!want) return { id } // mTLS only: no token configured for it
    const auth = md.get('authorization')[0]
    const m = typeof auth === 'string' ? /^Bearer (\S+)$/.exec(auth) : null
    if (!m) return { refused: `sidecar "${id}": missing bearer token` }
    const got = createHash('sha256').update(m[1]!).digest()
    if (!timingSafeEqual(got, want)) return { refused: `sidecar "${id}": token does not match` }
    return { id }
  }

  implementation(): AuditIngestServiceServer {
    return { ingest: (call) => void this.handle(call) }
  }

  /** Ends every open stream (collector shutdown): sidecars reconnect and resend what was unacked. */
  closeStreams(): void {
    for (const s of this.streams) s.emit('error', grpcError(status.UNAVAILABLE, 'collector shutting down'))
  }

  private async handle(call: ServerDuplexStream<IngestRequest, IngestResponse>): Promise<void> {
    const cn = call.getAuthContext()?.sslPeerCertificate?.subject?.CN
    const auth = this.authenticate(call.metadata, Array.isArray(cn) ? undefined : cn)
    if ('refused' in auth) {
      this.refuse('unauthenticated')
      this.log.warn({ peer: call.getPeer(), reason: auth.refused }, 'ingest stream refused')
      call.emit('error', grpcError(status.UNAUTHENTICATED, auth.refused))
      return
    }
    const id = auth.id
    const seen = this.sidecars.get(id)!
    this.streams.add(call)
    seen.streams++
    // Once per stream, however it ends (end, error, cancel, or the collector closing it).
    let open = true
    const closed = () => {
      this.streams.delete(call)
      if (open) seen.streams--
      open = false
    }
    this.log.info({ sidecar: id, peer: call.getPeer() }, 'ingest stream open')
    // Strictly one batch at a time: the stream is paused while a batch is being stored.
    let chain: Promise<void> = Promise.resolve()
    let failed = false
    const fail = (err: unknown) => {
      if (failed) return
      failed = true
      closed()
      if (call.cancelled || call.destroyed) return
      call.emit('error', this.toStatus(id, err))
    }
    call.on('data', (req: IngestRequest) => {
      call.pause()
      chain = chain.then(async () => {
        if (failed) return
        try {
          if (req.sidecarId !== id) {
            this.refuse('wrong_sidecar')
            throw grpcError(status.PERMISSION_DENIED, `batch names sidecar "${clip(req.sidecarId)}" but the stream authenticated as "${id}"`)
          }
          const oversized = (req as ReceivedBatch).oversized
          if (oversized !== undefined) {
            this.refuse('too_many_events')
            throw grpcError(status.INVALID_ARGUMENT, `batch of ${oversized} events: at most ${MAX_BATCH_EVENTS} per batch (a sidecar's audit.collector.batch_events cannot be more)`)
          }
          const may = this.mayReport.get(id)
          const foreign = may ? req.events.find((e) => !may(e.event?.delegation?.agent ?? '')) : undefined
          if (foreign) {
            // A sidecar's token vouches for its own agents only: another's calls are not its to report.
            this.refuse('foreign_agent')
            throw grpcError(status.PERMISSION_DENIED, `sequence ${foreign.sequence} names agent "${(foreign.event?.delegation?.agent ?? '').slice(0, 200)}", which sidecar "${id}" may not report (collector.sidecars[].agents)`)
          }
          // An event from the future would show in every "since" query until that day comes (one
          // dated 2076 in every `--since 24h`). Past times stay allowed: spools drain late. A
          // refused batch stays spooled, and is taken once the collector's clock is near its time.
          const limit = Date.now() + this.maxClockSkewMs
          // Times past the last a Date holds are the store's to refuse (it names them so).
          const ahead = req.events.find((e) => (e.event?.timeUnixMs ?? 0) > limit && (e.event?.timeUnixMs ?? 0) <= MAX_DATE_MS)
          if (ahead) {
            this.refuse('clock_ahead')
            const ts = ahead.event!.timeUnixMs
            throw grpcError(
              status.INVALID_ARGUMENT,
              `sequence ${ahead.sequence} is dated ${new Date(ts).toISOString()}, ${Math.round((ts - Date.now()) / 1000)} s ahead of the collector's clock (collector.grpc.max_clock_skew_ms is ${this.maxClockSkewMs}): check the sidecar's clock; the batch stays spooled`,
            )
          }
          const r = await this.store.append(id, req.events)
          this.stats.batches++
          this.stats.stored += r.stored
          this.stats.duplicates += r.duplicates
          seen.stored += r.stored
          seen.lastBatchMs = Date.now()
          if (r.events.length > 0) this.onStored(r.events)
          if (call.cancelled || call.destroyed) return
          call.write({ sidecarId: id, ackedSequence: r.highest, stored: r.stored, duplicates: r.duplicates })
          call.resume()
        } catch (err) {
          fail(err)
        }
      })
    })
    call.on('end', () => {
      void chain.then(() => {
        closed()
        if (!failed && !call.cancelled) call.end()
      })
    })
    call.on('error', closed)
    call.on('cancelled', closed)
  }

  private toStatus(id: string, err: unknown): Partial<ServiceError> {
    if (err instanceof StoreError) {
      this.count(err.code === 'LK_STORE_BAD_BATCH' ? 'bad_batch' : 'store_unavailable')
      this.log.error({ sidecar: id, code: err.code, err: err.message }, 'ingest batch not stored')
      return grpcError(err.code === 'LK_STORE_BAD_BATCH' ? status.INVALID_ARGUMENT : status.UNAVAILABLE, err.message)
    }
    if (err && typeof err === 'object' && 'code' in err && typeof (err as ServiceError).code === 'number') {
      const e = err as Partial<ServiceError>
      this.log.warn({ sidecar: id, code: e.code, reason: e.details }, 'ingest stream refused')
      return e
    }
    this.count('internal')
    this.log.error({ sidecar: id, err: { type: (err as Error)?.name, message: (err as Error)?.message } }, 'ingest failed')
    return grpcError(status.INTERNAL, 'collector error')
  }
}

/** Exact agent IDs, or prefixes written with a trailing `*`. */
function agentMatcher(patterns: string[]): (agent: string) => boolean {
  const exact = new Set(patterns.filter((p) => !p.endsWith('*')))
  const prefixes = patterns.filter((p) => p.endsWith('*')).map((p) => p.slice(0, -1))
  return (agent) => exact.has(agent) || prefixes.some((p) => agent.startsWith(p))
}
