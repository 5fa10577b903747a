// WebSocket upgrades on allowed routes (absolute-form or reverse). The same admit stages run;
// the handshake is written to exactly the checked address with the credential injected; only a
// 101 answer (read, checked and scrubbed in upgrade-response.ts) opens the byte relay. Any other
// protocol is refused; an offer of h2c alone never comes here (listen/h2c.ts declines it).
import { connect as netConnect, type Socket } from 'node:net'
import { connect as tlsConnect } from 'node:tls'
import type { IncomingMessage } from 'node:http'
import { proxyCredentialOf, type Pipeline, type TunnelOrigin } from '../pipeline.js'
import { LatchkeyError } from '../errors.js'
import { hostHeader } from './target.js'
import { checkFraming } from './framing.js'
import { outboundRequestHeaders } from '../forward/headers.js'
import { credentialedQuery } from '../credentials/bindings.js'
import { upstreamError } from '../forward/upstream-errors.js'
import { closeWhenIdle, relay, watchClose, watchEarlyHangUp, type RelayTimeouts } from './relay.js'
import { expectedAccept, readUpgradeResponse, serializeSwitchingProtocols } from './upgrade-response.js'
import { scrubResponseHeaders } from '../forward/scrub.js'
import { bodyNeedlesFor } from '../forward/body-scrub.js'
import { NONE_HELD } from '../credentials/held.js'
import { WebSocketScrubber } from './websocket-scrub.js'
import { subprotocolsWithoutCredentials } from './websocket-protocol.js'
import { ClosableWebSocket } from './websocket-close.js'
import { recordEnd } from '../call-outcome.js'

/**
 * Upgrade tokens of IANA's registry other than websocket and h2c, which a refusal names back. The
 * header is the agent's to fill, and anything else it held was quoted (32 characters of it) into
 * the body, the status line, the log and the audit trail.
 */
const NAMED_UPGRADES = /^(?:http|tls|connect-udp|connect-ip)(?:\/\d{1,2}(?:\.\d{1,2})?)?$/

const KEEP_FOR_WEBSOCKET = ['upgrade', 'connection'] as const
/** 16 bytes in base64: 22 characters and `==`. */
const WEBSOCKET_KEY = /^[A-Za-z0-9+/]{22}==$/

/**
 * `tunnel` is set for a handshake sent inside a plaintext CONNECT tunnel (undici's WebSocket with
 * EnvHttpProxyAgent sends ws:// that way): pinned to the tunnel's origin, identified by the
 * CONNECT's proxy credential, decided and injected like any other.
 */
