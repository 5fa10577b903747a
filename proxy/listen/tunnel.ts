// CONNECT (HTTPS_PROXY): decided by host and port, dialled to exactly the checked address.
// The first bytes the agent sends decide what the tunnel is:
//   - a TLS ClientHello (0x16): read whole first (client-hello.ts: across records and reads,
//     bounded, strict), its server name held to the CONNECT's host (none to an IP literal; may
//     be absent for a dotless name), else an access_denied alert, the upstream closed having
//     been sent nothing, recorded LK_TLS_NAME_MISMATCH (LK_BAD_REQUEST for a ClientHello that
//     cannot be read): a CDN routes by that name, so another would be domain fronting past the
//     policy. Enforced in report mode too, as the network floor is. ECH's inner name is not
//     seen (see client-hello.ts). Then relayed untouched; no credential can be injected into it;
//   - anything else is plain HTTP (undici's ProxyAgent tunnels http:// targets by default):
//     the socket is handed to the sidecar's own HTTP parser and every request inside re-enters
//     the pipeline, decided, credentialed and audited one by one, pinned to the tunnel's origin.
// A CONNECT denied only because a rule on the host depends on method or path (which TLS hides)
// opens for plain HTTP alone, without dialling: TLS gets an access_denied alert. So does a
// CONNECT to the sidecar's own listener: the requests inside are calls to its routes, and a
// CONNECT to port 80 refused for anything but its own bytes or a fault (ON_PORT_80: whose, what,
// where, the sidecar's state), so that Node's fetch of an http:// URL reads the refusal's status
// and reason (TLS there gets access_denied, or internal_error for a 5xx).
import { connect as netConnect, type Socket } from 'node:net'
import type { IncomingMessage } from 'node:http'
import type { Pipeline, TunnelOrigin } from '../pipeline.js'
import type { CallContext, Target } from '../context.js'
import { LatchkeyError, type ErrorCode } from '../errors.js'
import { serveOn } from './serve-on.js'
import { parseConnectTarget } from './target.js'
import { checkFraming } from './framing.js'
import { upstreamError } from '../forward/upstream-errors.js'
import { closeWhenIdle, watchClose, watchEarlyHangUp, type RelayTimeouts } from './relay.js'
import { recordEnd } from '../call-outcome.js'
import { readClientHello, shownName } from './client-hello.js'
import { HelloRetryWatch, type WatchStep } from './hello-retry.js'
import { normaliseHost } from '../policy/policy.js'

const TLS_HANDSHAKE = 0x16
/** A TLS record: alert, TLS 1.2 record version, 2 bytes: fatal, access_denied (RFC 8446 §6.2). */
const TLS_ACCESS_DENIED = Buffer.from([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31])
/** The same, internal_error (80): the tunnel's upstream could not be reached, which TLS has no alert of its own for. */
const TLS_INTERNAL_ERROR = Buffer.from([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50])

/**
 * Where a CONNECT to port 80, plain HTTP's, is answered each refusal it can meet: `inside` the
 * tunnel or on the CONNECT's status `line`. Node's fetch (undici's EnvHttpProxyAgent, Node 24's
 * NODE_USE_ENV_PROXY) tunnels an http:// URL and shows a refused CONNECT only as "fetch failed",
 * which the SDKs on it retry; inside, the tunnel opens undialled and each request in it is
 * identified, decided, resolved and dialled again, meeting the same refusal (or, a moment later,
 * none) as a readable JSON answer. Every code is decided here (a Record over them: a new one does
 * not compile until it is).
 *   inside: whose (LK_PROXY_AUTH, LK_CALLER_DENIED, LK_REVOKED, LK_TASK_ENDED: a cut while DNS
 *     waited, read inside as the ended task's 403), what (LK_POLICY_DENIED, LK_NETWORK_DENIED),
 *     where (LK_DNS_*, LK_UPSTREAM_UNREACHABLE, LK_UPSTREAM_TIMEOUT), and the sidecar's state
 *     (LK_AUDIT_UNAVAILABLE; LK_DRAINING: the request inside reads it with `Connection: close`,
 *     and the tunnel ends with it). Nothing in them is about the CONNECT's own bytes.
 *   line: a CONNECT that cannot be read as one (LK_BAD_REQUEST, LK_HEADERS_TOO_LARGE,
 *     LK_REQUEST_TIMEOUT: no tunnel is owed to bytes that are no CONNECT), and a fault in the
 *     sidecar (LK_INTERNAL: nothing says the request inside would meet it; not turned into a tunnel).
 *   line, never met by a CONNECT (no body, route, credential or HTTP response is read for one) or
 *     never rendered (after the 200, or nobody to read it): the rest.
 */
