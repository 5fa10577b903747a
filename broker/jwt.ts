// Verifying JWTs from others (workload attestations, user tokens): asymmetric algorithms only,
// so `alg: none` and HS256-signed-with-a-public-key are refused before any key is looked at;
// at most 30 s of clock skew; reasons that say what was wrong without echoing the token.
import { statSync } from 'node:fs'
import { createLocalJWKSet, createRemoteJWKSet, decodeProtectedHeader, errors, jwtVerify, type JSONWebKeySet, type JWTPayload, type JWTVerifyGetKey } from 'jose'
import { OAuthError } from './oauth-error.js'
import { isCompactJws } from '../lib/oauth.js'
import { byteSize, FileTooLarge, readSettingText } from '../lib/bounded-read.js'
import { MAX_DATE_MS } from '../lib/max-date.js'
import { memberNamedTwice, shownMemberName } from '../lib/json-members.js'

export const ASYMMETRIC_ALGS = ['ES256', 'ES384', 'ES512', 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'EdDSA', 'Ed25519']
export const MAX_SKEW_S = 30
/** Longer than any JWT we accept; refused before parsing. */
export const MAX_TOKEN_BYTES = 16_384

export class TokenInvalid extends Error {}


export interface JwksSource {
  jwks_file?: string | undefined
  jwks_url?: string | undefined
}

/** A JWK set file the broker cannot use at start. Code LK_STARTUP: the CLI prints the message, not a stack. */
export class JwksFileError extends Error {
  readonly code = 'LK_STARTUP'
  constructor(
    message: string,
    /** Missing or unreadable here, rather than wrong (check-config only warns). */
    readonly unreadable: boolean,
  ) {
    super(message)
  }
}

/** A JWK set file, parsed; throws when it is unreadable, not JSON, or not a JWK set. */
function readJwksFile(file: string): JWTVerifyGetKey {
  const jwks = JSON.parse(readSettingText(file)) as JSONWebKeySet | null
  if (typeof jwks !== 'object' || jwks === null || !Array.isArray(jwks.keys)) throw new Error('not a JWK set (no "keys" array)')
  return createLocalJWKSet(jwks)
}

/** `<file>: <problem>`, never the file's content. */
function jwksProblem(file: string, err: unknown): string {
  const e = err as NodeJS.ErrnoException
  if (err instanceof FileTooLarge) return `${file}: larger than ${byteSize(err.limit)}`
  if (e.syscall !== undefined) return `${file}: cannot read (${e.code ?? 'error'})`
  if (err instanceof SyntaxError) return `${file}: not valid JSON`
  return `${file}: ${e.message}`
}

/** What keySetFrom would say of a JWK set file at start: null when it is usable. */
export function jwksFileProblem(file: string, setting: string): JwksFileError | null {
  try {
    readJwksFile(file)
    return null
  } catch (err) {
    return new JwksFileError(`${setting} ${jwksProblem(file, err)}`, (err as NodeJS.ErrnoException).syscall !== undefined)
  }
}

/**
 * A key set from a file (re-read when it changes, checked at most every 5 s and on an unknown
 * `kid`) or a URL (jose's remote set: cached, refreshed on an unknown `kid` with a cooldown).
 */
export function keySetFrom(source: JwksSource, setting = 'jwks_file'): JWTVerifyGetKey {
  if (source.jwks_url) return createRemoteJWKSet(new URL(source.jwks_url), { cacheMaxAge: 600_000, cooldownDuration: 30_000, timeoutDuration: 5_000 })
  const file = source.jwks_file!
  let mtime = 0
  let checkedAt = 0
  let set: JWTVerifyGetKey | undefined
  const load = () => {
    const stat = statSync(file)
    if (stat.mtimeMs === mtime && set) return
    set = readJwksFile(file)
    mtime = stat.mtimeMs
  }
  // At start, a file missing or not a key set is said in one line naming the setting.
  try {
    load()
  } catch (err) {
    throw new JwksFileError(`${setting} ${jwksProblem(file, err)}`, (err as NodeJS.ErrnoException).syscall !== undefined)
  }
  return async (header, token) => {
    const now = Date.now()
    if (now - checkedAt > 5_000) {
      checkedAt = now
      try {
        load()
      } catch {
        // Keep the last good set: a half-written file must not lock every workload out.
      }
    }
    return set!(header, token)
  }
}

