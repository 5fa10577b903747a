// One undici Pool per (origin, checked address, task). The pool's connector is pinned to the
// address the resolve stage classified, so nothing between the check and the dial can re-resolve
// the name (no DNS rebinding window). A connection carries one task's calls only: an upstream that
// leaves a request body unread (a CL.0 desync) reads it as the start of the next request on that
// connection, and another task's call behind it, injected token and all, became the smuggled
// request's body, stored where the first task read it back; a login an upstream ties to the
// connection (NTLM, Negotiate) served whoever came next. Pools are bounded; an evicted pool
// finishes its in-flight requests and closes.
//
// Upstream sockets are bounded too, process-wide: each holds a descriptor, and idle keep-alive
// ones outlive the agent connections that opened them (undici kept one as long as the upstream's
// `Keep-Alive: timeout=` asked, up to 600 s). With one pool per task and origin, bursts left
// thousands open: at `ulimit -n 2200`, 2,126 idle sockets, and 6 minutes later calls failed with
// 502 EMFILE or were reset unread by libuv. Now an idle socket is kept at most
// timeouts.upstream_idle_ms, and pooled plus relayed (tunnel, WebSocket) upstream sockets stay
// within one limit (sidecar.max_connections): a dial past it first closes idle pools, least
// recently used first, and is refused (503 LK_UPSTREAM_LIMIT, retryable) only if all are busy.
// Counted at dial time only: a request on an open connection costs nothing.
import { Pool } from './undici-pool.js'
import type { buildConnector as BuildConnector } from 'undici'
import buildConnectorModule from 'undici/lib/core/connect.js'
import { readPastPeerGone } from './early-answer.js'
import { closeAfterFlaggedBody } from './body-request-line.js'
import { MAX_UPSTREAM_HEAD_BYTES } from './headers.js'
import { kClients } from 'undici/lib/dispatcher/pool-base.js'
import type { Client } from 'undici'
import { LRUCache } from 'lru-cache'
import type { LookupFunction } from 'node:net'
import { checkServerIdentity, createSecureContext, type PeerCertificate, type SecureContext, type TLSSocket } from 'node:tls'
import type { Socket } from 'node:net'
import { NO_SUBJECT_ALT_NAME } from './upstream-errors.js'
import { LatchkeyError } from '../errors.js'
import type { Identity, ResolvedAddress, Target } from '../context.js'
import { originKey } from '../listen/target.js'

export interface PoolTimeouts {
  connect_ms: number
  headers_ms: number
  body_ms: number
  /** The longest an idle upstream connection is kept, whatever its `Keep-Alive: timeout=` asks. */
  upstream_idle_ms: number
}

export interface SocketLimit {
  /** Upstream sockets open at once (pooled and relayed); the sidecar passes sidecar.max_connections. */
  max: number
  /** Told of each dial refused at the limit (the sidecar logs it, at most once per burst). */
  onRefused?: (max: number) => void
}

function pinnedLookup(address: string, family: 4 | 6): LookupFunction {
  return ((_host: string, options: { all?: boolean }, callback: (...args: unknown[]) => void) => {
    if (options?.all) callback(null, [{ address, family }])
    else callback(null, address, family)
  }) as unknown as LookupFunction
}

// The module Pool itself loads (undici's index exports the same function).
const buildConnector = buildConnectorModule as typeof BuildConnector

/**
 * Node's host check, after requiring a subjectAltName: for a certificate with none, Node matches
 * the host against its CN, which browsers and Go have long refused (RFC 6125 §6.4.4 leaves it to
 * the client; the CA/Browser Forum requires the SAN).
 */
export function checkUpstreamIdentity(host: string, cert: PeerCertificate): Error | undefined {
  if (!cert.subjectaltname) return Object.assign(new Error('the certificate has no subjectAltName'), { code: NO_SUBJECT_ALT_NAME })
  return checkServerIdentity(host, cert)
}

/**
 * A fatal TLS alert after the client's half of the handshake (TLS 1.3's certificate_required when
 * the upstream wants a client certificate) arrives as an 'error' and then an 'end'; undici lets the
 * 'end' replace the error with "other side closed". The connection is over either way: ending it at
 * the error keeps the alert as the reason.
 */
function endAtTlsError(this: TLSSocket, err: { code?: unknown }): void {
  if (typeof err?.code === 'string' && err.code.startsWith('ERR_SSL_')) this.destroy()
}

