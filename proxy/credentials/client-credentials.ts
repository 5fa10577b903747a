// OAuth 2.0 client credentials (RFC 6749 §4.4) against an external authorization server, for
// APIs that trust their own AS rather than the broker. The client secret stays in the sidecar;
// each token is asked for with exactly the binding's scopes (and `resource`, RFC 8707, when
// set), so a route gets no more than it needs. Cached and refreshed by CachedTokenSource.
import { Pool } from 'undici'
import { createSecureContext } from 'node:tls'
import type { CredentialBinding, TaskRef } from '../context.js'
import type { CredentialBindingConfig } from '../../lib/config/schema.js'
import { ExchangeFailed, grantedScopesProblem, MAX_EXPIRES_IN_S, MAX_SCOPE_TEXT, MAX_TOKEN_RESPONSE_BYTES, readCapped, type IssuedToken } from './exchange-outcome.js'
import type { TokenIssuer } from './broker-source.js'
import { quotesSent } from '../forward/scrub.js'

interface Client {
  url: URL
  pool: Pool
  clientId: string
  /** Read at each use, not once: a rotated client secret is sent from the next token request. */
  readonly secret: string
  method: 'client_secret_basic' | 'client_secret_post'
  resource: string | undefined
}

/** RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined and base64-encoded. */
const formEncode = (s: string) => encodeURIComponent(s).replace(/%20/g, '+')

/**
 * Whether an AS's text (its refusal, a scope it granted), as quoted (`shown`) or whole, reveals
 * the client secret in any spelling forward/scrub.ts knows: as sent (plain, form-encoded, inside
 * the Basic header) or escaped over it.
 */
function quotesSecret(c: Client, shown: string, ...whole: unknown[]): boolean {
  const basic = `${formEncode(c.clientId)}:${formEncode(c.secret)}`
  return quotesSent([{ value: c.secret, within: [basic, Buffer.from(basic).toString('base64')] }], shown, ...whole)
}

export class ClientCredentialsIssuer implements TokenIssuer {
  readonly needsTask = false
  private readonly clients = new Map<string, Client>()

  constructor(
    configs: readonly CredentialBindingConfig[],
    secretOf: (name: string) => string | undefined,
    private readonly timeoutMs: number,
    /** Trusted CAs for an https:// token_url (sidecar.upstream_ca_file added to Node's); undefined: Node's. */
    ca?: string[],
  ) {
    // One context for the list: given `ca`, every connection would parse all of it again.
    const secureContext = ca ? createSecureContext({ ca }) : undefined
    for (const c of configs) {
      if (c.source !== 'client_credentials' || !c.oauth) continue
      const secret = secretOf(c.oauth.client_secret)
      if (!secret) throw new Error(`credential "${c.id}": client secret ${c.oauth.client_secret} is not configured`)
      const url = new URL(c.oauth.token_url)
      const name = c.oauth.client_secret
      this.clients.set(c.id, {
        url,
        pool: new Pool(url.origin, { connections: 2, headersTimeout: timeoutMs, bodyTimeout: timeoutMs, connectTimeout: timeoutMs, ...(secureContext ? { connect: { secureContext } } : {}) }),
        clientId: c.oauth.client_id,
        // A reload never leaves a secret a credential needs missing (it is refused): the last one otherwise.
        get secret() {
          return secretOf(name) ?? secret
        },
        method: c.oauth.auth_method,
        resource: c.oauth.resource,
      })
    }
  }

