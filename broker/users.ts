// The user's token, as the RFC 8693 `subject_token`: verified against the configured IdP's key
// set (asymmetric algorithms only), its `iss` and `aud`; its scopes read from one claim.
import type { JWTVerifyGetKey } from 'jose'
import { LRUCache } from 'lru-cache'
import { verifyJwt, TokenInvalid, MAX_SKEW_S } from './jwt.js'

/** How long a verified user token is trusted without re-verifying: bounds a key withdrawn at the IdP. */
const VERIFIED_TTL_MS = 300_000

export interface UserToken {
  sub: string
  scopes: string[]
  exp: number
  /** RFC 8693 §4.4: the one party the user allows to act for them, when the IdP names one. */
  mayAct: string | null
}

// The same user token backs every exchange of a task (each audience, each refresh): its
// signature is verified once and the result kept, keyed by the whole token, until the token
// expires or five minutes pass, whichever is first. Expiry is re-checked on every hit.
export class UserTokenVerifier {
  private readonly verified = new LRUCache<string, UserToken>({ max: 10_000 })

  constructor(
    private readonly keys: JWTVerifyGetKey,
    readonly issuer: string,
    private readonly audience: string,
    private readonly scopeClaim: string,
  ) {}

  async verify(token: string, nowMs = Date.now()): Promise<UserToken> {
    const hit = this.verified.get(token)
    if (hit) {
      if (hit.exp + MAX_SKEW_S > nowMs / 1000) return hit
      this.verified.delete(token)
    }
    const user = await this.verifyUncached(token)
    this.verified.set(token, user, { ttl: Math.max(1, Math.min(VERIFIED_TTL_MS, (user.exp + MAX_SKEW_S) * 1000 - nowMs)) })
    return user
  }

  private async verifyUncached(token: string): Promise<UserToken> {
    const payload = await verifyJwt(token, this.keys, { issuer: this.issuer, audience: this.audience, requiredClaims: ['sub'] })
    const raw = payload[this.scopeClaim]
    let scopes: string[]
    if (raw === undefined) scopes = []
    else if (typeof raw === 'string') scopes = raw.split(' ').filter(Boolean)
    else if (Array.isArray(raw) && raw.every((s) => typeof s === 'string')) scopes = raw as string[]
    else throw new TokenInvalid(`claim "${this.scopeClaim}" is neither a string nor a list of strings`)
    // A user token that already carries a delegation (`act`, RFC 8693 §4.1) came from another
    // exchange: its earlier actors would be silently dropped from the chain this broker issues.
    if (payload.act !== undefined) throw new TokenInvalid('carries an act claim: a token already delegated elsewhere is not a user token here')
    let mayAct: string | null = null
    if (payload.may_act !== undefined) {
      const sub = (payload.may_act as { sub?: unknown } | null)?.sub
      if (typeof sub !== 'string' || sub.length === 0) throw new TokenInvalid('claim "may_act" must be an object with a non-empty string "sub"')
      mayAct = sub
    }
    return { sub: payload.sub!, scopes, exp: payload.exp!, mayAct }
  }
}