/** What was wrong with a token, for an error description and an audit reason. */
export function describeJwtError(err: unknown): string {
  if (err instanceof TokenInvalid) return err.message
  if (err instanceof errors.JWTExpired) return 'expired'
  if (err instanceof errors.JWTClaimValidationFailed) {
    if (err.reason === 'missing') return `claim "${err.claim}" is missing`
    // jose's "invalid": exp, nbf or iat that is no number (a string, null); not a time to wait for.
    if (err.reason === 'invalid') return `claim "${err.claim}" must be a number of seconds (NumericDate)`
    if (err.claim === 'nbf' || err.claim === 'iat') return `not yet valid (${err.claim})`
    return `claim "${err.claim}" ${err.reason === 'missing' ? 'is missing' : 'is not acceptable'}`
  }
  if (err instanceof errors.JOSEAlgNotAllowed) return 'signing algorithm not allowed'
  if (err instanceof errors.JWKSNoMatchingKey) return 'signed by an unknown key'
  if (err instanceof errors.JWKSMultipleMatchingKeys) return 'key id matches several keys'
  if (err instanceof errors.JWSSignatureVerificationFailed) return 'signature does not verify'
  if (err instanceof errors.JWKSTimeout) return 'key set could not be fetched in time'
  // RFC 7515 §4.1.11: an extension marked critical that is not understood refuses the token.
  if (err instanceof errors.JOSENotSupported && err.message.startsWith('Extension Header Parameter')) return 'its header marks as critical (crit) an extension this broker does not understand'
  if (err instanceof errors.JWTInvalid && err.message.includes('unencoded payload')) return 'its payload is not base64url-encoded (b64: false), which no JWT may be'
  if (err instanceof errors.JWSInvalid || err instanceof errors.JWTInvalid || err instanceof errors.JOSENotSupported) return 'not a valid signed JWT'
  return 'could not be verified'
}

/**
 * Whether verifying failed because a key set could not be had (the IdP's or an attestor's
 * jwks_url refused, timed out, answered other than 200 or not a key set), not because of the
 * token: jose throws its generic error only for those answers, and passes on fetch's own
 * (`TypeError: fetch failed`) when nothing answered.
 */
export function keySetUnavailable(err: unknown): boolean {
  if (err instanceof errors.JWKSTimeout || err instanceof errors.JWKSInvalid) return true
  if (err instanceof errors.JOSEError) return err.code === 'ERR_JOSE_GENERIC'
  return err instanceof TypeError && err.message === 'fetch failed'
}

/**
 * The OAuth error for a token that did not verify: the client's fault (400 invalid_request)
 * unless a key set could not be fetched, which is the broker's side and passes (503, so the
 * sidecar retries later rather than refuse the agent for good). The cause goes to the event
 * reason only; the key set's address is configuration, not the client's business.
 */
export function verifyFailure(param: string, err: unknown): OAuthError {
  if (keySetUnavailable(err)) {
    const cause = err instanceof errors.JWKSTimeout ? 'timed out' : err instanceof Error ? (((err.cause as { code?: string } | undefined)?.code ?? err.message) as string) : 'error'
    return new OAuthError('temporarily_unavailable', `${param}: the key set to verify it could not be fetched; try again later`, 503, `${param}: key set unavailable (${cause})`)
  }
  return new OAuthError('invalid_request', `${param}: ${describeJwtError(err)}`)
}

export interface VerifyOptions {
  issuer?: string
  audience: string
  requiredClaims?: string[]
  algorithms?: string[]
  /** Refuse a token whose iat is further back than this (iat then required). */
  maxTokenAgeS?: number
  /** Workload evidence: `aud` must be this audience alone (see verifyJwt). */
  soleAudience?: boolean
}