  async issue(_task: TaskRef | null, binding: CredentialBinding): Promise<IssuedToken> {
    const registered = this.clients.get(binding.id)
    if (!registered) throw new ExchangeFailed('refused', `credential ${binding.id} has no client-credentials registration`)
    // The secret as it is now, kept for this request: what is sent is what its answer is checked for.
    const c: Client = { ...registered, secret: registered.secret }
    const form = new URLSearchParams({ grant_type: 'client_credentials' })
    if (binding.scopes.length > 0) form.set('scope', binding.scopes.join(' '))
    if (c.resource) form.set('resource', c.resource)
    const headers: Record<string, string> = { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' }
    if (c.method === 'client_secret_basic') headers.authorization = `Basic ${Buffer.from(`${formEncode(c.clientId)}:${formEncode(c.secret)}`).toString('base64')}`
    else {
      form.set('client_id', c.clientId)
      form.set('client_secret', c.secret)
    }
    let status: number
    let text: string
    try {
      const res = await c.pool.request({ method: 'POST', path: c.url.pathname + c.url.search, headers, body: form.toString(), signal: AbortSignal.timeout(this.timeoutMs) })
      status = res.statusCode
      const capped = Number(res.headers['content-length']) > MAX_TOKEN_RESPONSE_BYTES ? null : await readCapped(res.body, MAX_TOKEN_RESPONSE_BYTES)
      if (capped === null) {
        res.body.destroy()
        throw new ExchangeFailed('invalid_response', `authorization server ${c.url.origin} answered ${status} with a body over ${MAX_TOKEN_RESPONSE_BYTES} bytes`)
      }
      text = capped
    } catch (err) {
      if (err instanceof ExchangeFailed) throw err
      const e = err as { code?: string; name?: string }
      const timedOut = e.name === 'TimeoutError' || (e.code ?? '').includes('TIMEOUT')
      throw new ExchangeFailed('unreachable', timedOut ? `authorization server ${c.url.origin} did not answer within ${this.timeoutMs} ms` : `authorization server ${c.url.origin} unreachable (${e.code ?? e.name ?? 'error'})`)
    }
    let body: Record<string, unknown>
    try {
      body = JSON.parse(text) as Record<string, unknown>
    } catch {
      throw new ExchangeFailed(status >= 500 ? 'unreachable' : 'invalid_response', `authorization server answered ${status} without a JSON body`)
    }
    if (status !== 200) {
      const code = typeof body.error === 'string' ? body.error.slice(0, 64) : 'error'
      const why = typeof body.error_description === 'string' ? `: ${body.error_description.slice(0, 300)}` : ''
      // An AS echoing what it was sent would have the agent, the audit and the log hold the client
      // secret. Looked for whole as well: a secret across the cut would be quoted in part.
      const said = quotesSecret(c, code + why, body.error, body.error_description) ? '; its error text quoted the client secret and is not repeated' : ` ${code}${why}`
      throw new ExchangeFailed(status >= 500 ? 'unreachable' : 'refused', `authorization server refused client credentials (${status}${said})`)
    }
    const token = body.access_token
    const expiresIn = body.expires_in
    if (typeof token !== 'string' || token.length === 0 || String(body.token_type).toLowerCase() !== 'bearer') {
      throw new ExchangeFailed('invalid_response', 'authorization server answered 200 without a bearer token')
    }
    // RFC 6749 §5.1: expires_in is RECOMMENDED, not required; without it, assume a short life.
    const lifetimeS = typeof expiresIn === 'number' && expiresIn > 0 ? Math.min(expiresIn, MAX_EXPIRES_IN_S) : 300
    // The granted scopes go into the audit and the log of every call the token serves: checked
    // whether or not the binding names scopes. Bounded before it is searched; a text that quotes
    // the client secret (in any spelling quotesSecret knows) is refused without repeating it.
    const scope = body.scope ?? undefined
    if (scope !== undefined && typeof scope !== 'string') throw new ExchangeFailed('invalid_response', 'authorization server answered 200 with a scope that is not a string')
    if (scope !== undefined && scope.length > MAX_SCOPE_TEXT) throw new ExchangeFailed('invalid_response', `authorization server granted scope text over ${MAX_SCOPE_TEXT} characters`)
    if (scope !== undefined && quotesSecret(c, scope)) {
      throw new ExchangeFailed('invalid_response', `authorization server granted scopes ${binding.scopes.length > 0 ? 'not asked for (not repeated: they quote the client secret)' : 'that quote the client secret (not repeated)'}`)
    }
    // Nor the token it issued: a scope not asked for is quoted in the agent's 503, and asked for
    // none the scope is taken into every audit event and log line the token serves. The agent
    // holding the token could call the API without the sidecar, refused here or not.
    if (scope !== undefined && quotesSent([token], scope)) throw new ExchangeFailed('invalid_response', 'authorization server granted scopes that quote the access token it issued (not repeated)')
    const granted = scope !== undefined ? scope.split(' ').filter(Boolean) : [...binding.scopes]
    const malformed = grantedScopesProblem(granted)
    if (malformed) throw new ExchangeFailed('invalid_response', `authorization server granted ${malformed}`)
    // Narrowed to the route: a server that grants more than was asked is not trusted with it.
    const extra = binding.scopes.length > 0 ? granted.filter((s) => !binding.scopes.includes(s)) : []
    if (extra.length > 0) {
      const named = extra.join(' ').slice(0, 200)
      throw new ExchangeFailed('invalid_response', `authorization server granted scopes not asked for (${quotesSecret(c, named, body.scope) ? 'not repeated: they quote the client secret' : named})`)
    }
    return { token, jti: `cc:${binding.id}`, scopes: granted, expiresInMs: lifetimeS * 1000 }
  }

  async close(): Promise<void> {
    await Promise.all([...this.clients.values()].map((c) => c.pool.close()))
  }
}
