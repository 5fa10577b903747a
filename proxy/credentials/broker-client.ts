// The sidecar's RFC 8693 client: one POST to the broker's token endpoint per exchange, with the
// workload evidence as actor_token and the task's user token, if any, as subject_token. Every
// failure becomes an ExchangeFailed whose reason names what went wrong and never a token: what
// the broker says is quoted only if it does not reveal a token the sidecar sent it (quotesSent).
// The token's current actor (act.sub, outermost: broker/act.ts) must be the sidecar's agent_id:
// read, not verified (the broker signs; this is a consistency check), and refused otherwise.
import { Pool } from 'undici'
import { createSecureContext } from 'node:tls'
import { decodeJwt } from 'jose'
import { TOKEN_EXCHANGE_GRANT, TOKEN_TYPES } from '../../lib/oauth.js'
import { EvidenceUnavailable, type WorkloadEvidence } from '../attest/evidence.js'
import type { CredentialBinding, TaskRef } from '../context.js'
import { ActorMismatch, type TokenIssuer } from './broker-source.js'
import { ExchangeFailed, grantedScopesProblem, MAX_EXPIRES_IN_S, MAX_SCOPE_TEXT, MAX_TOKEN_RESPONSE_BYTES, readCapped, type IssuedToken } from './exchange-outcome.js'
import { quotesSent, WITHHELD } from '../forward/scrub.js'

export { ExchangeFailed, MAX_EXPIRES_IN_S, MAX_TOKEN_RESPONSE_BYTES, type ExchangeOutcome, type IssuedToken } from './exchange-outcome.js'

/** Said instead of a value the broker answered that reveals a token the sidecar sent it (its refusal: WITHHELD). */
const NOT_REPEATED = 'not repeated: it quotes a credential the sidecar sent'
/** Said instead of a value the broker answered that reveals the token it issued in the same answer. */
const NOT_REPEATED_ISSUED = 'not repeated: it quotes the token it issued'

/** How far this clock may run ahead of the broker's before a JWT's exp shortens its use here. */
const CLOCK_LEEWAY_MS = 60_000

export class BrokerClient implements TokenIssuer {
  readonly needsTask = true
  private readonly pool: Pool
  private readonly path: string

  constructor(
    url: string,
    private readonly timeoutMs: number,
    private readonly evidence: WorkloadEvidence,
    /** Trusted CAs for an https:// broker (sidecar.upstream_ca_file added to Node's); undefined: Node's. */
    ca?: string[],
  ) {
    const u = new URL(url)
    this.path = `${u.pathname.replace(/\/$/, '')}/oauth2/token`
    this.pool = new Pool(u.origin, { connections: 4, headersTimeout: timeoutMs, bodyTimeout: timeoutMs, connectTimeout: timeoutMs, ...(ca ? { connect: { secureContext: createSecureContext({ ca }) } } : {}) })
  }

  issue(task: TaskRef | null, binding: CredentialBinding, durationS: number, agentId: string): Promise<IssuedToken> {
    if (!task) return Promise.reject(new ExchangeFailed('refused', 'a broker token needs a task'))
    return this.exchange(task, binding.tokenAudience, binding.scopes, durationS, binding.source === 'broker_secret' ? TOKEN_TYPES.leasedSecret : TOKEN_TYPES.accessToken, agentId)
  }

