// The local attestor, for `latchkey up` and tests: a sidecar holding a key the broker trusts
// signs a short JWT naming its instance (sub = agent:<type>:<env>:<instance>). Single-use: each
// `jti` is accepted once while the token lives, so a copied attestation cannot be replayed. The
// jti is recorded in the broker's store, not in memory: a restart would forget a memory, and
// replicas behind one load balancer would each accept the same attestation once. Refusing
// evidence issued before this process started was weighed and rejected: it fixes restarts only,
// not replicas, and is sound only with a margin of the 30 s skew on each side (evidence with an
// iat up to 30 s ahead may have been used just before the restart), which refuses every local
// exchange for 30-60 s after each start. The price of the store is one insert per local
// attestation; Kubernetes and SPIFFE evidence, the production path, still does no I/O.
import { createHash } from 'node:crypto'
import type { JWTVerifyGetKey } from 'jose'
import { verifyJwt, MAX_SKEW_S } from '../jwt.js'
import type { Registry } from '../registry.js'
import type { SingleUseJtis } from '../revocations/store.js'
import { storeCause } from '../../lib/store-schema.js'
import { LOCAL_ISSUER } from '../../lib/local-attestor.js'
import { AttestationFailed, AttestationUnavailable, checkInstance, TOKEN_TYPES, type Attestation, type AttestationVerifier } from './attestor.js'

export { LOCAL_ISSUER }
/** Local attestations are for the next request, not for keeping: at most this long. */
export const LOCAL_MAX_AGE_S = 300
const INSTANCE_ID = /^agent:([a-z0-9][a-z0-9-]*):([a-z0-9][a-z0-9-]*):([A-Za-z0-9][A-Za-z0-9_.-]{0,127})$/

export class LocalVerifier implements AttestationVerifier {
  readonly kind = 'local'
  readonly tokenType = TOKEN_TYPES.local

  constructor(
    private readonly keys: JWTVerifyGetKey,
    private readonly audience: string,
    /** Where used jtis are recorded: the revocation store, shared by every replica that shares it. */
    private readonly jtis: SingleUseJtis,
  ) {}

  claims(p: { iss?: unknown }): boolean {
    return p.iss === LOCAL_ISSUER
  }

  async verify(token: string, registry: Registry): Promise<Attestation> {
    const payload = await verifyJwt(token, this.keys, {
      issuer: LOCAL_ISSUER,
      audience: this.audience,
      requiredClaims: ['sub', 'jti', 'iat'],
      maxTokenAgeS: LOCAL_MAX_AGE_S,
      soleAudience: true,
    })
    // verifyJwt has checked sub is a non-empty string (an array would pass the pattern below,
    // exec coerces it); jti is this attestor's own: the single-use record keys on it.
    if (typeof payload.jti !== 'string' || payload.jti === '') throw new AttestationFailed('jti must be a string, not empty')
    const m = INSTANCE_ID.exec(payload.sub!)
    if (!m) throw new AttestationFailed('sub is not an agent instance ID (agent:<type>:<env>:<instance>)')
    const [, type, env, instance] = m
    checkInstance(instance!)
    const spec = registry.agents[type!]
    if (!spec || !spec.match.local) throw new AttestationFailed(`agent type "${type}" is not registered for the local attestor`, true)
    if (spec.env !== env) throw new AttestationFailed(`agent type "${type}" runs in env "${spec.env}", not "${env}"`)
    if (payload.exp! - payload.iat! > LOCAL_MAX_AGE_S) throw new AttestationFailed(`lifetime over ${LOCAL_MAX_AGE_S} s`)
    // Recorded only once everything else holds: evidence that fails here burns no jti. Kept until
    // no broker would take the token any more (exp + skew); see pruning in broker.ts.
    let first: boolean
    try {
      // By its SHA-256: any string a JWT may carry (a NUL, 8 KB, a lone surrogate) is one fixed-size
      // key each store takes alike; and exp may be fractional (RFC 7519 NumericDate), kept in whole ms.
      first = await this.jtis.useOnce(createHash('sha256').update(payload.jti).digest('hex'), Math.ceil((payload.exp! + MAX_SKEW_S) * 1000))
    } catch (err) {
      // Accepting without the record would let the attestation be replayed: refuse, retryably.
      throw new AttestationUnavailable(`its single use could not be recorded (store unavailable: ${storeCause(err)})`)
    }
    if (!first) throw new AttestationFailed('replayed (single-use jti already seen)')
    return { kind: 'local', agentType: type!, instanceId: payload.sub!, subject: payload.sub!, expiresAt: payload.exp! }
  }
}