export class PinnedPools {
  private readonly pools: LRUCache<string, Pool>
  private closing = false
  /** Pooled upstream sockets open (dialling or connected): a descriptor each. */
  pooled = 0
  /** Relayed upstream sockets open (CONNECT tunnels, WebSockets), counted by `relay`. */
  relayed = 0
  /** Dials waiting for room (see makeRoom). */
  private waiting = 0
  /** Idle pools being closed to make room; dials past the limit wait for it. */
  private freeing: Promise<void> | null = null
  /** What every upstream TLS connection is verified with (the forward stage's pools, WebSocket handshakes). */
  readonly tls: { rejectUnauthorized: true; checkServerIdentity: typeof checkUpstreamIdentity; secureContext?: SecureContext }

  constructor(
    private readonly timeouts: PoolTimeouts,
    max: number,
    /** Trusted roots for upstream TLS; undefined means Node's defaults. */
    readonly ca?: string[],
    private readonly limit: SocketLimit = { max: Infinity },
  ) {
    // One context for the list, built here: given `ca`, tls.connect builds a context per connection,
    // parsing every certificate again (Node's roots and NODE_EXTRA_CA_CERTS: 15-50 ms of CPU each).
    this.tls = { rejectUnauthorized: true, checkServerIdentity: checkUpstreamIdentity, ...(ca ? { secureContext: createSecureContext({ ca }) } : {}) }
    this.pools = new LRUCache<string, Pool>({
      max,
      dispose: (pool) => {
        if (!this.closing) void pool.close().catch(() => pool.destroy())
      },
    })
  }

  /** The pool for calls to `target`, dialling `resolved`, made by `identity`'s task (or, for calls in no task, its agent). */
  get(target: Target, resolved: ResolvedAddress, identity: Identity): Pool {
    const origin = originKey(target.scheme, target.host, target.port)
    const key = origin + '|' + resolved.address + '|' + identity.agentId + '|' + (identity.taskId ?? '')
    let pool = this.pools.get(key)
    if (!pool) {
      const connector = buildConnector({
        lookup: pinnedLookup(resolved.address, resolved.family),
        timeout: this.timeouts.connect_ms,
        // The upstream leg always verifies real certificates, and requires a subjectAltName.
        ...this.tls,
        // Keep TLS SNI on the name, never the address we pinned.
        ...(target.hostIsIp ? {} : { servername: target.host }),
      } as BuildConnector.BuildOptions)
      const dial: BuildConnector.connector = (options, callback) => {
        this.pooled++
        let socket: Socket
        try {
          // undici's connector returns the socket it dials (its type says void): counted from here.
          socket = connector(options, (...result) => {
            if (result[1] && options.protocol === 'https:') result[1].prependListener('error', endAtTlsError)
            callback(...result)
          }) as unknown as Socket
          // An answer sent before the body was read is parsed, not lost to the failed write.
          readPastPeerGone(socket)
          // A body that could hold a smuggled request ends the connection's use (body-request-line.ts).
          closeAfterFlaggedBody(socket)
        } catch (err) {
          this.pooled--
          throw err
        }
        // 'close' once the descriptor is released, connected or not.
        socket.once('close', () => this.pooled--)
      }
      const connect: BuildConnector.connector = (options, callback) => {
        if (this.pooled + this.relayed < this.limit.max) return dial(options, callback)
        this.makeRoom()
          .then((room) => {
            if (room) return dial(options, callback)
            this.limit.onRefused?.(this.limit.max)
            callback(
              new LatchkeyError('LK_UPSTREAM_LIMIT', `the sidecar has its limit of ${this.limit.max} upstream connections open (sidecar.max_connections), none of them idle; try again shortly`),
              null,
            )
          })
          // A dial that threw before it began (undici's connector checks its options).
          .catch((err: Error) => callback(err, null))
      }
      const idleMs = this.timeouts.upstream_idle_ms
      pool = new Pool(origin, {
        connect,
        headersTimeout: this.timeouts.headers_ms,
        bodyTimeout: this.timeouts.body_ms,
        // An upstream that names no Keep-Alive timeout: 4 s. One that does is believed up to
        // upstream_idle_ms (undici's own cap was 600 s: every such socket a descriptor that long).
        keepAliveTimeout: Math.min(4_000, idleMs),
        keepAliveMaxTimeout: idleMs,
        maxHeaderSize: MAX_UPSTREAM_HEAD_BYTES,
        // Redirects are returned to the agent, never followed: no interceptor is composed here.
      })
      this.pools.set(key, pool)
    }
    return pool
  }

