// One undici Pool per (origin, checked address, task). The pool's connector is pinned to the
// address the resolve stage classified, so nothing between the check and the dial can re-resolve
// the name (no DNS rebinding window). A connection carries one task's calls only: an upstream that
// leaves a request body unread (a CL.0 desync) reads it as the start of the next request on that
// connection, and another task's call behind it, injected token and all, became the smuggled
// request's body, stored where the first task read it back; a login an upstream ties to the
// connection (NTLM, Negotiate) served whoever came next. Pools are bounded; an evicted pool
// finishes its in-flight requests and closes.
import { Pool } from './undici-pool.js'
import type { buildConnector as BuildConnector } from 'undici'
import buildConnectorModule from 'undici/lib/core/connect.js'
import { LRUCache } from 'lru-cache'
import type { LookupFunction } from 'node:net'
import { checkServerIdentity, createSecureContext, type PeerCertificate, type SecureContext, type TLSSocket } from 'node:tls'
import { NO_SUBJECT_ALT_NAME } from './upstream-errors.js'
import type { Identity, ResolvedAddress, Target } from '../context.js'
import { originKey } from '../listen/target.js'

export interface PoolTimeouts {
  connect_ms: number
  headers_ms: number
  body_ms: number
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
  /** What every upstream TLS connection is verified with (the forward stage's pools, WebSocket handshakes). */
  readonly tls: { rejectUnauthorized: true; checkServerIdentity: typeof checkUpstreamIdentity; secureContext?: SecureContext }

  constructor(
    private readonly timeouts: PoolTimeouts,
    max: number,
    /** Trusted roots for upstream TLS; undefined means Node's defaults. */
    readonly ca?: string[],
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
      const connect: BuildConnector.connector = (options, callback) =>
        connector(options, (...result) => {
          if (result[1] && options.protocol === 'https:') result[1].prependListener('error', endAtTlsError)
          callback(...result)
        })
      pool = new Pool(origin, {
        connect,
        headersTimeout: this.timeouts.headers_ms,
        bodyTimeout: this.timeouts.body_ms,
        keepAliveTimeout: 4_000,
        // Redirects are returned to the agent, never followed: no interceptor is composed here.
      })
      this.pools.set(key, pool)
    }
    return pool
  }

  async close(): Promise<void> {
    this.closing = true
    const pools = [...this.pools.values()]
    this.pools.clear()
    await Promise.all(pools.map((p) => p.close().catch(() => p.destroy())))
  }
}
