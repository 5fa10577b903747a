// The request pipeline: listen → identify → decide → resolve → credential → forward → audit.
// Every entry path (absolute-form, reverse route, CONNECT, WebSocket upgrade) builds one
// CallContext and runs the same `admit` front half; only the forward differs. ARCHITECTURE.md
// draws this file.
import { randomUUID } from 'node:crypto'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Logger } from '../lib/log.js'
import type { AuditEvent, AuditSink, CallContext, CredentialSource, Decider, Identifier, Resolver, Target, Via } from './context.js'
import { LatchkeyError, renderError } from './errors.js'
import type { CredentialBindings } from './credentials/bindings.js'
import { stripQueryParams } from './credentials/bindings.js'
import { hostHeader, parseAbsoluteTarget, parseReverseTarget, parseTunnelledTarget, type ReverseRoutes } from './listen/target.js'
import { checkFraming } from './listen/framing.js'
import { outboundRequestHeaders } from './forward/headers.js'
import { forward } from './forward/forward.js'
import type { PinnedPools } from './forward/pools.js'
import type { SidecarMetrics } from './metrics.js'

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
}

/** What a plaintext CONNECT tunnel was opened for, carried to each request inside it. */
export interface TunnelOrigin {
  target: Target
  proxyAuthorization: string | undefined
}

export class Pipeline {
  constructor(readonly stages: Stages) {}

  newContext(via: Via, method: string): CallContext {
    return {
      id: randomUUID(),
      via,
      startedAt: Date.now(),
      t0: performance.now(),
      method,
      target: null,
      identity: { agentId: '', taskId: null, userSub: null },
      decision: null,
      resolved: null,
      binding: null,
      credential: null,
      status: 0,
      bytesIn: 0,
      bytesOut: 0,
      upstreamMs: null,
      errorCode: null,
      errorReason: null,
    }
  }

  /** identify → decide → resolve → credential. Throws a LatchkeyError to refuse. */
  async admit(ctx: CallContext, proxyAuthorization: string | undefined, withCredential: boolean): Promise<void> {
    const s = this.stages
    const target = ctx.target!
    ctx.identity = s.identifier.identify(proxyAuthorization)
    const decision = s.decider.decide(ctx.method, target)
    ctx.decision = decision
    if (decision.action === 'deny' && decision.enforced) throw new LatchkeyError('LK_POLICY_DENIED', decision.reason, decision.rule)
    const resolved = await s.resolver.resolve(target)
    if ('denied' in resolved) {
      // Address-range denials are never report-only: they are the SSRF floor under every policy.
      ctx.decision = resolved.denied
      throw new LatchkeyError('LK_NETWORK_DENIED', resolved.denied.reason, resolved.denied.rule)
    }
    ctx.resolved = resolved.address
    if (!withCredential) return
    const binding = s.bindings.match(target)
    if (binding) {
      ctx.binding = binding
      ctx.credential = await s.credentials.get(binding, ctx.identity)
    }
  }

  /** `tunnel` is set for requests that arrived inside a plaintext CONNECT tunnel. */
  handleRequest(req: IncomingMessage, res: ServerResponse, expectContinue: boolean, tunnel: TunnelOrigin | null = null): void {
    const url = req.url ?? ''
    const ctx = this.newContext(tunnel ? 'tunnelled' : url.startsWith('/') ? 'reverse' : 'absolute', req.method ?? 'GET')
    this.runRequest(ctx, req, res, expectContinue, tunnel).catch((err: unknown) => this.refuse(ctx, res, err))
  }

