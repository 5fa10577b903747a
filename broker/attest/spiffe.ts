// SPIFFE JWT-SVIDs: signature against the trust domain's JWT bundle (a JWK set), `aud` containing
// this broker, `exp` within 30 s, and a `sub` that is a SPIFFE ID in the configured trust domain.
// The registry's path prefix picks the agent type; the one segment after it is the instance.
// Anything deeper is refused rather than cut to its last segment, which made
// .../summarizer/team-a/b and .../summarizer/team-c/b one agent instance (one revocation, one
// audit identity) for two workloads. An SVID meant to live longer than max_lifetime_s is refused:
// SPIRE mints them for minutes, and one minted for days is a copy worth stealing for days.
import type { JWTVerifyGetKey } from 'jose'
import { MAX_SKEW_S, verifyJwt } from '../jwt.js'
import type { Registry } from '../registry.js'
import { AttestationFailed, checkInstance, TOKEN_TYPES, type Attestation, type AttestationVerifier } from './attestor.js'

/** JWT-SVID spec §3: RS, ES and PS families only. */
const SVID_ALGS = ['RS256', 'RS384', 'RS512', 'ES256', 'ES384', 'ES512', 'PS256', 'PS384', 'PS512']

export class SpiffeVerifier implements AttestationVerifier {
  readonly kind = 'spiffe'
  readonly tokenType = TOKEN_TYPES.spiffe
  private readonly prefix: string

  constructor(
    private readonly keys: JWTVerifyGetKey,
    readonly trustDomain: string,
    private readonly audience: string,
    /** broker.attestors.spiffe.max_lifetime_s */
    private readonly maxLifetimeS: number,
  ) {
    this.prefix = `spiffe://${trustDomain}/`
  }

  claims(p: { sub?: unknown }): boolean {
    return typeof p.sub === 'string' && p.sub.startsWith(this.prefix)
  }

  async verify(token: string, registry: Registry): Promise<Attestation> {
    const payload = await verifyJwt(token, this.keys, { audience: this.audience, requiredClaims: ['sub'], algorithms: SVID_ALGS, soleAudience: true })
    const sub = payload.sub!
    if (!sub.startsWith(this.prefix)) throw new AttestationFailed(`SPIFFE ID is not in trust domain ${this.trustDomain}`)
    // Whose SVID it is first, then how long it lives. iat is optional in a JWT-SVID (spec §3):
    // without it the lifetime left counts, with the skew allowed for the issuer's clock running ahead.
    if (payload.iat !== undefined) {
      if (payload.exp! - payload.iat > this.maxLifetimeS) throw new AttestationFailed(`lifetime (exp - iat) over ${this.maxLifetimeS} s`)
    } else if (payload.exp! - Date.now() / 1000 > this.maxLifetimeS + MAX_SKEW_S) {
      throw new AttestationFailed(`no iat, and exp is more than ${this.maxLifetimeS} s away`)
    }
    const path = sub.slice(this.prefix.length - 1)
    if (/[?#%]|\/\/|\/\.\.?(\/|$)|\/$/.test(path)) throw new AttestationFailed('SPIFFE ID path is not canonical')
    for (const [type, spec] of Object.entries(registry.agents)) {
      const p = spec.match.spiffe?.path_prefix
      if (!p) continue
      const prefix = p.endsWith('/') ? p : p + '/'
      if (path.startsWith(prefix) && path.length > prefix.length) {
        const instance = path.slice(prefix.length)
        if (!/^[A-Za-z0-9._-]+$/.test(instance)) {
          throw new AttestationFailed(`SPIFFE ID must name its instance in the one segment after ${p} (letters, digits, ".", "_", "-")`)
        }
        return { kind: 'spiffe', agentType: type, instanceId: `agent:${type}:${spec.env}:${checkInstance(instance)}`, subject: sub, expiresAt: payload.exp! }
      }
    }
    throw new AttestationFailed(`no agent type matches ${sub}`, true)
  }
}