const ON_PORT_80: Record<ErrorCode, 'inside' | 'line'> = {
  LK_PROXY_AUTH: 'inside',
  LK_CALLER_DENIED: 'inside',
  LK_REVOKED: 'inside',
  LK_TASK_ENDED: 'inside',
  LK_POLICY_DENIED: 'inside',
  LK_NETWORK_DENIED: 'inside',
  LK_DNS_FAILED: 'inside',
  LK_DNS_TIMEOUT: 'inside',
  LK_DNS_BUSY: 'inside',
  LK_UPSTREAM_UNREACHABLE: 'inside',
  LK_UPSTREAM_TIMEOUT: 'inside',
  LK_AUDIT_UNAVAILABLE: 'inside',
  LK_DRAINING: 'inside',
  LK_BAD_REQUEST: 'line',
  LK_HEADERS_TOO_LARGE: 'line',
  LK_REQUEST_TIMEOUT: 'line',
  LK_INTERNAL: 'line',
  LK_EXPECTATION_FAILED: 'line',
  LK_NO_ROUTE: 'line',
  LK_FOREIGN_ORIGIN: 'line',
  LK_CREDENTIAL_UNAVAILABLE: 'line',
  LK_CREDENTIAL_REFUSED: 'line',
  LK_UPSTREAM_TLS: 'line',
  LK_UPSTREAM_PROTOCOL: 'line',
  LK_UPSTREAM_LIMIT: 'line',
  LK_TLS_NAME_MISMATCH: 'line',
  LK_IDLE_TIMEOUT: 'line',
  LK_CLIENT_CLOSED: 'line',
}
const answeredInside = (target: { port: number }, err: unknown): err is LatchkeyError =>
  target.port === 80 && err instanceof LatchkeyError && ON_PORT_80[err.code] === 'inside'

/**
 * Why a TLS tunnel's server name (SNI) is not what its CONNECT was decided for, or null. A name
 * must be the CONNECT's host, compared as the policy compares hosts (case, a trailing dot,
 * punycode: normaliseHost), and is required for a host with a dot; a CONNECT to an address
 * expects none, being decided for the address, not a name. Otherwise an allowed CDN-fronted
 * host carries a ClientHello for another tenant of the same addresses, one the policy denies
 * (domain fronting). ECH hides its inner name: the outer one is judged (see client-hello.ts).
 */
function serverNameMismatch(target: Target, serverName: string | null): LatchkeyError | null {
  if (target.hostIsIp) {
    return serverName === null ? null : new LatchkeyError('LK_TLS_NAME_MISMATCH', `the TLS server name ${shownName(serverName)} is not the CONNECT's host "${target.host}", an address (a tunnel to an address carries no server name)`)
  }
  // No name to a dotless host (`localhost`, a Kubernetes service's short name): Java's JSSE, under
  // HttpsURLConnection and Apache's client, sends SNI only for names with a dot (RFC 6066 asks for
  // a fully qualified one). Such a name's addresses are its own service's, not a CDN's tenants.
  if (serverName === null) {
    return target.host.includes('.') ? new LatchkeyError('LK_TLS_NAME_MISMATCH', `the TLS ClientHello names no server; the CONNECT's host is "${target.host}"`) : null
  }
  if (normaliseHost(serverName) === target.host) return null
  return new LatchkeyError('LK_TLS_NAME_MISMATCH', `the TLS server name ${shownName(serverName)} is not the CONNECT's host "${target.host}"`)
}

export interface TunnelOptions extends RelayTimeouts {
  open: Set<Socket>
  /**
   * Takes over a plaintext tunnel's socket and parses the HTTP inside it, `first` (what was read of
   * it) first. `ctx` is its CONNECT's: live while the tunnel is (a cut reaches it), but no call in flight.
   */
  adoptPlaintext(socket: Socket, origin: TunnelOrigin, first: Buffer, ctx: CallContext): void
}