  /** `agentId`, when given: a JWT whose act.sub is not it is refused with ActorMismatch. */
  async exchange(
    task: TaskRef,
    audience: string,
    scopes: readonly string[],
    durationS: number,
    requestedType: string = TOKEN_TYPES.accessToken,
    agentId?: string,
  ): Promise<IssuedToken> {
    let evidence: string
    try {
      evidence = await this.evidence.get()
    } catch (err) {
      throw new ExchangeFailed('evidence', `workload evidence unavailable: ${err instanceof EvidenceUnavailable ? err.message : 'error'}`)
    }
    const form = new URLSearchParams({ grant_type: TOKEN_EXCHANGE_GRANT })
    if (task.userToken) {
      form.set('subject_token', task.userToken)
      form.set('subject_token_type', TOKEN_TYPES.jwt)
      form.set('actor_token', evidence)
      form.set('actor_token_type', this.evidence.tokenType)
    } else {
      form.set('subject_token', evidence)
      form.set('subject_token_type', this.evidence.tokenType)
    }
    form.set('audience', audience)
    if (scopes.length > 0) form.set('scope', scopes.join(' '))
    form.set('requested_token_type', requestedType)
    form.set('task_id', task.id)
    form.set('task_duration', String(Math.max(1, durationS)))
    // The secrets this request carries: a broker that echoes them back (in its refusal, a scope,
    // an aud, an act.sub) would otherwise have the agent, the audit and the log hold them.
    const sent = task.userToken ? [task.userToken, evidence] : [evidence]
    const quotes = (shown: string, ...whole: unknown[]) => quotesSent(sent, shown, ...whole)

    let status: number
    let text: string
    try {
      const res = await this.pool.request({
        method: 'POST',
        path: this.path,
        headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
        body: form.toString(),
        signal: AbortSignal.timeout(this.timeoutMs),
      })
      status = res.statusCode
      const declared = Number(res.headers['content-length'])
      const capped = declared > MAX_TOKEN_RESPONSE_BYTES ? null : await readCapped(res.body, MAX_TOKEN_RESPONSE_BYTES)
      if (capped === null) {
        res.body.destroy()
        throw new ExchangeFailed('invalid_response', `broker answered ${status} with a body over ${MAX_TOKEN_RESPONSE_BYTES} bytes`)
      }
      text = capped
    } catch (err) {
      if (err instanceof ExchangeFailed) throw err
      const e = err as { code?: string; name?: string }
      const timedOut = e.name === 'TimeoutError' || e.code === 'UND_ERR_HEADERS_TIMEOUT' || e.code === 'UND_ERR_BODY_TIMEOUT' || e.code === 'UND_ERR_CONNECT_TIMEOUT'
      throw new ExchangeFailed('unreachable', timedOut ? `broker did not answer within ${this.timeoutMs} ms` : `broker unreachable (${e.code ?? e.name ?? 'error'})`)
    }
    let body: Record<string, unknown>
    try {
      body = JSON.parse(text) as Record<string, unknown>
    } catch {
      throw new ExchangeFailed(status >= 500 ? 'unreachable' : 'invalid_response', `broker answered ${status} without a JSON body`)
    }
    if (status !== 200) {
      const code = typeof body.error === 'string' ? body.error.slice(0, 64) : 'error'
      const why = typeof body.error_description === 'string' && body.error_description ? `: ${body.error_description.slice(0, 300)}` : ''
      const said = quotes(code + why, body.error, body.error_description) ? `; ${WITHHELD}` : ` ${code}${why}`
      throw new ExchangeFailed(status >= 500 ? 'unreachable' : 'refused', `broker refused the exchange (${status}${said})`)
    }
    const token = body.access_token
    const expiresIn = body.expires_in
    // A leased secret is not an access token: RFC 8693 §2.2.1 has its token_type be N_A.
    const wantType = requestedType === TOKEN_TYPES.leasedSecret ? 'n_a' : 'bearer'
    if (typeof token !== 'string' || typeof expiresIn !== 'number' || !(expiresIn > 0) || String(body.token_type).toLowerCase() !== wantType || body.issued_token_type !== requestedType) {
      throw new ExchangeFailed('invalid_response', `broker answered 200 without a usable ${requestedType === TOKEN_TYPES.leasedSecret ? 'leased secret' : 'bearer token'}`)
    }
    // What the broker says is checked, not trusted: no more scope than asked, no other audience,
    // no lifetime past a day nor past the token's own exp. Reasons never quote the token.
    if (body.scope !== undefined && typeof body.scope !== 'string') throw new ExchangeFailed('invalid_response', 'broker answered 200 with a scope that is not a string')
    if (typeof body.scope === 'string' && body.scope.length > MAX_SCOPE_TEXT) throw new ExchangeFailed('invalid_response', `broker granted scope text over ${MAX_SCOPE_TEXT} characters`)
    // Nor the token itself: a scope beyond the one asked is quoted in the agent's 503, and the
    // grant is kept for every audit event, log line and task description the token serves. The
    // agent holding it could call the API without the sidecar, refused here or not.
    if (typeof body.scope === 'string' && quotesSent([token], body.scope)) throw new ExchangeFailed('invalid_response', `broker granted scope (${NOT_REPEATED_ISSUED})`)
    const granted = typeof body.scope === 'string' ? body.scope.split(' ').filter(Boolean) : [...scopes]
    // Asking for no scope asks for what the registry allows: only a request that names scopes bounds them.
    const extra = scopes.length > 0 ? granted.filter((g) => !scopes.includes(g)) : []
    if (extra.length > 0) {
      const named = extra.map((g) => JSON.stringify(g.slice(0, 64))).join(' ')
      // The whole answer is looked at too: split at its spaces, a token holding one would be quoted in parts.
      throw new ExchangeFailed('invalid_response', `broker granted scope ${quotes(named, body.scope) ? `(${NOT_REPEATED})` : named} beyond the ${scopes.join(' ')} asked for`)
    }
    // Asked for none, what it grants is taken: still never text quoting what the exchange sent,
    // and bounded scope-tokens, for granted scopes go into every audit event and log line of the task.
    if (scopes.length === 0 && typeof body.scope === 'string' && quotes(body.scope, body.scope)) throw new ExchangeFailed('invalid_response', `broker granted scope (${NOT_REPEATED})`)
    const malformed = grantedScopesProblem(granted)
    if (malformed) throw new ExchangeFailed('invalid_response', `broker granted ${malformed}`)
    let expiresInMs = Math.min(expiresIn, MAX_EXPIRES_IN_S) * 1000
    let jti = typeof body.lease_id === 'string' ? body.lease_id.slice(0, 64) : 'unknown'
    let jtiField: { name: string; whole: unknown } = { name: 'lease_id', whole: body.lease_id }
    if (requestedType !== TOKEN_TYPES.leasedSecret) {
      let claims: ReturnType<typeof decodeJwt> | null = null
      try {
        claims = decodeJwt(token)
      } catch {
        // An opaque token is fine to inject; it just has no jti to audit, nor claims to check.
      }
      if (claims) {
        if (typeof claims.jti === 'string') {
          jti = claims.jti.slice(0, 128)
          jtiField = { name: 'jti', whole: claims.jti }
        }
        const aud = typeof claims.aud === 'string' ? [claims.aud] : Array.isArray(claims.aud) ? claims.aud : []
        if (!aud.includes(audience)) {
          const named = aud.map((a) => JSON.stringify(String(a).slice(0, 128))).join(', ') || 'missing'
          throw new ExchangeFailed('invalid_response', `broker issued a token for another audience (aud ${quotes(named, ...aud.map(String)) ? `(${NOT_REPEATED})` : named}, asked for ${audience})`)
        }
        // Never past the token's own exp. With an iat, by its stated life (exp - iat, no clock
        // involved), and by exp on this clock with a minute's leeway, for this clock running
        // ahead (the API judges exp on its own). Without one, exp on this clock is the only bound:
        // taken as it is, for a leeway there would inject the token up to a minute past its exp.
        if (claims.exp !== undefined) {
          if (typeof claims.exp !== 'number' || !Number.isFinite(claims.exp)) throw new ExchangeFailed('invalid_response', 'broker issued a token whose exp is not a number')
          const stated = typeof claims.iat === 'number' && claims.iat < claims.exp
          const leeway = stated ? CLOCK_LEEWAY_MS : 0
          const left = claims.exp * 1000 - Date.now() + leeway
          if (left <= 0) {
            const ago = Math.round((leeway - left) / 1000)
            throw new ExchangeFailed('invalid_response', `broker issued a token that expired ${ago} s ago${stated ? '' : ' by this host\'s clock (it has no iat)'}`)
          }
          expiresInMs = Math.min(expiresInMs, left)
          if (stated) expiresInMs = Math.min(expiresInMs, (claims.exp - (claims.iat as number)) * 1000)
        }
        // The current actor is the outermost act.sub (RFC 8693 §4.1; broker/exchange.ts builds it so).
        if (agentId !== undefined) {
          const act = claims.act as { sub?: unknown } | undefined
          const sub = typeof act === 'object' && act !== null ? act.sub : undefined
          const actor = typeof sub === 'string' ? sub.slice(0, 256) : null
          if (actor !== agentId) throw new ActorMismatch(agentId, actor !== null && quotes(actor, sub) ? `(${NOT_REPEATED})` : actor)
        }
      }
    }
    // The jti (or lease_id) is audited (file and collector) and listed by the task API: one that
    // quotes what the sidecar sent would put the user's token or the workload's evidence there.
    if (quotes(jti, jtiField.whole)) throw new ExchangeFailed('invalid_response', `broker issued a token whose ${jtiField.name} is ${NOT_REPEATED}`)
    // A lease_id is the broker's text beside the token (a JWT's jti cannot hold its own signature).
    if (quotesSent([token], jti, jtiField.whole)) throw new ExchangeFailed('invalid_response', `broker issued a token whose ${jtiField.name} is ${NOT_REPEATED_ISSUED}`)
    return { token, jti, scopes: granted, expiresInMs }
  }

  close(): Promise<void> {
    this.evidence.close()
    return this.pool.close()
  }
}
