// The sidecar's side of the control stream: one Watch to the broker, kept open. The first message
// of every stream is a snapshot, which replaces what the sidecar knew (so deltas missed while
// disconnected never matter); deltas and heartbeats follow. Reconnects with exponential backoff
// and jitter. While nothing has been heard for stale_after_ms, the sidecar is stale: it keeps
// enforcing its last policy and revocations, mints no new token, and says so on /readyz and in
// its metrics. The revocations also outlive the process: with a state file (persist.ts) a
// restarted sidecar starts from what it last knew, not from nothing, until a fresh snapshot.
import { credentials, Metadata, type ClientReadableStream } from '@grpc/grpc-js'
import { Counter, Gauge, type Registry } from 'prom-client'
import { ControlServiceClient, RevocationKind as WireKind, type Revocation as WireRevocation, type WatchResponse } from '../../protos/gen/latchkey/v1/control.js'
import type { Logger } from '../../lib/log.js'
import { RevocationState, type KnownRevocation, type RevocationKind } from './state.js'
import { readStateFile, StateFileWriter } from './persist.js'
import { revealsSecret, WITHHELD } from '../forward/scrub.js'

export const SIDECAR_HEADER = 'x-latchkey-sidecar'

const FROM_WIRE: Partial<Record<WireKind, RevocationKind>> = {
  [WireKind.REVOCATION_KIND_AGENT]: 'agent',
  [WireKind.REVOCATION_KIND_TASK]: 'task',
  [WireKind.REVOCATION_KIND_JTI]: 'jti',
}

/**
 * The largest control message the sidecar accepts. A snapshot carries every revocation, and
 * grpc's default 4 MB would leave a sidecar stale for ever once the list outgrew it: every
 * (re)connect would fail on the first message.
 */
export const MAX_CONTROL_MESSAGE_BYTES = 64 * 1024 * 1024

/**
 * Channel options for a long-lived stream whose reconnects the application paces: grpc-js's own
 * reconnect backoff (1 s x1.6 up to 120 s) would otherwise govern, and the application's retries
 * fail fast while the channel waits, so a broker back after a long outage would be noticed only
 * tens of seconds later. The channel's backoff follows the configured one instead.
 */
export function controlChannelOptions(backoffMinMs: number, backoffMaxMs: number): Record<string, number> {
  return {
    'grpc.initial_reconnect_backoff_ms': Math.max(1, Math.min(backoffMinMs, backoffMaxMs)),
    'grpc.max_reconnect_backoff_ms': Math.max(1, backoffMaxMs),
    'grpc.max_receive_message_length': MAX_CONTROL_MESSAGE_BYTES,
  }
}

export interface ControlClientOptions {
  /** host:port of the broker's control server. */
  address: string
  /** TLS to the broker (sidecar.control.tls, files read): null only where the config allows plaintext. */
  tls: { ca: Buffer; cert: Buffer | null; key: Buffer | null; serverName: string | null } | null
  /** The control token, read at each connect: a rotated one is sent from the next stream. */
  token: () => string
  agentId: string
  staleAfterMs: number
  backoffMinMs: number
  backoffMaxMs: number
  maxBundleBytes: number
  log: Logger
  metrics: Registry
  now?: () => number
  /** A revocation that is new to this sidecar: drop tokens, cut connections. */
  onRevoked: (r: KnownRevocation) => void
  /** A policy bundle: validated and swapped in, or rejected whole (PolicySwitch.offer). */
  onPolicy: (version: string, document: string) => void
  /** The version of the policy in force. */
  policyVersion: () => string
  /**
   * Where the revocations are kept across restarts (sidecar.control.state_file): read in the
   * constructor, before any call is served (RevocationFileError when unreadable or corrupt).
   */
  stateFile?: string
}

/** A stream that keeps failing to open for one reason is logged this often, not at each attempt. */
const NOT_OPEN_LOG_EVERY_MS = 60_000

export class ControlClient {
  readonly state: RevocationState
  private readonly client: ControlServiceClient
  private readonly now: () => number
  private call: ClientReadableStream<WatchResponse> | undefined
  private expected = 1
  private attempt = 0
  private retry: NodeJS.Timeout | undefined
  private watchdog: NodeJS.Timeout | undefined
  private closed = false
  /** Epoch ms of the last message (or of start-up, which grants one staleness period to connect). */
  lastHeard: number
  connected = false
  lastError: string | null = null
  /** The failure to open a stream last logged, and when: logged again when it changes, or a minute on. */
  private logged: { reason: string; at: number } | undefined
  private readonly m: { connected: Gauge; stale: Gauge; age: Gauge; reconnects: Counter; revocations: Counter; stateWrites: Counter }
  /** Writes the state file, when there is one. */
  readonly stateFile: StateFileWriter | undefined

