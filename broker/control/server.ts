// The broker's side of the control stream: a gRPC server on its own port. Each sidecar opens one
// Watch; it is authenticated (shared token, compared in constant time) and gets a snapshot of every
// revocation and the current policy bundle, then each change as it happens (fed by
// RevocationList.onChange and the policy holder), and a heartbeat every heartbeat_ms so a
// sidecar can tell a quiet stream from a dead one.
import { createHash, timingSafeEqual } from 'node:crypto'
import { Server, ServerCredentials, status, type ServerWritableStream, type ServiceError } from '@grpc/grpc-js'
import {
  ControlServiceService,
  RevocationKind as WireKind,
  type Revocation as WireRevocation,
  type WatchRequest,
  type WatchResponse,
} from '../../protos/gen/latchkey/v1/control.js'
import type { Logger } from '../../lib/log.js'
import type { RevocationList, RevocationChange } from '../revocations/list.js'
import { agentMatches } from '../../lib/agent-pattern.js'
import type { Revocation, RevocationKind } from '../revocations/store.js'
import { listenError } from '../../lib/listen-error.js'

export const SIDECAR_HEADER = 'x-latchkey-sidecar'

const TO_WIRE: Record<RevocationKind, WireKind> = { agent: WireKind.REVOCATION_KIND_AGENT, task: WireKind.REVOCATION_KIND_TASK, jti: WireKind.REVOCATION_KIND_JTI }

export function revocationToWire(r: Revocation): WireRevocation {
  return { kind: TO_WIRE[r.kind], value: r.value, reason: r.reason, createdUnixMs: r.created_at }
}

function grpcError(code: status, details: string): Partial<ServiceError> {
  return { code, details, message: details }
}

interface Watcher {
  call: ServerWritableStream<WatchRequest, WatchResponse>
  agent: string
  sequence: number
}

export interface ControlServerOptions {
  host: string
  port: number
  /** broker.control.tls, files read: the listener's certificate, and the CA client certificates must chain to (then required). */
  tls: { cert: Buffer; key: Buffer; clientCa: Buffer | null } | null
  /** The shared sidecar token; undefined refuses every stream (and says so). */
  token: string | undefined
  heartbeatMs: number
  revocations: RevocationList
  policy: () => { version: string; document: string } | undefined
  log: Logger
}

export class ControlServer {
  private readonly grpc = new Server()
  private readonly watchers = new Set<Watcher>()
  private readonly tokenDigest: Buffer | undefined
  private heartbeat: NodeJS.Timeout | undefined
  readonly stats = { opened: 0, refused: 0, sent: 0, dropped: 0 }
  /** Messages queued for one sidecar that does not read; past it the stream is ended (it resyncs on reconnect). */
  maxQueuedMessages = 10_000
  port = 0

  constructor(private readonly o: ControlServerOptions) {
    this.tokenDigest = o.token ? createHash('sha256').update(o.token).digest() : undefined
    o.revocations.onChange((c) => this.broadcastRevocation(c))
    this.grpc.addService(ControlServiceService, { watch: (call: ServerWritableStream<WatchRequest, WatchResponse>) => this.watch(call) })
  }

  get connected(): number {
    return this.watchers.size
  }

  /** Sidecars with a stream open here whose agent the value (an instance ID or a pattern) names. */
  connectedFor(value: string): number {
    let n = 0
    for (const w of this.watchers) if (agentMatches(value, w.agent)) n++
    return n
  }

  async start(): Promise<number> {
    const host = this.o.host.includes(':') ? `[${this.o.host}]` : this.o.host
    this.port = await new Promise<number>((resolve, reject) =>
      this.grpc.bindAsync(`${host}:${this.o.port}`, this.credentials(), (err, port) =>
        err ? reject(listenError('broker.control', this.o.host, this.o.port, err)) : resolve(port),
      ),
    )
    this.heartbeat = setInterval(() => {
      for (const w of this.watchers) this.send(w, { $case: 'heartbeat', value: { timeUnixMs: Date.now() } })
    }, this.o.heartbeatMs)
    this.heartbeat.unref()
    return this.port
  }