  private async runRequest(ctx: CallContext, req: IncomingMessage, res: ServerResponse, expectContinue: boolean, tunnel: TunnelOrigin | null): Promise<void> {
    checkFraming(req)
    const url = req.url ?? ''
    if (url === '*') throw new LatchkeyError('LK_BAD_REQUEST', 'asterisk-form requests (OPTIONS *) are not proxied')
    ctx.target = tunnel
      ? parseTunnelledTarget(url, tunnel.target)
      : ctx.via === 'reverse'
        ? parseReverseTarget(url, this.stages.routes).target
        : parseAbsoluteTarget(url)
    // Inside a tunnel the agent's proxy credential came with the CONNECT, not with each request.
    await this.admit(ctx, tunnel ? tunnel.proxyAuthorization : req.headers['proxy-authorization'], true)
    const target = ctx.target
    const headers = outboundRequestHeaders(req.headers, ctx.binding?.strip ?? null)
    // The URI wins over whatever Host the agent sent.
    headers.host = hostHeader(target)
    if (ctx.binding && ctx.credential) {
      target.search = stripQueryParams(target.search, ctx.binding.stripQuery)
      ctx.binding.inject(headers, target, ctx.credential)
    }
    // Policy has spoken; only now may the agent send its body.
    if (expectContinue) res.writeContinue()
    const pool = this.stages.pools.get(target, ctx.resolved!)
    forward(pool, ctx, req, res, target.path + target.search, headers, (err) => {
      if (err) this.refuse(ctx, res, err)
      else this.finish(ctx)
    })
  }

  /** Answers with a coded refusal (if nothing was sent yet) and records the call. */
  refuse(ctx: CallContext, res: ServerResponse, err: unknown): void {
    const e = this.asLatchkeyError(err)
    ctx.status = e.status
    ctx.errorCode = e.code
    ctx.errorReason = e.reason
    if (!res.headersSent && !res.destroyed) {
      const { status, headers, body } = renderError(e)
      // After a framing error, or with a request body left unread, the connection's remaining
      // bytes cannot be trusted as the next request: close it.
      if (e.status === 400 || !res.req.readableEnded) headers.connection = 'close'
      res.writeHead(status, headers)
      res.end(body)
    } else if (!res.writableEnded) {
      res.destroy()
    }
    this.finish(ctx)
  }

  asLatchkeyError(err: unknown): LatchkeyError {
    if (err instanceof LatchkeyError) return err
    // Unexpected: log the detail for the operator, tell the agent only that it happened.
    // Code, type and frames only: an error's message can quote a URL, and a URL can hold a credential.
    const e = err as { code?: string; name?: string; stack?: string }
    this.stages.log.error({ err: { code: e?.code, type: e?.name, frames: e?.stack?.split('\n').slice(1, 8).join('\n') } }, 'internal error in pipeline')
    return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'internal error in the sidecar')
  }

  finish(ctx: CallContext): void {
    const d = ctx.decision
    const t = ctx.target
    const event: AuditEvent = {
      id: ctx.id,
      ts: new Date(ctx.startedAt).toISOString(),
      agent: ctx.identity.agentId,
      task: ctx.identity.taskId,
      user: ctx.identity.userSub,
      via: ctx.via,
      method: ctx.method,
      scheme: t ? (ctx.via === 'connect' ? 'tunnel' : t.scheme) : null,
      host: t?.host ?? null,
      port: t?.port ?? null,
      path: t && ctx.via !== 'connect' ? t.path : null,
      address: ctx.resolved?.address ?? null,
      status: ctx.status,
      bytes_in: ctx.bytesIn,
      bytes_out: ctx.bytesOut,
      duration_ms: round(performance.now() - ctx.t0),
      upstream_ms: ctx.upstreamMs === null ? null : round(ctx.upstreamMs),
      decision: d ? (d.action === 'deny' ? (d.enforced ? 'deny' : 'report') : 'allow') : null,
      rule: d?.rule ?? null,
      reason: ctx.errorReason ?? (d && d.action === 'deny' ? d.reason : null),
      credential:
        ctx.binding && ctx.credential
          ? { binding: ctx.binding.id, id: ctx.credential.id, audience: ctx.binding.audience, scopes: ctx.credential.scopes }
          : null,
      error: ctx.errorCode,
    }
    const s = this.stages
    s.audit.write(event)
    s.log.info(event, 'call')
    s.metrics.calls.inc({ via: ctx.via, decision: event.decision ?? 'none', outcome: ctx.errorCode ?? 'ok' })
    s.metrics.duration.observe({ via: ctx.via }, event.duration_ms / 1000)
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000
}