  constructor(private readonly o: ControlClientOptions) {
    this.state = new RevocationState(o.agentId)
    this.now = o.now ?? Date.now
    this.lastHeard = this.now()
    const channel: Record<string, number | string> = controlChannelOptions(o.backoffMinMs, o.backoffMaxMs)
    if (o.tls?.serverName) channel['grpc.ssl_target_name_override'] = o.tls.serverName
    const creds = o.tls ? credentials.createSsl(o.tls.ca, o.tls.key, o.tls.cert) : credentials.createInsecure()
    this.client = new ControlServiceClient(o.address, creds, channel)
    const registers = [o.metrics]
    this.m = {
      connected: new Gauge({ name: 'latchkey_control_connected', help: '1 while the control stream to the broker is open', registers, collect: () => this.m.connected.set(this.connected ? 1 : 0) }),
      stale: new Gauge({ name: 'latchkey_control_stale', help: '1 when nothing was heard from the broker for stale_after_ms: no new tokens are minted', registers, collect: () => this.m.stale.set(this.staleReason() ? 1 : 0) }),
      age: new Gauge({ name: 'latchkey_control_last_message_age_seconds', help: 'Seconds since the last control stream message', registers, collect: () => this.m.age.set((this.now() - this.lastHeard) / 1000) }),
      reconnects: new Counter({ name: 'latchkey_control_reconnects_total', help: 'Control stream (re)connection attempts', registers }),
      revocations: new Counter({ name: 'latchkey_control_revocations_applied_total', help: 'Revocations applied to this sidecar, by kind', labelNames: ['kind'], registers }),
      stateWrites: new Counter({ name: 'latchkey_control_state_file_writes_total', help: 'Writes of the revocation state file, by outcome (ok, error)', labelNames: ['outcome'], registers }),
    }
    if (o.stateFile) this.stateFile = this.loadState(o.stateFile)
  }

  /** Starts from the revocations the state file holds (none when there is no file yet), then keeps it current. */
  private loadState(path: string): StateFileWriter {
    const loaded = readStateFile(path, this.now())
    const writer = new StateFileWriter(path, () => this.state.all(), { agentId: this.o.agentId, log: this.o.log, now: this.now, onWrite: (outcome) => this.m.stateWrites.inc({ outcome }) })
    if (loaded) {
      this.state.replace(loaded.revocations)
      writer.snapshotAt = loaded.snapshotAt
      const line = { path, revocations: loaded.revocations.length, expired_dropped: loaded.expired, last_snapshot: loaded.snapshotAt, agent_revoked: this.state.agentRevoked }
      if (this.state.agentRevoked) this.o.log.warn(line, 'revocations loaded from the state file: this agent is revoked, every call is refused until the broker says otherwise')
      else this.o.log.info(line, 'revocations loaded from the state file; enforced until the broker\'s next snapshot')
    } else {
      this.o.log.warn({ path }, 'no revocation state file: no revocation is known until the broker\'s first snapshot')
    }
    writer.writeNow()
    this.state.onChange = () => writer.schedule()
    return writer
  }

  /** Why the sidecar is stale (and mints no token), or null. */
  staleReason(): string | null {
    const age = this.now() - this.lastHeard
    if (age <= this.o.staleAfterMs) return null
    return `control stream stale: nothing heard from the broker for ${age} ms (limit ${this.o.staleAfterMs} ms)${this.lastError ? `; last error: ${this.lastError}` : ''}`
  }

  start(): void {
    this.connect()
  }

  private connect(): void {
    if (this.closed) return
    this.m.reconnects.inc()
    const md = new Metadata()
    const token = this.o.token()
    md.set('authorization', `Bearer ${token}`)
    md.set(SIDECAR_HEADER, this.o.agentId)
    this.expected = 1
    const call = this.client.watch({ agentId: this.o.agentId, policyVersion: this.o.policyVersion() }, md)
    this.call = call
    this.armWatchdog()
    call.on('data', (msg: WatchResponse) => {
      if (call !== this.call) return
      this.receive(msg)
    })
    call.on('error', (err: { code?: number; details?: string }) => {
      // Whatever answers at this address was sent the bearer token; its error text becomes the
      // stale reason (a refused mint's reason to the agent, the audit, /readyz, the log).
      const details = err.details && revealsSecret(err.details, [token]) ? WITHHELD : err.details || 'stream error'
      this.lost(call, `${details} (gRPC ${err.code ?? '?'})`)
    })
    call.on('end', () => this.lost(call, 'the broker ended the stream'))
  }