  private credentials(): ServerCredentials {
    const t = this.o.tls
    if (!t) return ServerCredentials.createInsecure()
    return ServerCredentials.createSsl(t.clientCa, [{ cert_chain: t.cert, private_key: t.key }], t.clientCa !== null)
  }

  private authenticate(call: ServerWritableStream<WatchRequest, WatchResponse>): { agent: string } | { refused: string } {
    if (!this.tokenDigest) return { refused: 'the control stream is disabled: the broker has no control token configured' }
    const agent = call.metadata.get(SIDECAR_HEADER)[0]
    if (typeof agent !== 'string' || !agent) return { refused: `missing ${SIDECAR_HEADER} metadata` }
    const auth = call.metadata.get('authorization')[0]
    const m = typeof auth === 'string' ? /^Bearer (\S+)$/.exec(auth) : null
    if (!m) return { refused: 'missing bearer token' }
    if (!timingSafeEqual(createHash('sha256').update(m[1]!).digest(), this.tokenDigest)) return { refused: 'control token does not match' }
    return { agent }
  }

  private watch(call: ServerWritableStream<WatchRequest, WatchResponse>): void {
    const auth = this.authenticate(call)
    if ('refused' in auth) {
      this.stats.refused++
      this.o.log.warn({ peer: call.getPeer(), reason: auth.refused }, 'control stream refused')
      call.emit('error', grpcError(status.UNAUTHENTICATED, auth.refused))
      return
    }
    const w: Watcher = { call, agent: auth.agent, sequence: 0 }
    this.watchers.add(w)
    this.stats.opened++
    const drop = () => this.watchers.delete(w)
    call.on('cancelled', drop)
    call.on('close', drop)
    call.on('error', drop)
    const policy = this.o.policy()
    this.send(w, { $case: 'snapshot', value: { revocations: this.o.revocations.all().map(revocationToWire), policy: policy ? { version: policy.version, document: policy.document } : undefined } })
    this.o.log.info({ agent: auth.agent, policy: policy?.version ?? null, held: call.request.policyVersion || null }, 'control stream open')
  }

  private send(w: Watcher, change: WatchResponse['change']): void {
    if (w.call.cancelled || w.call.destroyed) {
      this.watchers.delete(w)
      return
    }
    if (w.call.writableLength > this.maxQueuedMessages) {
      // A sidecar that stops reading must not grow the broker's memory without bound. Ending its
      // stream loses nothing: the reconnect starts from a snapshot.
      this.watchers.delete(w)
      this.stats.dropped++
      this.o.log.warn({ agent: w.agent, queued: w.call.writableLength }, 'control stream dropped: the sidecar is not reading')
      w.call.emit('error', grpcError(status.RESOURCE_EXHAUSTED, `more than ${this.maxQueuedMessages} control messages queued unread; reconnect to resynchronise`))
      return
    }
    w.sequence++
    this.stats.sent++
    w.call.write({ sequence: w.sequence, change })
  }

  private broadcastRevocation(c: RevocationChange): void {
    const change: WatchResponse['change'] =
      c.op === 'revoke' ? { $case: 'revoked', value: revocationToWire(c.revocation) } : { $case: 'unrevoked', value: { kind: TO_WIRE[c.kind], value: c.value } }
    for (const w of this.watchers) this.send(w, change)
  }

  broadcastPolicy(bundle: { version: string; document: string }): void {
    for (const w of this.watchers) this.send(w, { $case: 'policy', value: bundle })
  }

  /** Ends every stream (shutdown): sidecars reconnect, to this broker or another replica. */
  async close(): Promise<void> {
    clearInterval(this.heartbeat)
    for (const w of this.watchers) w.call.end()
    this.watchers.clear()
    await new Promise<void>((resolve) => {
      const force = setTimeout(() => {
        this.grpc.forceShutdown()
        resolve()
      }, 1000)
      this.grpc.tryShutdown(() => {
        clearTimeout(force)
        resolve()
      })
    })
  }
}
