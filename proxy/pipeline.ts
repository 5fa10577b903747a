// The request pipeline: listen → identify → decide → resolve → credential → forward → audit.
// Every entry path (absolute-form, reverse route, CONNECT, WebSocket upgrade) builds one
// CallContext and runs the same `admit` front half; only the forward differs. ARCHITECTURE.md
// draws this file.
import type { IncomingHttpHeaders, IncomingMessage, Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { Logger } from '../lib/log.js'
import type { AuditEvent, AuditSink, CallContext, CredentialSource, Decider, Decision, Identifier, Identity, Resolution, ResolvedAddress, Resolver, Target, Via } from './context.js'
import { checkLocalCaller, isLocalhostName, isLoopbackPeer } from './listen/local-caller.js'
import { carriesTaskHandle } from './identify/proxy-authorization.js'
import { closingSockets, lingerOnClose } from './listen/linger.js'
import { cutWebSocket } from './listen/websocket-close.js'
import { LatchkeyError, asLatchkeyError, asOriginRefusal, renderError, renderErrorRaw, type ErrorCode } from './errors.js'
import type { CredentialBindings } from './credentials/bindings.js'
import { credentialedQuery, stripQueryParams } from './credentials/bindings.js'
import { hostHeader, parseAbsoluteTarget, parseReverseTarget, parseTunnelledTarget, targetOfRefusal, urlHostPort, type ReverseRoutes } from './listen/target.js'
import { checkFraming } from './listen/framing.js'
import { outboundRequestHeaders, type OutboundHeaders } from './forward/headers.js'
import { forward, hasRequestBody, type BodyInspector, type ForwardTimeouts } from './forward/forward.js'
import { locationThroughRoute, resolveLocation } from './forward/route-location.js'
import { scopeRouteCookies } from './forward/route-cookie.js'
import { isIP } from 'node:net'
import { processIp } from '../lib/ip-address.js'
import { classifyAddress } from './resolve/classify.js'
import { FormOverrideScanner, isFormBody, methodMatters, uncheckableBody } from './policy/body-override.js'
import { isJsonBody, JsonOverrideScanner } from './policy/json-override.js'
import { isMultipartBody, MultipartOverrideScanner } from './policy/multipart-override.js'
import { tokenSha256 } from './audit/token-hash.js'
import { newEventId } from './audit/event-id.js'
import { isoTimestamp } from './audit/event-time.js'
import { withoutTaskHandles } from '../lib/task-handle.js'
import { LiveCalls } from './live-calls.js'
import type { PinnedPools } from './forward/pools.js'
import type { SidecarMetrics } from './metrics.js'
import type { PeerProcessResolver } from './identify/peer-process.js'
import { recordEnd } from './call-outcome.js'

export interface Stages {
  identifier: Identifier
  decider: Decider
  resolver: Resolver
  bindings: CredentialBindings
  credentials: CredentialSource
  pools: PinnedPools
  routes: ReverseRoutes
  audit: AuditSink
  log: Logger
  metrics: SidecarMetrics
  /** Identifies the calling process per connection, when configured. */
  callers?: PeerProcessResolver | undefined
  /** Revocations heard on the control stream: throws LK_REVOKED for a revoked agent or task. */
  revocations?: { check(identity: Identity): void } | undefined
  /** sidecar.allow_remote_clients: reverse routes may be addressed by any host name. */
  namedHosts?: boolean
  /** timeouts.body_ms: an agent's request body silent this long ends the call (forward/body-stall.ts); 0, never. */
  bodyGapMs?: number
  /** timeouts.headers_ms: also the most a final response may take once interim (1xx) ones began (forward.ts); 0, never. */
  headersMs?: number
}

/** What a plaintext CONNECT tunnel was opened for, carried to each request inside it. */
export interface TunnelOrigin {
  target: Target
  proxyAuthorization: string | undefined
}

/**
 * The proxy credential a request runs under. Inside a tunnel it is the one its CONNECT carried:
 * a request there naming another (another task's handle, or one where the CONNECT named none) is
 * refused, not run in the tunnel's task under a name it did not ask for, with that task's token.
 *
 * A Proxy-Authorization that is the request's own Authorization, byte for byte, and holds no task
 * handle is no proxy credential: it is what aiohttp sends when a ClientSession's default headers
 * carry the upstream's Authorization (it copies it to the proxy, for every plain-http request
 * through a proxy), and every such call was refused 407 as naming no open task. It is taken as no
 * header (the default task, the agent with no task, or with tasks.required a 407). A task
 * handle in it is still judged as one: an ended task stays refused, never downgraded.
 */
export function proxyCredentialOf(headers: IncomingHttpHeaders, tunnel: TunnelOrigin | null): string | undefined {
  const own = headers['proxy-authorization']
  if (tunnel === null) return own !== undefined && own === headers.authorization && !carriesTaskHandle(own) ? undefined : own
  if (own !== undefined && own !== tunnel.proxyAuthorization) {
    throw new LatchkeyError('LK_BAD_REQUEST', "a request inside a CONNECT tunnel names another proxy credential than the CONNECT did: the tunnel's requests run in the task it was opened for; open a tunnel with this one")
  }
  return tunnel.proxyAuthorization
}


/**
 * Query parameters by which frameworks act on another method than the request line's: Laravel's,
 * Symfony's and Express's `_method`, and Salesforce's REST API's `_HttpMethod` (a POST with
 * `?_HttpMethod=DELETE` deletes the record).
 */
const METHOD_OVERRIDE_PARAMS = ['_method', '_httpmethod']
/** "method" in any case, any letter of it percent-encoded (either case's code): a query without it needs no look. */
const MAYBE_METHOD_OVERRIDE = /(?:m|%[46]d)(?:e|%[46]5)(?:t|%[57]4)(?:h|%[46]8)(?:o|%[46]f)(?:d|%[46]4)/i

/** Pipelined requests one connection may have waiting for their turn; one more closes it. */
const MAX_QUEUED_PER_CONNECTION = 64

export class Pipeline {
  /** Sockets being closed by a refusal or an early answer (listen/linger.ts): nothing more is taken from them. */
  readonly closingSockets = closingSockets
  /** Calls admitted and not yet finished, with the client socket each one holds: what a revocation cuts. */
  readonly live = new LiveCalls()
  /** Pipelined requests waiting for the response before them, per connection (see awaitTurn). */
  private readonly waitingTurn = new WeakMap<Socket, { req: IncomingMessage; neverSent: (agentLeft: boolean) => void }[]>()
  /** Set when shutdown begins: new calls are refused (503) and connections are not kept alive. */
  draining = false

  /** What forward() is given for every call, built once. */
  private readonly forwardTimeouts: ForwardTimeouts

  constructor(readonly stages: Stages) {
    this.forwardTimeouts = { bodyGapMs: stages.bodyGapMs ?? 0, headersMs: stages.headersMs ?? 0 }
  }

  newContext(via: Via, method: string): CallContext {
    return {
      via,
      startedAt: Date.now(),
      t0: performance.now(),
      method,
      target: null,
      destination: null,
      methodOverrides: null,
      // Until identify runs, and for calls refused before it: the sidecar's agent, no task.
      identity: this.stages.identifier.unidentified,
      decision: null,
      resolved: null,
      binding: null,
      credential: null,
      credentialSource: null,
      caller: null,
      status: 0,
      bytesIn: 0,
      bytesOut: 0,
      upstreamMs: null,
      errorCode: null,
      errorReason: null,
      credentialInBody: 0,
      relayed: false,
      forward: null,
      admitting: null,
      cutWith: null,
      liveSocket: null,
      livePrev: null,
      liveNext: null,
    }
  }

  /**
   * identify → decide → resolve → credential. Refuses by throwing a LatchkeyError (or rejecting).
   * Synchronous unless a stage must wait on I/O (DNS, a token exchange): then a promise.
   */
  admit(ctx: CallContext, proxyAuthorization: string | undefined, withCredential: boolean, socket?: Socket): void | Promise<void> {
    const callers = this.stages.callers
    if (callers && socket) {
      // The first request of a connection waits for /proc; later ones find the answer on the socket.
      const caller = callers.resolve(socket)
      if (caller instanceof Promise) {
        return caller.then((c) => {
          ctx.caller = c
          callers.check(c)
          return this.admitIdentified(ctx, proxyAuthorization, withCredential, socket)
        })
      }
      ctx.caller = caller
      callers.check(caller)
    }
    return this.admitIdentified(ctx, proxyAuthorization, withCredential, socket)
  }

  private admitIdentified(ctx: CallContext, proxyAuthorization: string | undefined, withCredential: boolean, socket: Socket | undefined): void | Promise<void> {
    const s = this.stages
    const target = ctx.target!
    ctx.identity = s.identifier.identify(proxyAuthorization)
    s.revocations?.check(ctx.identity)
    if (socket) this.live.add(ctx, socket)
    // Read once: the whole call is judged by the policy in force now, even across a swap (an open relay is judged again: cutDenied).
    const decider = s.decider
    this.judge(ctx, decider.decide(ctx.method, target))
    // Fail closed: no call goes out that the audit sink could not keep (spool full, on_full: refuse).
    if (s.audit.accepting && !s.audit.accepting()) throw new LatchkeyError('LK_AUDIT_UNAVAILABLE', s.audit.unavailableReason?.() ?? 'the audit sink cannot keep more; no new egress until it can')
    const resolved = s.resolver.resolve(target)
    return resolved instanceof Promise ? resolved.then((r) => this.admitResolved(ctx, r, withCredential, decider)) : this.admitResolved(ctx, resolved, withCredential, decider)
  }

  /** Records the decision; throws when it refuses. A CONNECT denied only for what TLS would hide goes on: handleConnect opens it for plain HTTP only. */
  private judge(ctx: CallContext, decision: Decision): void {
    ctx.decision = decision
    if (decision.action === 'deny' && decision.enforced && !(decision.inspectable && ctx.via === 'connect')) {
      throw new LatchkeyError('LK_POLICY_DENIED', decision.reason, decision.rule)
    }
  }

  private admitResolved(ctx: CallContext, resolved: Resolution, withCredential: boolean, decider: Decider): void | Promise<void> {
    if ('denied' in resolved) {
      // Address-range denials are never report-only: they are the SSRF floor under every policy.
      ctx.decision = resolved.denied
      throw new LatchkeyError('LK_NETWORK_DENIED', resolved.denied.reason, resolved.denied.rule)
    }
    ctx.resolved = resolved.address
    // A deny written by address holds the names that resolve into it: decided again, knowing it.
    if (decider.decidesByAddress && !ctx.target!.hostIsIp) this.judge(ctx, decider.decide(ctx.method, ctx.target!, resolved.address))
    if (!withCredential) return
    const binding = this.stages.bindings.match(ctx.target!)
    if (!binding) return
    ctx.binding = binding
    ctx.credentialSource = this.stages.credentials
    const credential = this.stages.credentials.get(binding, ctx.identity)
    if (credential instanceof Promise) {
      return credential.then((c) => {
        ctx.credential = c
      })
    }
    ctx.credential = credential
  }

  /** `tunnel` is set for requests that arrived inside a plaintext CONNECT tunnel. */
  handleRequest(req: IncomingMessage, res: ServerResponse, expectContinue: boolean, tunnel: TunnelOrigin | null = null): void {
    // Pipelined behind a response still being written: this request waits for its turn, so
    // nothing queued behind a refusal that closes the connection is ever decided or sent.
    if (!this.isTurnOf(req, res, tunnel, () => this.handleRequest(req, res, expectContinue, tunnel))) return
    const url = req.url ?? ''
    const ctx = this.newContext(viaOf(url, tunnel), req.method ?? 'GET')
    try {
      checkFraming(req)
      if (url === '*') throw new LatchkeyError('LK_BAD_REQUEST', 'asterisk-form requests (OPTIONS *) are not proxied')
      // TRACE (and IIS's TRACK) make the server echo the request back, injected credential and all.
      if (ctx.method === 'TRACE' || ctx.method === 'TRACK') {
        throw new LatchkeyError('LK_BAD_REQUEST', `${ctx.method} is not proxied: the upstream would echo the request, credentials included`)
      }
      this.readTarget(ctx, req, tunnel)
      const target = ctx.target!
      // The admin API named through the proxy (an agent with HTTP_PROXY set opening its task): see `admin`.
      if (target.route === null && target.scheme === 'http' && this.isAdminAddress(target, req.socket.remoteAddress)) {
        req.url = target.path + target.search
        if (expectContinue) res.writeContinue()
        this.admin!.emit('request', req, res)
        return
      }
      this.refuseIfDraining()
      // Inside a tunnel the agent's proxy credential came with the CONNECT, not with each request.
      const admitted = this.admit(ctx, proxyCredentialOf(req.headers, tunnel), true, req.socket)
      if (admitted) {
        ctx.admitting = (cut) => this.refuse(ctx, res, cut)
        admitted
          .then(() => this.dispatchAfterWait(ctx, req, res, expectContinue))
          .catch((err: unknown) => {
            ctx.admitting = null
            // Cut while it waited: answered then.
            if (ctx.cutWith === null) this.refuse(ctx, res, err)
          })
        return
      }
      this.dispatch(ctx, req, res, expectContinue)
    } catch (err) {
      // A request a tunnel carried is at least recorded against the origin the tunnel was opened
      // for, as the plain HTTP it was.
      if (ctx.target === null) ctx.target = tunnel ? { ...tunnel.target, scheme: 'http' } : targetOfRefusal(err)
      this.refuse(ctx, res, err)
    }
  }

  /**
   * Sets the target of a request about to be decided, then, for a reverse route (a request
   * addressed to the sidecar itself), refuses it when a web page sent it: recorded with the
   * target it was for. Throws as parseTarget does, and LK_FOREIGN_ORIGIN.
   */
  readTarget(ctx: CallContext, req: IncomingMessage, tunnel: TunnelOrigin | null, upgrade = false): void {
    let target: Target
    try {
      target = ctx.target = this.parseTarget(req.url ?? '', tunnel, upgrade)
    } catch (err) {
      // A call to a route that does not exist is addressed to the sidecar all the same: a web page
      // is refused it as one to a route that does. Told 404 here and 403 there, a rebound page
      // (which reads the answers) listed the routes configured, name by name.
      if (err instanceof LatchkeyError && err.code === 'LK_NO_ROUTE') checkLocalCaller(req.headers, this.stages.namedHosts)
      throw err
    }
    // `?_method=DELETE` makes a POST a DELETE to Laravel, Symfony and Express's method-override
    // (`?_HttpMethod=DELETE` to Salesforce): a method policy never judged. Removed in every
    // spelling, as the override headers are.
    if (target.search.length > 1 && MAYBE_METHOD_OVERRIDE.test(target.search)) target.search = stripQueryParams(target.search, METHOD_OVERRIDE_PARAMS, 'keep')
    if (target.route !== null) checkLocalCaller(req.headers, this.stages.namedHosts)
    // A proxy credential in the upstream's header would be passed on (on an origin no credential
    // is bound to) and the call made for another task than the agent meant: refused, not guessed.
    if (carriesTaskHandle(req.headers.authorization)) {
      throw new LatchkeyError('LK_BAD_REQUEST', 'the Authorization header carries a task handle, a proxy credential never sent upstream: name the task in Proxy-Authorization (the proxy_url as HTTP_PROXY), not in a base URL')
    }
  }

  /**
   * A request's target, read the way it arrived: inside a tunnel, origin-form (a route), or
   * absolute-form. Throws LK_BAD_REQUEST / LK_NO_ROUTE. A client whose HTTP_PROXY is this sidecar
   * sends its calls to the sidecar's own routes in absolute form (http://127.0.0.1:15001/<route>/…):
   * they are those routes, not an upstream that happens to be the sidecar.
   */
  parseTarget(url: string, tunnel: TunnelOrigin | null, upgrade = false): Target {
    if (tunnel) {
      // Node's fetch tunnels http:// too, so its calls to a route arrive in a CONNECT to the sidecar itself.
      const target = parseTunnelledTarget(url, tunnel.target, upgrade)
      return this.isOwnAddress(tunnel.target) ? parseReverseTarget(target.path + target.search, this.stages.routes) : target
    }
    if (url.startsWith('/')) return parseReverseTarget(url, this.stages.routes)
    const target = parseAbsoluteTarget(url, upgrade)
    if (target.scheme === 'http' && this.isOwnAddress(target)) {
      return parseReverseTarget(target.path + target.search, this.stages.routes)
    }
    return target
  }

  /** Where the sidecar listens, once it does: the host spellings that mean it, and its port; the same of its admin API; this host's interface addresses (normalised). */
  ownAddress: { hosts: ReadonlySet<string>; port: number; adminHosts: ReadonlySet<string>; adminPort: number; hostAddresses: ReadonlySet<string> } | null = null

  /** Whether a target names the sidecar's own listener (a route's address, never an upstream). */
  isOwnAddress(target: Target): boolean {
    return target.port === this.ownAddress?.port && this.ownAddress.hosts.has(target.host)
  }

  /**
   * The admin API's server, once it listens. An agent with HTTP_PROXY set sends its calls to the
   * admin API (opening its task, /healthz) through the proxy: they are served as if made
   * directly, the same checks applying (checkLocalCaller), and are no egress: nothing is dialled
   * or audited. A CONNECT to it is handed over the same way (listen/tunnel.ts).
   */
  admin: Server | null = null

  /**
   * Whether a call to `target` from `peer` is one to the sidecar's admin API: its port, a spelling
   * it takes for its own, from a loopback client, on a proxy port that takes no remote ones. A
   * proxy open to remote clients (allow_remote_clients) never opens the admin API to them: behind
   * a local forwarder (Istio's inbound passthrough, port-forward, ssh -L) a remote caller's
   * connection comes from a loopback address too.
   */
  isAdminAddress(target: Target, peer: string | undefined): boolean {
    return this.admin !== null && !this.stages.namedHosts && target.port === this.ownAddress?.adminPort && this.ownAddress.adminHosts.has(target.host) && isLoopbackPeer(peer)
  }

  /**
   * A URL a response names (a Location, a Link's, an operation's status URL) as relayed to the
   * agent (see forward/route-location.ts), or null for one back to the sidecar itself: the agent's
   * client follows redirects on its own (fetch does, and keeps the method and body on a 307 or
   * 308), and pollers and paginators follow the others, so an upstream could have it make a call
   * it never chose, on a route, with that route's credential. No upstream has cause to name the
   * sidecar: it is never told the sidecar's address.
   */
  readonly relocate = (location: string, target: Target): string | null => {
    const resolved = resolveLocation(location, target)
    if (resolved !== null && this.namesSidecar(resolved)) return null
    const upstream = target.route === null ? undefined : this.stages.routes.get(target.route)
    return upstream ? locationThroughRoute(location, resolved, target, upstream) : location
  }

  /**
   * A route's response's cookies put under `/<route>/` (forward/route-cookie.ts), in place; one
   * that cannot be is dropped and the operator told why (never its name or value: an upstream
   * chose them, and one may hold a session).
   */
  readonly scopeCookies = (headers: IncomingHttpHeaders, target: Target): void => {
    if (target.route === null) return
    const upstream = this.stages.routes.get(target.route)
    if (!upstream) {
      // A route no longer known (never so for a target parseReverseTarget made): nothing to scope them to.
      delete headers['set-cookie']
      delete (headers as Record<string, unknown>)['set-cookie2']
      return
    }
    const dropped = scopeRouteCookies(headers, target, upstream)
    if (dropped.length > 0) this.stages.log.warn({ route: target.route, dropped }, "a Set-Cookie from a route's upstream could not be scoped to the route and was not relayed")
  }

  /** Whether a URL reaches the sidecar's listener or admin API: a spelling it takes for its own, or any loopback, unspecified or this host's address or localhost name on their ports. */
  private namesSidecar(url: URL): boolean {
    const own = this.ownAddress
    if (own === null) return false
    const { host, port } = urlHostPort(url, url.protocol === 'https:' ? 'https' : 'http')
    if (port !== own.port && port !== own.adminPort) return false
    if ((port === own.port ? own.hosts : own.adminHosts).has(host)) return true
    // Reached by names it cannot list (a Service's, a pod's: allow_remote_clients), and taking any
    // Host for its own: any host on its ports may be the sidecar.
    if (this.stages.namedHosts) return true
    // `*.localhost` is loopback whatever DNS says (RFC 6761): curl answers it so, and the sidecar takes it for its own Host.
    if (isIP(host) === 0) return isLocalhostName(host)
    const cls = classifyAddress(host)
    // This host's own address reaches a sidecar listening on every address (allow_remote_clients),
    // and a client follows it without the proxy wherever NO_PROXY covers the network.
    return cls === 'loopback' || cls === 'unspecified' || own.hostAddresses.has(processIp(host).toNormalizedString())
  }

  /**
   * Whether `req` may be handled now. Pipelined behind a response still being written, it waits
   * for its turn (`retry` runs then); on a connection already closing, it is recorded as not sent.
   */
  private isTurnOf(req: IncomingMessage, res: ServerResponse, tunnel: TunnelOrigin | null, retry: () => void): boolean {
    if (res.socket === null) this.awaitTurn(req, res, tunnel, retry)
    else if (this.closingSockets.has(req.socket)) this.neverSent(req, tunnel)
    else return true
    return false
  }

  /**
   * node:http answers pipelined requests in order, giving each response the connection when the
   * one before it is done. If that one closes the connection (a refusal does), this request's
   * turn never comes: it is recorded as not sent, and nothing of it leaves the sidecar.
   */
  private awaitTurn(req: IncomingMessage, res: ServerResponse, tunnel: TunnelOrigin | null, run: () => void): void {
    const socket = req.socket
    // One close listener per connection, however many requests are queued on it.
    let queue = this.waitingTurn.get(socket)
    if (!queue) {
      const q: { req: IncomingMessage; neverSent: (agentLeft: boolean) => void }[] = (queue = [])
      this.waitingTurn.set(socket, q)
      // The agent's own close (its FIN, or a reset) is told from the sidecar's: what it had queued is its doing then.
      let agentLeft = false
      socket.once('end', () => (agentLeft = true))
      socket.once('close', (hadError: boolean) => {
        this.waitingTurn.delete(socket)
        for (const waiting of q.splice(0)) waiting.neverSent(agentLeft || hadError)
      })
    }
    // node:http parses every pipelined request it is sent, and reads on as each response goes
    // out: a client pipelining without end had this queue hold all of it (measured: 300,000
    // requests, 800 MB). No client pipelines this deep; one that does loses the connection, and
    // what it had queued is recorded as not sent.
    if (queue.length >= MAX_QUEUED_PER_CONNECTION) {
      if (!socket.destroyed) {
        this.stages.log.warn({ queued: queue.length }, 'a client pipelined too many requests; its connection was closed')
        this.closingSockets.add(socket)
        // The call being answered is cut with the connection: recorded as the sidecar's doing,
        // not as the agent hanging up.
        for (const [ctx, s] of this.live.entries()) {
          if (s === socket) recordEnd(ctx, 'LK_BAD_REQUEST', `more than ${MAX_QUEUED_PER_CONNECTION} requests pipelined on one connection: it was closed`)
        }
        socket.destroy()
      }
      this.neverSent(req, tunnel)
      return
    }
    const entry = { req, neverSent: (agentLeft: boolean) => this.neverSent(req, tunnel, undefined, agentLeft) }
    queue.push(entry)
    res.once('socket', () => {
      const i = queue.indexOf(entry)
      if (i !== -1) queue.splice(i, 1)
      run()
    })
  }

  /** Records a request that arrived on a connection already being closed: decided by nobody, sent nowhere. */
  neverSent(req: IncomingMessage, tunnel: TunnelOrigin | null, via: Via = viaOf(req.url ?? '', tunnel), agentLeft = false): void {
    const ctx = this.newContext(via, req.method ?? 'GET')
    // The target, where it can be read, so the trail says what was not sent.
    const url = req.url ?? ''
    try {
      if (via !== 'connect' && (via !== 'tunnelled' || tunnel)) ctx.target = this.parseTarget(url, tunnel)
    } catch {
      // Unreadable: recorded without one.
    }
    // Whose it was, so it is in its task's history; a proxy credential that names nothing leaves it the sidecar's.
    try {
      ctx.identity = this.stages.identifier.identify(tunnel ? tunnel.proxyAuthorization : req.headers['proxy-authorization'])
    } catch {
      // Unidentified, as a refusal before identify is.
    }
    // Status 0: no response went, and none was seen (the agent got the one before it, then the close).
    const cut = req.socket ? this.cutSockets.get(req.socket) : undefined
    if (cut) recordEnd(ctx, cut.code, `not sent: the connection was cut before its turn (${cut.reason})`)
    else if (this.draining) recordEnd(ctx, 'LK_DRAINING', 'not sent: the sidecar is shutting down and the connection ended before its turn')
    else if (agentLeft && !this.closingSockets.has(req.socket)) recordEnd(ctx, 'LK_CLIENT_CLOSED', 'not sent: the agent closed the connection before its turn')
    else recordEnd(ctx, 'LK_BAD_REQUEST', 'not sent: the connection was closing before its turn (a request before it was refused, malformed, or answered before its body was read)')
    this.finish(ctx)
  }

  /**
   * Whether a CONNECT or upgrade arrived pipelined behind another request (node:http hands them
   * over at once, ahead of the responses still owed on the connection). Such a request is not
   * taken: it is recorded as not sent, and the connection ends once those responses are written.
   */
  refusePipelinedTakeover(req: IncomingMessage, socket: Socket, via: Via): boolean {
    const owed = owedResponse(socket)
    const behind = owed && !owed.writableFinished
    if (!behind && !this.closingSockets.has(socket)) return false
    this.closingSockets.add(socket)
    this.neverSent(req, null, via)
    if (behind) {
      owed.once('finish', () => socket.destroySoon())
      owed.once('close', () => socket.destroy())
    } else {
      socket.destroySoon()
    }
    return true
  }

  /** Refuses a request whose `Expect` names something other than 100-continue (node:http would answer 417 itself, unaudited). */
  handleUnmetExpectation(req: IncomingMessage, res: ServerResponse, tunnel: TunnelOrigin | null = null): void {
    if (!this.isTurnOf(req, res, tunnel, () => this.handleUnmetExpectation(req, res, tunnel))) return
    const ctx = this.newContext(viaOf(req.url ?? '', tunnel), req.method ?? 'GET')
    this.refuse(ctx, res, new LatchkeyError('LK_EXPECTATION_FAILED', 'only "Expect: 100-continue" is supported'))
  }

  /**
   * A call admitted after waiting (DNS, a token exchange) is looked at again before anything is
   * sent: a revocation heard meanwhile applies to it, and a call cut or abandoned while it waited
   * (its socket gone) goes nowhere, the credential it was handed included. Either way it is recorded.
   */
  private dispatchAfterWait(ctx: CallContext, req: IncomingMessage, res: ServerResponse, expectContinue: boolean): void {
    ctx.admitting = null
    // Cut while it waited, and answered with the refusal then: the credential it was handed goes nowhere.
    if (ctx.cutWith) return
    this.stages.revocations?.check(ctx.identity)
    if (res.destroyed || req.socket === null || req.socket.destroyed) {
      throw new LatchkeyError('LK_CLIENT_CLOSED', 'the agent closed the connection before the call was sent')
    }
    this.dispatch(ctx, req, res, expectContinue)
  }

  private dispatch(ctx: CallContext, req: IncomingMessage, res: ServerResponse, expectContinue: boolean): void {
    const target = ctx.target!
    const headers = outboundRequestHeaders(req.headers, ctx.binding?.strip ?? null)
    // The URI wins over whatever Host the agent sent.
    headers.host = hostHeader(target)
    if (ctx.binding && ctx.credential) {
      target.search = credentialedQuery(target.search, ctx.binding)
      ctx.binding.inject(headers, target, ctx.credential)
      // The response body is checked for the credential as it streams, which needs it readable
      // (see forward/body-scrub.ts), and whole: a Range of an echo hands the secret over in
      // pieces no check can recognise. Without Range the upstream answers 200 with all of it,
      // which every client takes.
      headers['accept-encoding'] = 'identity'
      if (headers.range !== undefined) {
        delete headers.range
        delete headers['if-range']
      }
    }
    const destination = this.judgeDestination(ctx, req, target, ctx.resolved!)
    if (destination !== null) headers.destination = destination
    // Before any 100: a body that cannot be checked for `_method` is refused unsent.
    const inspect = this.overrideCheck(ctx, req, target, ctx.resolved!)
    // Policy has spoken; only now may the agent send its body.
    if (expectContinue) res.writeContinue()
    // Shutdown began while this call was being admitted: it is answered, then the connection ends.
    if (this.draining) res.shouldKeepAlive = false
    this.send(ctx, req, res, headers, inspect)
  }

  /**
   * WebDAV's COPY and MOVE write to the resource `Destination` names (RFC 4918 §10.3: an
   * absolute URI or an absolute path), which the request line does not: `COPY /public/x` with
   * `Destination: /admin/config` overwrote a path a deny covers (nginx's dav module). That path
   * is judged as the request line's is, on the target's host (a server acts on its own
   * resources), for any method that carries the header. A deny refuses the call; a value that
   * cannot be read one way only, or two of them, is refused rather than guessed at.
   *
   * On a route, the agent knows the route's URLs, not the upstream's: a Destination on the same
   * route (its path, or the sidecar's own URL) is the upstream's path, judged as such and sent
   * on rewritten, as the request line is. Returns the value to send, or null to send it as it came.
   */
  private judgeDestination(ctx: CallContext, req: IncomingMessage, target: Target, address: ResolvedAddress): string | null {
    // headers first: headersDistinct builds a map of every header on first use, per request.
    if (req.headers.destination === undefined) return null
    const values = req.headersDistinct.destination!
    if (values.length !== 1) throw new LatchkeyError('LK_BAD_REQUEST', 'more than one Destination header: which one a WebDAV server acts on cannot be told')
    const value = values[0]!.trim()
    const unreadable = (why: string) => new LatchkeyError('LK_BAD_REQUEST', `the Destination header is not an absolute URL or absolute path the policy can judge: ${why}`)
    const isPath = value.startsWith('/')
    // nginx's path starts at the first `/` after `scheme://`; the URL parser ends the authority at
    // `/`, `?`, `#` or `\`: `http://host?/admin/x` was `/` to the policy and /admin/x to nginx.
    if (!isPath && /^[a-z][a-z0-9+.-]*:\/\/[^/?#\\]*[?#\\]/i.test(value)) throw unreadable('something other than a path follows its host')
    let destination: Target
    try {
      destination = this.parseTarget(isPath && target.route === null ? `${target.scheme}://${hostHeader(target)}${value}` : value, null)
    } catch (err) {
      throw unreadable(err instanceof LatchkeyError ? err.reason : String(err))
    }
    if (destination.route !== target.route && destination.route !== null) {
      throw unreadable(target.route === null ? 'it names a route of the sidecar, and the request is not on one' : `it names route "${destination.route}", not this request's "${target.route}"`)
    }
    // Recorded whatever the decision: the trail says where a COPY or MOVE wrote, or would have.
    ctx.destination = destination.path
    const decision = this.stages.decider.decide(ctx.method, { ...target, path: destination.path, search: destination.search }, address)
    if (decision.action === 'deny') this.judge(ctx, { ...decision, reason: `the Destination header names a path the policy denies: ${decision.reason}` })
    if (destination.route === null) return null
    const upstreamPath = destination.path + destination.search
    return isPath ? upstreamPath : `${target.scheme}://${hostHeader(target)}${upstreamPath}`
  }

  /**
   * For a form, JSON or multipart POST where the method matters: what judges the `_method` its
   * body carries as the body streams past (each scan a Content-Type calls for, when it is more
   * than one kind to one framework or another). Null for any other request.
   */
  private overrideCheck(ctx: CallContext, req: IncomingMessage, target: Target, address: ResolvedAddress): BodyInspector | null {
    if (ctx.method !== 'POST' || !hasRequestBody(req)) return null
    const type = req.headers['content-type']
    const form = isFormBody(type)
    const json = isJsonBody(type)
    const multipart = isMultipartBody(type)
    if (!(form || json || multipart) || !methodMatters(this.stages.decider, target, address)) return null
    uncheckableBody(req.headers['content-encoding'], type)
    const judge = (method: string) => {
      if (method === 'POST') return
      // Recorded before it is judged: a refusal names it too.
      if (!ctx.methodOverrides) ctx.methodOverrides = [method]
      else if (!ctx.methodOverrides.includes(method)) ctx.methodOverrides.push(method)
      this.judge(ctx, this.stages.decider.decide(method, target, address))
    }
    const scanners = [form && new FormOverrideScanner(judge), json && new JsonOverrideScanner(judge), multipart && new MultipartOverrideScanner(judge)].filter((x) => x !== false)
    return (chunk, last) => {
      for (const scanner of scanners) {
        scanner.feed(chunk)
        if (last) scanner.end()
      }
    }
  }

  /** The forward itself: the request streams (through `inspect`, if set). */
  private send(ctx: CallContext, req: IncomingMessage, res: ServerResponse, headers: OutboundHeaders, inspect: BodyInspector | null): void {
    const target = ctx.target!
    forward(
      this.stages.pools.get(target, ctx.resolved!, ctx.identity),
      ctx,
      req,
      res,
      target.path + target.search,
      headers,
      (err) => {
        if (err) this.refuse(ctx, res, err)
        else this.finish(ctx)
      },
      this.relocate,
      this.scopeCookies,
      this.stages.audit.recordBeforeResponse === true ? this.auditKeeps : null,
      this.forwardTimeouts,
      inspect,
    )
  }

  /** Whether the audit sink keeps what it is given now (AuditSink.keepsNow). */
  private readonly auditKeeps = (): boolean => this.stages.audit.keepsNow?.() !== false

  /** Records a refusal on the call's context; returns it as a LatchkeyError. */
  private recordRefusal(ctx: CallContext, err: unknown, asOrigin = false): LatchkeyError {
    const e = asOrigin ? asOriginRefusal(this.asLatchkeyError(err)) : this.asLatchkeyError(err)
    // A call cut on purpose (see cut) keeps that as its outcome, not the abort the cut caused;
    // its status stays what the agent got: nothing (0) when the cut came before the response.
    if (recordEnd(ctx, e.code, e.reason)) ctx.status = e.status
    return e
  }

  /** Whether a request waiting for its turn on this connection is still receiving its body. */
  queuedBodyIncomplete(socket: Socket): boolean {
    return this.waitingTurn.get(socket)?.at(-1)?.req.complete === false
  }

  /** Records a request nobody decided and nothing was sent for (status 0: no response went either). */
  recordNotSent(ctx: CallContext, code: ErrorCode, reason: string): void {
    recordEnd(ctx, code, reason)
    this.finish(ctx)
  }

  /** Records a refused call that gets no response of its own (its connection is ending). */
  recordRefused(ctx: CallContext, err: unknown): void {
    this.recordRefusal(ctx, err)
    this.finish(ctx)
  }

  /** The same refusal on a bare socket (CONNECT, upgrades, parser errors), then the call is recorded. */
  refuseSocket(ctx: CallContext, socket: Socket, err: unknown): void {
    const e = this.recordRefusal(ctx, err)
    if (socket.writable) socket.end(renderErrorRaw(e))
    else socket.destroy()
    this.finish(ctx)
  }

  /** Answers with a coded refusal (if nothing was sent yet) and records the call. */
  refuse(ctx: CallContext, res: ServerResponse, err: unknown): void {
    // On a route or inside a tunnel the agent's client is talking to the origin: no 407 (asOriginRefusal).
    const e = this.recordRefusal(ctx, err, ctx.via === 'reverse' || ctx.via === 'tunnelled')
    if (!res.headersSent && !res.destroyed) {
      const { status, statusText, headers, body } = renderError(e)
      // After a framing error, or with a request body left unread, the connection's remaining
      // bytes cannot be trusted as the next request: close it. A refusal answers before the
      // request is read (`readableEnded` is false even for a GET's empty body), so in practice
      // every refusal closes its connection, and what was pipelined behind it is recorded as not
      // sent (pipelining.test): an agent reconnects after a 403, which its HTTP client does.
      if (e.status === 400 || !res.req.readableEnded || this.draining) {
        headers.connection = 'close'
        // The request's socket: a pipelined response has none of its own until the one before it
        // ends. Gone (null) when the agent's connection already ended: nothing more to read then.
        const socket = res.req.socket
        if (socket) this.closingSockets.add(socket)
        lingerOnClose(res.req)
      }
      res.writeHead(status, statusText, headers)
      res.end(body)
    } else if (!res.writableEnded) {
      res.destroy()
    }
    this.finish(ctx)
  }

  asLatchkeyError(err: unknown): LatchkeyError {
    return asLatchkeyError(err, (detail) => this.stages.log.error({ err: detail }, 'internal error in pipeline'))
  }

  /**
   * Cuts every admitted call whose identity matches (a revoked agent or task, a task that ended):
   * keep-alive connections, streaming responses, tunnels and WebSockets end now, recorded with
   * `code`. `matches` is also given the call (a revoked token is told by the credential it carries).
   * Returns how many.
   */
  cut(matches: (identity: Identity, ctx: CallContext) => boolean, code: ErrorCode = 'LK_REVOKED', reason = 'revoked'): number {
    let n = 0
    for (const [ctx, socket] of this.live.entries()) {
      if (!matches(ctx.identity, ctx)) continue
      n++
      const answer = ctx.admitting
      if (answer) {
        // Nothing sent yet: answered with the refusal now (an agent reads a 403 where a bare
        // close told it nothing), and never dispatched once admission settles. Answered then, a
        // call waiting on a slow broker was held, and recorded, only as long as the broker took
        // (timeout_ms), where the revocation is to stop it within the second.
        ctx.admitting = null
        ctx.cutWith = this.cutRefusal(ctx, code, reason)
        this.cutSockets.set(socket, { code, reason })
        answer(ctx.cutWith)
        continue
      }
      this.live.delete(ctx)
      recordEnd(ctx, code, reason)
      this.cutSocket(ctx, socket, code, reason)
    }
    return n
  }

  /** What a call cut while admission waited is answered: a revoked agent's or task's refusal as admit gives it (its rule named), else the cut's. */
  private cutRefusal(ctx: CallContext, code: ErrorCode, reason: string): LatchkeyError {
    if (code === 'LK_REVOKED') {
      try {
        this.stages.revocations?.check(ctx.identity)
      } catch (err) {
        if (err instanceof LatchkeyError) return err
      }
    }
    return new LatchkeyError(code, reason)
  }

  /**
   * A plaintext tunnel the sidecar closed while idle (shutdown, a revoked agent): its CONNECT, if
   * still a live call, is recorded as cut with `code` once the socket closes (tunnel.ts, handOver),
   * not taken for one its agent closed.
   */
  endHeldTunnel(ctx: CallContext, code: ErrorCode, reason: string): void {
    if (ctx.liveSocket === null) return
    this.live.delete(ctx)
    recordEnd(ctx, code, reason)
  }

  /** Why a connection was cut on purpose: what its queued requests are recorded as (neverSent). */
  private readonly cutSockets = new WeakMap<Socket, { code: ErrorCode; reason: string }>()

  /**
   * While draining, a new call (a request, a CONNECT, an upgrade) is refused, 503 LK_DRAINING.
   * Called once its target is read, so the trail says which call the shutdown turned away.
   */
  refuseIfDraining(): void {
    if (this.draining) throw new LatchkeyError('LK_DRAINING', 'the sidecar is shutting down; retry on a new connection')
  }

  /** A relay about to start, refused when the policy in force now denies it (see deniedNow); its decision recorded. Null when it may go on. */
  refusalNow(ctx: CallContext): LatchkeyError | null {
    const d = this.deniedNow(ctx)
    if (d === null) return null
    ctx.decision = d
    return new LatchkeyError('LK_POLICY_DENIED', policyChanged(d), d.rule)
  }

  /**
   * The enforced denial the policy in force now (or `decider`) gives a call already admitted, or
   * null. Inspectable or not: a relay's bytes are not read, so no request in it can be told apart.
   * A relay about to start (a tunnel's first TLS byte, a WebSocket's 101) is judged again by it:
   * one opened under a policy since changed would otherwise relay to what is now denied, as long
   * as it lasts (cutDenied judges only relays already running).
   */
  deniedNow(ctx: CallContext, decider: Decider = this.stages.decider): Decision | null {
    const target = ctx.target
    if (target === null) return null
    let d = decider.decide(ctx.method, target)
    if (!(d.action === 'deny' && d.enforced) && decider.decidesByAddress && ctx.resolved && !target.hostIsIp) d = decider.decide(ctx.method, target, ctx.resolved)
    return d.action === 'deny' && d.enforced ? d : null
  }

  /**
   * Ends a call's connection, then its forward, now. In that order: the forward's end would
   * answer the agent with the refusal, which reads as "never sent", for a request the upstream
   * may already have (an agent retrying a POST on it did it twice). A cut is a cut. A relayed
   * WebSocket is told why (a Close, 1008, and the code) and ends its sockets itself
   * (websocket-close.ts); not at the drain's deadline, which already sent its 1001.
   */
  private cutSocket(ctx: CallContext, socket: Socket, code: ErrorCode, reason: string, rule: string | null = null): void {
    this.cutSockets.set(socket, { code, reason })
    if (code === 'LK_DRAINING' || !cutWebSocket(socket, code, rule)) socket.destroy()
    ctx.forward?.abort(new LatchkeyError(code, reason))
  }

  /**
   * A new policy is in force: every open relay (TLS tunnel, WebSocket) it refuses is cut, recorded
   * LK_POLICY_DENIED with the rule. A request is judged by one policy, but a relay is no one
   * request: left open, an agent's pooled tunnel kept reaching a host denied since, for as long
   * as it was used. Returns how many.
   */
  cutDenied(decider: Decider): number {
    let n = 0
    for (const [ctx, socket] of this.live.entries()) {
      if (!ctx.relayed) continue
      const d = this.deniedNow(ctx, decider)
      if (d === null) continue
      this.live.delete(ctx)
      if (recordEnd(ctx, 'LK_POLICY_DENIED', policyChanged(d))) ctx.decision = d
      this.cutSocket(ctx, socket, 'LK_POLICY_DENIED', policyChanged(d), d.rule)
      n++
    }
    return n
  }

  /**
   * Shutdown begins: new calls are refused (503 LK_DRAINING), and a call in flight whose response
   * head is not written yet answers with `Connection: close`, so its client does not send the
   * next request on a connection about to end.
   */
  beginDrain(): void {
    this.draining = true
    for (const [, socket] of this.live.entries()) {
      const res = owedResponse(socket)
      if (res && !res.headersSent) res.shouldKeepAlive = false
    }
  }

  finish(ctx: CallContext): void {
    this.live.delete(ctx)
    const d = ctx.decision
    const t = ctx.target
    const event: AuditEvent = {
      // Made here, not when the call began: nothing before the audit reads it, and a call's
      // request and response path is the latency the agent waits for.
      id: newEventId(),
      ts: isoTimestamp(ctx.startedAt),
      agent: ctx.identity.agentId,
      task: ctx.identity.taskId,
      user: ctx.identity.userSub,
      via: ctx.via,
      // `POST;_method=DELETE`: the upstream's framework acted on the body's method, judged as that.
      method: ctx.methodOverrides ? `${ctx.method};_method=${ctx.methodOverrides.join(',')}` : ctx.method,
      scheme: t ? (ctx.via === 'connect' ? 'tunnel' : t.scheme) : null,
      // Handles removed: see withoutTaskHandles (a pass over the text only where `lkt_` or `%` is in it).
      // A host is one of the texts: `<handle>.example` is a name an agent can ask for (lower-cased, the handle
      // is still most of itself).
      host: t ? withoutTaskHandles(t.host) : null,
      port: t?.port ?? null,
      path: t && ctx.via !== 'connect' ? withoutTaskHandles(t.path) : null,
      destination: ctx.destination === null ? null : withoutTaskHandles(ctx.destination),
      address: ctx.resolved?.address ?? null,
      status: ctx.status,
      bytes_in: ctx.bytesIn,
      bytes_out: ctx.bytesOut,
      duration_ms: round(performance.now() - ctx.t0),
      upstream_ms: ctx.upstreamMs === null ? null : round(ctx.upstreamMs),
      decision: d ? (d.action === 'deny' ? (d.enforced ? 'deny' : 'report') : 'allow') : null,
      rule: d?.rule ?? null,
      reason: reasonOf(ctx, d),
      credential:
        ctx.binding && ctx.credential
          ? // One object shape for every event: the hash is undefined (and not serialized) where there is none.
            { binding: ctx.binding.id, id: ctx.credential.id, audience: ctx.binding.audience, scopes: ctx.credential.scopes, token_sha256: tokenSha256(ctx.binding, ctx.credential) ?? undefined }
          : null,
      error: ctx.errorCode,
      caller: ctx.caller && { pid: ctx.caller.pid, uid: ctx.caller.uid, exe: ctx.caller.exe, sha256: ctx.caller.sha256 },
    }
    const s = this.stages
    s.audit.write(event)
    s.log.info(event, 'call')
    s.metrics.countCall(ctx.via, event.decision ?? 'none', ctx.errorCode ?? 'ok', event.duration_ms / 1000)
    if (ctx.credentialInBody > 0) this.reportReflection(ctx, event)
  }

  /** The agent did not get it; the operator should know the upstream reflects it. Kept out of finish, which every call runs. */
  private reportReflection(ctx: CallContext, event: AuditEvent): void {
    this.stages.log.warn({ id: event.id, binding: ctx.binding?.id, host: event.host, path: event.path, matches: ctx.credentialInBody }, 'the upstream sent the injected credential back in a response body: overwritten before the agent got it')
  }
}

/** The response node:http is writing on this connection (`_httpMessage`), if one is still owed. */
export function owedResponse(socket: Socket): ServerResponse | null {
  return (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage ?? null
}

function viaOf(url: string, tunnel: TunnelOrigin | null): Via {
  return tunnel ? 'tunnelled' : url.startsWith('/') ? 'reverse' : 'absolute'
}

/** What the trail says of why: the call's error, or its denial; without task handles (a route's name quoted in LK_NO_ROUTE can be one). */
function reasonOf(ctx: CallContext, d: Decision | null): string | null {
  const reason = ctx.errorReason ?? (d && d.action === 'deny' ? d.reason : null)
  return reason === null ? null : withoutTaskHandles(reason)
}

/** Why a call admitted under one policy was refused or cut under the next. */
function policyChanged(d: Decision): string {
  return `the policy changed: ${d.reason}`
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000
}
