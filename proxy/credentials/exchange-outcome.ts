// What a token exchange can come back with, apart from the client that performs it: the token
// cache and the OAuth issuer need these types without loading the broker client (and with it
// jose and all of undici) into a sidecar that has no broker configured.
export type ExchangeOutcome = 'refused' | 'unreachable' | 'evidence' | 'invalid_response'

export class ExchangeFailed extends Error {
  constructor(
    readonly outcome: ExchangeOutcome,
    message: string,
  ) {
    super(message)
  }
}

export interface IssuedToken {
  token: string
  jti: string
  scopes: string[]
  /** Relative lifetime from the broker's expires_in: immune to clock skew between the two hosts. */
  expiresInMs: number
}

/** The most of a token endpoint's answer that is read: a token response is a few kilobytes. */
export const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
/** The longest lifetime taken from expires_in, whatever the issuer says (a day). */
export const MAX_EXPIRES_IN_S = 24 * 60 * 60

/** The longest token taken from an issuer: past most servers' limit for all of a request's headers. */
export const MAX_ISSUED_TOKEN_CHARS = 16 * 1024

/**
 * Why an issued token (an access token, a leased secret) cannot be injected as it is, as words
 * following "it", or null. `cannotCarry` is the injector's own judgement (CredentialBinding):
 * a header carries printable ASCII only. Never quotes the token.
 */
export function issuedTokenProblem(token: string, cannotCarry: (value: string) => string | null): string | null {
  if (token.length === 0) return 'is empty'
  if (token.length > MAX_ISSUED_TOKEN_CHARS) return `is over ${MAX_ISSUED_TOKEN_CHARS} characters`
  if (/^\s|\s$/.test(token)) return 'starts or ends with whitespace'
  return cannotCarry(token)
}

/** RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), printable ASCII but `"` and `\`. */
const SCOPE_TOKEN = /^[\x21\x23-\x5b\x5d-\x7e]+$/
/** The most of an issuer's `scope` text taken, in characters: a grant of a couple of hundred scopes fits. */
export const MAX_SCOPE_TEXT = 16 * 1024
/** The most scopes taken from one answer: what an audit event keeps (lib/audit-limits.ts FIELD_LIMITS.scopes). */
export const MAX_GRANTED_SCOPES = 256
/** The longest scope taken: a scope is a name or a URI. */
export const MAX_SCOPE_CHARS = 256

/**
 * What is wrong with the scopes an issuer granted (its `scope` text, split at its spaces), as
 * words to follow "granted", or null when each is a scope-token and they are within bounds.
 * Granted scopes go into every audit event and log line of the calls the token serves: text the
 * issuer chose is not taken unbounded, nor with characters no scope has. Never quotes them.
 */
export function grantedScopesProblem(scopes: readonly string[]): string | null {
  if (scopes.length > MAX_GRANTED_SCOPES) return `${scopes.length} scopes, more than the ${MAX_GRANTED_SCOPES} taken`
  if (scopes.some((s) => s.length > MAX_SCOPE_CHARS)) return `a scope over ${MAX_SCOPE_CHARS} characters`
  if (scopes.some((s) => !SCOPE_TOKEN.test(s))) return 'a scope that is not a scope-token (RFC 6749 §3.3: printable ASCII but space, " and \\)'
  return null
}

/** Reads a body up to `limit` bytes; past that, stops reading and returns null. */
export async function readCapped(body: AsyncIterable<Buffer> & { destroy(err?: Error): unknown }, limit: number): Promise<string | null> {
  const chunks: Buffer[] = []
  let n = 0
  for await (const chunk of body) {
    n += chunk.length
    if (n > limit) {
      body.destroy()
      return null
    }
    chunks.push(chunk)
  }
  return Buffer.concat(chunks).toString('utf8')
}