export function handleConnect(pipeline: Pipeline, req: IncomingMessage, client: Socket, head: Buffer, opts: TunnelOptions): void {
  if (pipeline.refusePipelinedTakeover(req, client, 'connect')) return
  const ctx = pipeline.newContext('connect', 'CONNECT')
  let finished = false
  const finish = () => {
    if (finished) return
    finished = true
    pipeline.finish(ctx)
  }
  const refuse = (err: unknown) => {
    if (finished) {
      client.destroy()
      return
    }
    finished = true
    pipeline.refuseSocket(ctx, client, err)
  }
  client.on('error', () => {})
  let upstreamSocket: Socket | null = null
  const stopEarlyWatch = watchEarlyHangUp(client, () => {
    upstreamSocket?.destroy()
    refuse(new LatchkeyError('LK_CLIENT_CLOSED', 'the agent closed the connection before the tunnel opened'))
  })
  /** The tunnel counted open (the drain's set, the gauge) until `closed`, which counts it down once however it ends. */
  const opened = () => {
    opts.open.add(client)
    pipeline.stages.metrics.openTunnels.inc()
  }
  const closed = () => {
    if (opts.open.delete(client)) pipeline.stages.metrics.openTunnels.dec()
  }
  /**
   * TLS refused in an open tunnel: a fatal alert, the one refusal a TLS client reads there
   * (access_denied; internal_error for an upstream that could not be reached); recorded with `ctx.decision`.
   */
  const refuseTls = (err: LatchkeyError) => {
    finished = true
    client.end(err.status >= 500 ? TLS_INTERNAL_ERROR : TLS_ACCESS_DENIED)
    pipeline.recordRefused(ctx, err)
  }
  /** Set once the tunnel is open: the idle timer is the relay's until the HTTP parser takes over. */
  let stopIdle = () => {}
  /**
   * Plain HTTP: the socket goes to the sidecar's own HTTP server, where each request is a call of
   * its own. The tunnel stays live until it closes, so a revocation cuts it even when idle.
   */
  const handOver = (first: Buffer) => {
    finished = true
    // Idle between requests is the HTTP server's to judge now (keep-alive and header timeouts).
    stopIdle()
    // A tunnel cut on purpose (revoked, its task ended, shutdown) is recorded with why; one the
    // agent closed is not a call of its own (the requests inside it were).
    client.once('close', () => (ctx.errorCode !== null ? pipeline.finish(ctx) : pipeline.live.delete(ctx)))
    opts.adoptPlaintext(client, { target: ctx.target!, proxyAuthorization: req.headers['proxy-authorization'] }, first, ctx)
  }
  /**
   * Denied only for what TLS would hide (a rule on this host depends on method or path): the
   * tunnel opens, undialled, for plain HTTP alone. TLS gets a fatal access_denied alert, the one
   * refusal a TLS client reads at this point, and is recorded as the denial it is.
   */
  const openForPlainHttpOnly = (tlsRefusal: LatchkeyError, denied = false) => {
    stopEarlyWatch()
    client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
    ctx.status = 200
    // Recorded as what happened: opened, for plain HTTP (each request inside decided on its own),
    // not as a denial with a 200; the denial stands if TLS is tried (see sniff). A tunnel opened
    // only to answer with its denial (`denied`) keeps it, and is recorded refused if unused.
    const denial = ctx.decision
    if (denial && !denied) ctx.decision = { action: 'allow', rule: denial.rule, reason: `opened for plain HTTP only: ${tlsRefusal.reason}`, enforced: true }
    stopIdle = closeWhenIdle(ctx, client, opts.idleMs)
    opened()
    client.once('close', () => {
      closed()
      if (denied && !finished) recordEnd(ctx, tlsRefusal.code, tlsRefusal.reason)
      finish()
    })
    // The agent ending the tunnel before a byte of it: nothing was dialled, so nothing else would
    // notice (the listener's sockets are half-open; a relay's end is watched by watchClose).
    const onEnd = () => client.end()
    client.once('end', onEnd)
    const sniff = (first: Buffer) => {
      client.removeListener('end', onEnd)
      if (first[0] !== TLS_HANDSHAKE) return handOver(first)
      ctx.decision = denial
      refuseTls(tlsRefusal)
    }
    if (head.length > 0) sniff(head)
    else client.once('data', sniff)
  }
  const run = async () => {
    if (req.httpVersionMajor !== 1) throw new LatchkeyError('LK_BAD_REQUEST', 'CONNECT must be HTTP/1.x')
    // Two Host or two Proxy-Authorization headers: which authority, which task, would be a guess.
    checkFraming(req, false)
    // RFC 9110 §9.3.6: a CONNECT has no content. Bytes announced as its body would be tunnel data
    // to the sidecar and a body to a proxy in front of it: read one way by one and another by the other.
    const length = req.headers['content-length']
    if (req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')) {
      throw new LatchkeyError('LK_BAD_REQUEST', 'a CONNECT carries no body (no Content-Length above 0, no Transfer-Encoding)')
    }
    ctx.target = parseConnectTarget(req.url ?? '')
    // A tunnel to the sidecar itself (Node's fetch calling a route with HTTP_PROXY set): nothing
    // is dialled; each request inside is a call to a route, identified, decided and audited alone.
    if (pipeline.isOwnAddress(ctx.target)) return openForPlainHttpOnly(new LatchkeyError('LK_BAD_REQUEST', 'the sidecar serves its routes over plain HTTP only'))
    // A tunnel to the admin API (Node's fetch opening a task with HTTP_PROXY set): the connection
    // is the admin server's, as if made directly. No egress: nothing dialled, nothing audited.
    if (pipeline.isAdminAddress(ctx.target, client.remoteAddress)) {
      stopEarlyWatch()
      finished = true
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
      return serveOn(pipeline.admin!, client, head)
    }
    const target = ctx.target
    // Cut while admission waits (DNS): answered with the refusal now, as a request is (Pipeline.cut);
    // on port 80 inside the tunnel, as below, but for the drain's deadline (nothing is answered after it).
    ctx.admitting = (cut) => (answeredInside(target, cut) && cut.code !== 'LK_DRAINING' ? openForPlainHttpOnly(cut, true) : refuse(cut))
    try {
      pipeline.refuseIfDraining()
      await pipeline.admit(ctx, req.headers['proxy-authorization'], false, client)
    } catch (err) {
      // Port 80 is plain HTTP's: there the refusal (or a name that does not resolve) goes inside
      // the tunnel, where the request is decided again and refused with the readable 403 (502,
      // 503, 504) any other path gives (ON_PORT_80). Node's fetch tunnels http:// and shows a
      // refused CONNECT only as "fetch failed". Nothing is dialled. Elsewhere the refusal stays on
      // the CONNECT: TLS clients show its status line, and a protocol whose server speaks first
      // would wait on an opened tunnel for ever.
      // Refused meanwhile (a cut answered it, on the line or inside): that answer stands.
      if (finished || ctx.cutWith !== null) return
      if (answeredInside(target, err)) return openForPlainHttpOnly(err, true)
      throw err
    } finally {
      ctx.admitting = null
    }
    if (finished || ctx.cutWith !== null) return
    const decision = ctx.decision!
    if (decision.action === 'deny' && decision.enforced) return openForPlainHttpOnly(new LatchkeyError('LK_POLICY_DENIED', decision.reason, decision.rule))
    const upstream = netConnect({ host: ctx.resolved!.address, port: target.port, noDelay: true })
    pipeline.stages.pools.relay(upstream)
    upstreamSocket = upstream
    upstream.setTimeout(opts.connectTimeoutMs, () => upstream.destroy(Object.assign(new Error('connect timeout'), { code: 'UND_ERR_CONNECT_TIMEOUT' })))
    upstream.once('error', (err) => {
      if (ctx.status !== 0) return client.destroy()
      const failure = upstreamError(err)
      // Port 80: an upstream that refused or did not answer the dial is told inside the tunnel (above).
      if (!finished && answeredInside(target, failure)) {
        upstreamSocket = null
        return openForPlainHttpOnly(failure, true)
      }
      refuse(failure)
    })
    upstream.once('connect', () => {
      stopEarlyWatch()
      upstream.setTimeout(0)
      ctx.status = 200
      ctx.upstreamMs = performance.now() - ctx.t0
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
      stopIdle = closeWhenIdle(ctx, client, opts.idleMs)
      opened()
      const stopWatching = watchClose(client, upstream, () => {
        closed()
        ctx.bytesIn = upstream.bytesWritten
        ctx.bytesOut = upstream.bytesRead
        finish()
      })
      /**
       * TLS refused: before a byte of it was relayed, the upstream, dialled, is closed having been
       * sent nothing; after a HelloRetryRequest, before the second ClientHello reached it.
       */
      const refuseUnrelayed = (refusal: LatchkeyError) => {
        stopWatching()
        stopIdle()
        closed()
        upstream.destroy()
        refuseTls(refusal)
      }
      /** The ClientHello (`bytes` up to `end`) goes on; what follows it is watched for a second one (hello-retry.ts). */
      const relay = (bytes: Buffer, end: number) => {
        ctx.relayed = true
        upstream.write(end === bytes.length ? bytes : bytes.subarray(0, end))
        const watch = new HelloRetryWatch((serverName) => serverNameMismatch(target, serverName))
        const unwatch = () => {
          client.removeListener('data', fromClient)
          upstream.removeListener('data', fromServer)
        }
        const step = (next: WatchStep) => {
          if (next instanceof LatchkeyError) {
            unwatch()
            ctx.bytesIn = upstream.bytesWritten
            ctx.bytesOut = upstream.bytesRead
            return refuseUnrelayed(next)
          }
          if (next.send.length > 0) upstream.write(next.send)
          if (!next.done) return
          unwatch()
          upstream.pipe(client)
          client.pipe(upstream)
        }
        const fromClient = (chunk: Buffer) => step(watch.client(chunk))
        const fromServer = (chunk: Buffer) => {
          client.write(chunk)
          step(watch.server(chunk))
        }
        client.on('data', fromClient)
        upstream.on('data', fromServer)
        if (end < bytes.length) step(watch.client(bytes.subarray(end)))
      }
      const passThrough = (first: Buffer) => {
        // Judged again by the policy in force now: it may have changed while the tunnel sat unused.
        const refusal = pipeline.refusalNow(ctx)
        if (refusal !== null) return refuseUnrelayed(refusal)
        // The ClientHello is read whole before anything goes on: its server name must be the
        // CONNECT's host. The idle timer bounds the time it takes, MAX_HELLO_BUFFER the bytes.
        const judge = (bytes: Buffer): number => {
          const hello = readClientHello(bytes)
          if (hello.kind === 'partial') return hello.need
          const problem =
            hello.kind === 'malformed'
              ? new LatchkeyError('LK_BAD_REQUEST', hello.reason)
              : // Gathered over several reads: the policy may have changed meanwhile, and a relay not started is not among those a change cuts.
                (serverNameMismatch(target, hello.serverName) ?? (bytes === first ? null : pipeline.refusalNow(ctx)))
          if (problem !== null) refuseUnrelayed(problem)
          else relay(bytes, hello.kind === 'hello' ? hello.end : bytes.length)
          return 0
        }
        let need = judge(first)
        if (need === 0) return
        // Split across TCP reads: gathered, and read again only once enough is in to say more.
        let chunks = [first]
        let held = first.length
        const more = (chunk: Buffer) => {
          chunks.push(chunk)
          held += chunk.length
          if (held < need) return
          client.removeListener('data', more)
          const gathered = Buffer.concat(chunks, held)
          chunks = [gathered]
          need = judge(gathered)
          if (need !== 0) client.on('data', more)
        }
        client.on('data', more)
      }
      const adopt = (first: Buffer) => {
        stopWatching()
        upstream.destroy()
        // Still an open tunnel, though its requests are parsed here now: counted until it closes.
        client.once('close', closed)
        handOver(first)
      }
      const sniff = (first: Buffer) => (first[0] === TLS_HANDSHAKE ? passThrough(first) : adopt(first))
      if (head.length > 0) sniff(head)
      else client.once('data', sniff)
    })
  }
  run().catch(refuse)
}
