// The user's token, as the RFC 8693 `subject_token`: verified against the configured IdP's key
// set (asymmetric algorithms only), its `iss` and `aud`; its scopes read from one claim.
import type { JWTVerifyGetKey } from 'jose'
import { verifyJwt, TokenInvalid } from './jwt.js'

export interface UserToken {
  sub: string
  scopes: string[]
  exp: number
}

export class UserTokenVerifier {
  constructor(
    private readonly keys: JWTVerifyGetKey,
    readonly issuer: string,
    private readonly audience: string,
    private readonly scopeClaim: string,
  ) {}

  async verify(token: string): Promise<UserToken> {
    const payload = await verifyJwt(token, this.keys, { issuer: this.issuer, audience: this.audience, requiredClaims: ['sub'] })
    const raw = payload[this.scopeClaim]
    let scopes: string[]
    if (raw === undefined) scopes = []
    else if (typeof raw === 'string') scopes = raw.split(' ').filter(Boolean)
    else if (Array.isArray(raw) && raw.every((s) => typeof s === 'string')) scopes = raw as string[]
    else throw new TokenInvalid(`claim "${this.scopeClaim}" is neither a string nor a list of strings`)
    return { sub: payload.sub!, scopes, exp: payload.exp! }
  }
}