  /**
   * Counts an upstream socket the sidecar relays (a CONNECT tunnel, a WebSocket) against the same
   * limit until it closes. Never refused (each belongs to an agent connection, which
   * max_connections caps), but past the limit idle pools are closed to make up for it.
   */
  relay(socket: Socket): void {
    this.relayed++
    socket.once('close', () => this.relayed--)
    if (this.pooled + this.relayed > this.limit.max && !this.freeing) {
      const closes = this.closeIdle(this.pooled + this.relayed - this.limit.max)
      if (closes.length > 0) this.freeing = Promise.all(closes).then(() => void (this.freeing = null))
    }
  }

  /**
   * Whether there is room for one more dial, once idle pools (nothing running or queued) are
   * closed, least recently used first, enough of them for the dials waiting. False when every
   * socket open is in use.
   */
  private async makeRoom(): Promise<boolean> {
    this.waiting++
    try {
      while (this.pooled + this.relayed >= this.limit.max) {
        if (this.closing) return false
        if (!this.freeing) {
          const closes = this.closeIdle(this.pooled + this.relayed + this.waiting - this.limit.max)
          if (closes.length === 0) return false
          this.freeing = Promise.all(closes).then(() => void (this.freeing = null))
        }
        await this.freeing
      }
      return true
    } finally {
      this.waiting--
    }
  }

  /**
   * Closes idle sockets, at least `sockets` of them (or all there are); resolves as each has
   * closed. Idle pools first, least recently used first; then, if that is not enough, the idle
   * keep-alive sockets of pools with calls running: an upstream that asks for its sockets to be
   * kept a minute left them holding the limit beside one busy one, and calls to other origins
   * (or tasks) were refused, 503, with fewer calls in flight than the limit.
   */
  private closeIdle(sockets: number): Promise<unknown>[] {
    const idle: [string, Pool][] = []
    let freed = 0
    for (const [key, pool] of this.pools.rentries() as Generator<[string, Pool]>) {
      if (freed >= sockets) break
      const { connected, running, pending } = pool.stats
      if (connected === 0 || running > 0 || pending > 0) continue
      freed += connected
      idle.push([key, pool])
    }
    // Out of the cache first (after the walk, not during it): no call is given these pools again.
    // Dispose starts each one's close; this waits for the same close.
    for (const [key] of idle) this.pools.delete(key)
    const closes = idle.map(([, pool]) => pool.close().catch(() => pool.destroy()).catch(() => {}))
    if (freed >= sockets) return closes
    for (const pool of this.pools.rvalues() as Generator<Pool>) {
      if (pool.stats.free === 0) continue
      const clients = (pool as unknown as Record<typeof kClients, Client[]>)[kClients]
      for (let i = clients.length - 1; i >= 0 && freed < sockets; i--) {
        const client = clients[i]!
        const { connected, size } = client.stats
        if (!connected || size > 0 || client.closed || client.destroyed) continue
        // Out of the pool before it closes, so no call is dispatched to it meanwhile (undici's
        // own removal waits for the close); the pool dials anew when it needs a socket.
        clients.splice(i, 1)
        freed++
        closes.push(client.close().catch(() => client.destroy()).catch(() => {}))
      }
      if (freed >= sockets) break
    }
    return closes
  }

  /**
   * A task has ended: its pools are closed now, each once its calls in flight are done (its
   * streams the pipeline has cut), not left idle for upstream_idle_ms: nothing will use them
   * again, and a burst of ended tasks held up to max_pools sockets for 30 s.
   */
  closeTask(taskId: string): number {
    const suffix = '|' + taskId
    const ended: string[] = []
    for (const key of this.pools.keys()) if (key.endsWith(suffix)) ended.push(key)
    // Out of the cache, after the walk: dispose closes each.
    for (const key of ended) this.pools.delete(key)
    return ended.length
  }

  /**
   * Every pool closed as closeTask closes a task's (a revoked agent: every call here was its own,
   * and none will be made again). Not a shutdown: a pool may be made anew afterwards.
   */
  closeAll(): number {
    const n = this.pools.size
    // Dispose closes each.
    this.pools.clear()
    return n
  }

  async close(): Promise<void> {
    this.closing = true
    const pools = [...this.pools.values()]
    this.pools.clear()
    await Promise.all(pools.map((p) => p.close().catch(() => p.destroy())))
  }
}