export function handleUpgrade(pipeline: Pipeline, req: IncomingMessage, client: Socket, head: Buffer, timeouts: RelayTimeouts, open: Set<Socket>, tunnel: TunnelOrigin | null = null): void {
  const { connectTimeoutMs, idleMs, headersMs } = timeouts
  if (pipeline.refusePipelinedTakeover(req, client, 'upgrade')) return
  const ctx = pipeline.newContext('upgrade', req.method ?? 'GET')
  let refused = false
  const refuse = (err: unknown) => {
    if (refused) return
    refused = true
    pipeline.refuseSocket(ctx, client, err)
  }
  client.on('error', () => {})
  let upstreamSocket: Socket | null = null
  const stopEarlyWatch = watchEarlyHangUp(client, () => {
    upstreamSocket?.destroy()
    refuse(new LatchkeyError('LK_CLIENT_CLOSED', 'the agent closed the connection before the WebSocket opened'))
  })
  const run = async () => {
    checkFraming(req)
    // Read first, so a refused upgrade is recorded with what it was for.
    // A browser's WebSocket always carries Origin: readTarget refuses a page's on a route.
    pipeline.readTarget(ctx, req, tunnel, true)
    const protocol = String(req.headers.upgrade ?? '').trim().toLowerCase()
    // h2c alone is declined and the request served in HTTP/1.1 (listen/h2c.ts); offered with another, it is no WebSocket either.
    if (protocol.includes('h2c')) throw new LatchkeyError('LK_BAD_REQUEST', 'an upgrade offering h2c with another protocol is refused; offer h2c alone (it is declined, the request served in HTTP/1.1) or websocket alone')
    if (protocol !== 'websocket') throw new LatchkeyError('LK_BAD_REQUEST', `${NAMED_UPGRADES.test(protocol) ? `upgrade to "${protocol}"` : 'an upgrade to a protocol with no registered name (the Upgrade header is not repeated: it may hold anything)'} is not supported; only websocket`)
    // RFC 6455: the handshake is a GET without a body. Anything else (a TRACE that would echo the
    // injected credential, a body the relay would pass on unframed) is not a WebSocket.
    if (req.method !== 'GET') throw new LatchkeyError('LK_BAD_REQUEST', `a WebSocket handshake is a GET, not ${req.method}`)
    const length = req.headers['content-length']
    if (req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')) {
      throw new LatchkeyError('LK_BAD_REQUEST', 'a WebSocket handshake carries no body')
    }
    if (req.headers.expect !== undefined) throw new LatchkeyError('LK_BAD_REQUEST', 'Expect is not supported on a WebSocket handshake')
    // The key is what proves the upstream's 101 answers this handshake (upgrade-response.ts): a
    // base64 16-byte nonce, exactly one (RFC 6455 §4.1). node:http joins two with ", ", which
    // the pattern refuses.
    const key = req.headers['sec-websocket-key']
    if (typeof key !== 'string' || !WEBSOCKET_KEY.test(key)) {
      throw new LatchkeyError('LK_BAD_REQUEST', 'a WebSocket handshake carries exactly one Sec-WebSocket-Key: 16 bytes in base64')
    }
    pipeline.refuseIfDraining()
    // Cut while admission waits (a token exchange): answered with the refusal now, as a request is
    // (Pipeline.cut), where the bare close told the agent nothing; nothing was dialled yet.
    ctx.admitting = refuse
    try {
      await pipeline.admit(ctx, proxyCredentialOf(req.headers, tunnel), true, client)
    } finally {
      ctx.admitting = null
    }
    if (refused) return
    const target = ctx.target!
    const headers = outboundRequestHeaders(req.headers, ctx.binding?.strip ?? null, KEEP_FOR_WEBSOCKET)
    headers.connection = 'Upgrade'
    headers.upgrade = 'websocket'
    headers.host = hostHeader(target)
    if (ctx.binding && ctx.credential) {
      target.search = credentialedQuery(target.search, ctx.binding)
      // The agent's own token offered as a subprotocol goes, as its Authorization does; an `_`
      // spelling too, which a server folding `_` into `-` (CGI, WSGI) reads as the same header.
      // Before injecting: a binding may write its credential there.
      for (const name in headers) {
        const offered = headers[name]
        if (offered !== undefined && name.replace(/_/g, '-') === 'sec-websocket-protocol') headers[name] = subprotocolsWithoutCredentials(offered)
      }
      ctx.binding.inject(headers, target, ctx.credential)
      // Messages are checked for the credential (websocket-scrub.ts): none may come compressed.
      delete headers['sec-websocket-extensions']
    }
    let requestHead = `${req.method} ${target.path}${target.search} HTTP/1.1\r\n`
    for (const [name, value] of Object.entries(headers)) {
      if (value === undefined) continue
      for (const v of Array.isArray(value) ? value : [value]) requestHead += `${name}: ${v}\r\n`
    }
    requestHead += '\r\n'
    const { address } = ctx.resolved!
    const upstream: Socket =
      target.scheme === 'https'
        ? tlsConnect({
            host: address,
            port: target.port,
            servername: target.hostIsIp ? undefined : target.host,
            ALPNProtocols: ['http/1.1'],
            ...pipeline.stages.pools.tls,
          })
        : netConnect({ host: address, port: target.port })
    pipeline.stages.pools.relay(upstream)
    upstreamSocket = upstream
    upstream.setTimeout(connectTimeoutMs, () => upstream.destroy(Object.assign(new Error('connect timeout'), { code: 'UND_ERR_CONNECT_TIMEOUT' })))
    upstream.once('error', (err) => {
      if (ctx.status === 0) refuse(upstreamError(err))
      else client.destroy()
    })
    upstream.once(target.scheme === 'https' ? 'secureConnect' : 'connect', () => {
      stopEarlyWatch()
      upstream.setTimeout(0)
      // Only the handshake goes now. Bytes the client sent after it wait for the 101: if the
      // upstream turns the WebSocket down they may be a pipelined request, and are never sent.
      // latin1, as the head was read and as undici writes one: a header byte past 0x7f goes on as
      // that byte, not as its two-byte UTF-8 spelling.
      upstream.write(requestHead, 'latin1')
      open.add(client)
      pipeline.stages.metrics.openTunnels.inc()
      // Until the upstream answers, either side closing ends the attempt; then the relay owns it.
      const stopEarly = watchClose(client, upstream, onClosed)
      let answerHeadBytes = 0
      let relayScrubber: WebSocketScrubber | null = null
      let closable: ClosableWebSocket | null = null
      readUpgradeResponse(upstream, expectedAccept(key), headersMs, (err, response) => {
        stopEarly()
        ctx.upstreamMs = performance.now() - ctx.t0
        if (err || !response) {
          upstream.destroy()
          untrack()
          refuse(err)
          return
        }
        // Judged again by the policy in force now: it may have changed while the upstream took its time.
        const refusal = pipeline.refusalNow(ctx)
        if (refusal !== null) {
          upstream.destroy()
          untrack()
          refuse(refusal)
          return
        }
        const { binding, credential } = ctx
        if (binding && credential) {
          if (response.headers['sec-websocket-extensions'] !== undefined) {
            upstream.destroy()
            untrack()
            refuse(new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream answered the WebSocket handshake with an extension none was offered: its messages could come compressed, and could not be checked for the credential'))
            return
          }
          // Every credential the source holds for the binding, not only this call's (CredentialSource.held).
          const source = ctx.credentialSource
          const held = () => source?.held(binding) ?? NONE_HELD
          scrubResponseHeaders(response.headers, binding, credential, held())
          // Asked again as each message starts: tokens issued while the socket is open are held too.
          relayScrubber = new WebSocketScrubber(() => bodyNeedlesFor(binding, credential, held()))
          relayScrubber.once('error', (err) => {
            if (err instanceof LatchkeyError) recordEnd(ctx, err.code, err.reason)
            client.destroy()
            upstream.destroy()
          })
        }
        // A cookie set on a route's WebSocket handshake is scoped to the route as any other (forward/route-cookie.ts).
        if (target.route !== null && (response.headers['set-cookie'] !== undefined || response.headers['set-cookie2'] !== undefined)) pipeline.scopeCookies(response.headers, target)
        ctx.status = 101
        ctx.relayed = true
        answerHeadBytes = response.headBytes
        client.write(serializeSwitchingProtocols(response), 'latin1')
        // Its frames followed each way from here, so a drain can close it between two (websocket-close.ts).
        closable = new ClosableWebSocket(client, upstream, relayScrubber ?? upstream)
        if (head.length) closable.writeToUpstream(head)
        if (relayScrubber) {
          relayScrubber.pipe(client)
          if (response.rest.length) relayScrubber.write(response.rest)
          relay(client, upstream, onClosed, relayScrubber)
        } else {
          if (response.rest.length) closable.writeToAgent(response.rest)
          relay(client, upstream, onClosed)
        }
        const scrubbing = relayScrubber
        closeWhenIdle(ctx, client, idleMs, scrubbing ? () => scrubbing.waiting : undefined)
        // Opened while the sidecar drains (the 101 came late): closed at once, as the others were.
        if (pipeline.draining) closable.goAway()
      })
      function untrack() {
        open.delete(client)
        pipeline.stages.metrics.openTunnels.dec()
      }
      // Bytes relayed, counted only once the relay opened: before the 101 nothing of the
      // upstream's answer reached the agent, nor anything of the agent's past its handshake.
      // Both counts are frames: the handshake each way is not.
      function measure() {
        ctx.bytesIn = Math.max(0, upstream.bytesWritten - Buffer.byteLength(requestHead, 'latin1'))
        ctx.bytesOut = Math.max(0, upstream.bytesRead - answerHeadBytes)
      }
      function onClosed() {
        if (relayScrubber) ctx.credentialInBody = relayScrubber.found
        const gone = closable?.outcome
        if (gone) recordEnd(ctx, 'LK_DRAINING', gone)
        untrack()
        if (ctx.status === 0) ctx.status = 502
        else measure()
        pipeline.finish(ctx)
      }
    })
  }
  run().catch(refuse)
}