  /** Without a heartbeat for half the staleness limit the stream is presumed dead and reopened. */
  private armWatchdog(): void {
    clearTimeout(this.watchdog)
    this.watchdog = setTimeout(() => {
      const call = this.call
      if (!call) return
      this.lost(call, 'no message from the broker (heartbeats stopped)')
      call.cancel()
    }, Math.max(50, this.o.staleAfterMs / 2))
    this.watchdog.unref()
  }

  private lost(call: ClientReadableStream<WatchResponse>, reason: string): void {
    if (call !== this.call) return
    this.call = undefined
    clearTimeout(this.watchdog)
    // The sidecar's own shutdown cancels the stream (closed): nothing was lost, nothing reconnects.
    if (this.connected && !this.closed) this.o.log.warn({ reason }, 'control stream lost; reconnecting')
    else if (!this.closed && (this.logged?.reason !== reason || this.now() - this.logged.at >= NOT_OPEN_LOG_EVERY_MS)) {
      // A stream that never opens (a wrong token, a broker down or not yet up, a certificate that
      // does not verify) was said nowhere but /readyz, once stale: the log, where an operator
      // looks first, showed only "sidecar listening".
      this.o.log.warn({ reason, attempt: this.attempt + 1 }, 'control stream not open; retrying (no new token is minted once stale)')
      this.logged = { reason, at: this.now() }
    }
    this.connected = false
    this.lastError = reason
    if (this.closed) return
    const base = Math.min(this.o.backoffMaxMs, this.o.backoffMinMs * 2 ** Math.min(this.attempt++, 16))
    this.retry = setTimeout(() => this.connect(), base / 2 + Math.random() * (base / 2))
    this.retry.unref()
  }

  private receive(msg: WatchResponse): void {
    if (msg.sequence !== this.expected) {
      // A gap: something was lost in between. Start over from a fresh snapshot.
      const call = this.call!
      this.lost(call, `sequence gap: expected ${this.expected}, got ${msg.sequence}`)
      call.cancel()
      return
    }
    this.expected++
    this.lastHeard = this.now()
    this.armWatchdog()
    const c = msg.change
    if (!c) return
    switch (c.$case) {
      case 'snapshot': {
        if (!this.connected) this.o.log.info({ revocations: c.value.revocations.length, policy: c.value.policy?.version ?? null }, 'control stream synchronised')
        this.connected = true
        this.logged = undefined
        this.attempt = 0
        this.lastError = null
        const all = c.value.revocations.flatMap((r) => this.known(r))
        if (this.stateFile) this.stateFile.snapshotAt = new Date(this.now()).toISOString()
        for (const r of this.state.replace(all)) this.apply(r)
        if (c.value.policy) this.policy(c.value.policy.version, c.value.policy.document)
        return
      }
      case 'revoked':
        for (const r of this.known(c.value)) if (this.state.add(r)) this.apply(r)
        return
      case 'unrevoked': {
        const kind = FROM_WIRE[c.value.kind]
        if (kind) this.state.remove(kind, c.value.value)
        return
      }
      case 'policy':
        this.policy(c.value.version, c.value.document)
        return
      case 'heartbeat':
        return
    }
  }

  private known(r: WireRevocation): KnownRevocation[] {
    const kind = FROM_WIRE[r.kind]
    if (!kind || !r.value) {
      this.o.log.warn({ kind: r.kind }, 'control stream: revocation of an unknown kind ignored')
      return []
    }
    return [{ kind, value: r.value, createdAt: r.createdUnixMs }]
  }

  private apply(r: KnownRevocation): void {
    this.m.revocations.inc({ kind: r.kind })
    this.o.onRevoked(r)
  }

  private policy(version: string, document: string): void {
    if (version !== this.o.policyVersion()) this.o.onPolicy(version, document)
  }

  /** Stops the stream; resolves once the state file holds the last revocations. */
  close(): Promise<void> {
    this.closed = true
    clearTimeout(this.retry)
    clearTimeout(this.watchdog)
    this.call?.cancel()
    this.client.close()
    return this.stateFile?.close() ?? Promise.resolve()
  }
}