export async function verifyJwt(token: string, keys: JWTVerifyGetKey, opts: VerifyOptions): Promise<JWTPayload> {
  if (token.length === 0) throw new TokenInvalid('is empty')
  if (token.length > MAX_TOKEN_BYTES) throw new TokenInvalid(`is longer than ${MAX_TOKEN_BYTES} bytes`)
  if (!isCompactJws(token)) throw new TokenInvalid('not a valid signed JWT (three base64url segments, canonical, no padding or whitespace)')
  const { payload } = await jwtVerify(token, keys, {
    algorithms: opts.algorithms ?? ASYMMETRIC_ALGS,
    audience: opts.audience,
    ...(opts.issuer !== undefined ? { issuer: opts.issuer } : {}),
    clockTolerance: MAX_SKEW_S,
    requiredClaims: ['exp', ...(opts.requiredClaims ?? [])],
    ...(opts.maxTokenAgeS !== undefined ? { maxTokenAge: opts.maxTokenAgeS } : {}),
  }).catch((err: unknown) => {
    // jose reports a token too old by iat as JWTExpired ("expired"), which its exp may say it is not.
    if (err instanceof errors.JWTExpired && err.claim === 'iat') throw new TokenInvalid(`issued more than ${opts.maxTokenAgeS} s ago (iat)`)
    // Which key was meant, when the set cannot say: jose's own words are "multiple matching keys".
    if (err instanceof errors.JWKSMultipleMatchingKeys) {
      throw new TokenInvalid(decodeProtectedHeader(token).kid === undefined ? 'names no key (no kid), and the key set holds several it could be' : 'its kid names several keys of the key set')
    }
    // jose refuses an RSA key under 2048 bits (RFC 7518 §3.3) with a bare TypeError: "could not be verified".
    if (err instanceof TypeError && /modulusLength/.test(err.message)) throw new TokenInvalid('its key is an RSA key shorter than 2048 bits, which is not accepted')
    throw err
  })
  // jose checks that sub is present when required, not what it is; a number, an array or ""
  // would be copied into the issued token and the audit as someone's identity (RFC 7519 §4.1.2:
  // a StringOrURI). And it bounds iat only with maxTokenAge: a token "issued" in the future is
  // refused everywhere, with the same skew as exp and nbf (RFC 8725 §3.10 spirit).
  if (payload.sub !== undefined && (typeof payload.sub !== 'string' || payload.sub.length === 0)) throw new TokenInvalid('claim "sub" must be a non-empty string')
  if (payload.iat !== undefined && payload.iat > Date.now() / 1000 + MAX_SKEW_S) throw new TokenInvalid('not yet valid (iat)')
  // Evidence minted for several audiences was handed to each of them, and any of those could
  // present it here as the workload: an attestation is for this broker only.
  if (opts.soleAudience && Array.isArray(payload.aud) && payload.aud.length !== 1) throw new TokenInvalid('claim "aud" must name this broker alone, not several audiences')
  // jose compares times as numbers: an exp of 1e400 (JSON.parse gives Infinity) or 1e20 passed as a
  // token that never expires, and an nbf of -1e400 as one always valid. No date is that far.
  for (const claim of ['exp', 'nbf', 'iat'] as const) {
    const v = payload[claim]
    if (v !== undefined && !(Math.abs(v) <= MAX_DATE_S)) throw new TokenInvalid(`claim "${claim}" is beyond any date (more than ${MAX_DATE_S} s from 1970)`)
  }
  // jose (JSON.parse) lets the last of two same-named members win, and drops a leading byte order
  // mark; a parser elsewhere (the issuer's, a resource server's) may take the first or refuse. What
  // the signer meant is then unknown: `{"sub":"mallory",…,"sub":"alice"}` is alice here.
  const [header, claims] = token.split('.') as [string, string]
  const problem = notPlainJson(header, 'header') ?? notPlainJson(claims, 'claims')
  if (problem) throw new TokenInvalid(problem)
  return payload
}

/** Seconds from 1970 to the last time a Date can hold. */
const MAX_DATE_S = MAX_DATE_MS / 1000

/** Why a verified JWT segment is not plain JSON (a byte order mark, a member named twice), or undefined. */
function notPlainJson(segment: string, what: 'header' | 'claims'): string | undefined {
  const text = Buffer.from(segment, 'base64url').toString('utf8')
  if (text.charCodeAt(0) === 0xfeff) return what === 'header' ? 'its header begins with a byte order mark' : 'its claims begin with a byte order mark'
  const twice = memberNamedTwice(text)
  if (twice === undefined) return undefined
  return `its ${what} ${what === 'header' ? 'names' : 'name'} ${shownMemberName(twice)} twice (which one counts is ambiguous)`
}
