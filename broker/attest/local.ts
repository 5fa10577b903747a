// The local attestor, for `latchkey up` and tests: a sidecar holding a key the broker trusts
// signs a short JWT naming its instance (sub = agent:<type>:<env>:<instance>). Single-use: each
// `jti` is accepted once while the token lives, so a copied attestation cannot be replayed.
import { LRUCache } from 'lru-cache'
import type { JWTVerifyGetKey } from 'jose'
import { verifyJwt, MAX_SKEW_S } from '../jwt.js'
import type { Registry } from '../registry.js'
import { LOCAL_ISSUER } from '../../lib/local-attestor.js'
import { AttestationFailed, TOKEN_TYPES, type Attestation, type AttestationVerifier } from './attestor.js'

/** Local attestations are for the next request, not for keeping: at most this long. */
export { LOCAL_ISSUER }
export const LOCAL_MAX_AGE_S = 300
/**
 * The replay cache holds every jti until its token expires, up to this many. Past it, a new
 * attestation is refused rather than an unexpired jti forgotten (which would let that token be
 * replayed). Counted by size, not lru-cache's `max`, which allocates all its slots at start-up:
 * 41 MB and 0.2 s of CPU for each broker, before one attestation.
 */
export const MAX_LIVE_JTIS = 1_000_000
const INSTANCE_ID = /^agent:([a-z0-9][a-z0-9-]*):([a-z0-9][a-z0-9-]*):([A-Za-z0-9][A-Za-z0-9_.-]{0,127})$/

export class LocalVerifier implements AttestationVerifier {
  readonly kind = 'local'
  readonly tokenType = TOKEN_TYPES.local
  private readonly seen: LRUCache<string, true>
  /** When a full cache was last swept of expired jtis: a sweep walks it all, so once a second at most. */
  private sweptAt = -Infinity

  constructor(
    private readonly keys: JWTVerifyGetKey,
    private readonly audience: string,
    private readonly now: () => number = Date.now,
    maxLiveJtis = MAX_LIVE_JTIS,
  ) {
    this.seen = new LRUCache<string, true>({ maxSize: maxLiveJtis, sizeCalculation: () => 1, ttlAutopurge: false, perf: { now } })
  }

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
    // exec coerces it); jti is this attestor's own: the replay cache keys on it.
    if (typeof payload.jti !== 'string' || payload.jti === '') throw new AttestationFailed('jti must be a string, not empty')
    const m = INSTANCE_ID.exec(payload.sub!)
    if (!m) throw new AttestationFailed('sub is not an agent instance ID (agent:<type>:<env>:<instance>)')
    const [, type, env] = m
    const spec = registry.agents[type!]
    if (!spec || !spec.match.local) throw new AttestationFailed(`agent type "${type}" is not registered for the local attestor`, true)
    if (spec.env !== env) throw new AttestationFailed(`agent type "${type}" runs in env "${spec.env}", not "${env}"`)
    const nowS = Math.floor(this.now() / 1000)
    if (payload.exp! - payload.iat! > LOCAL_MAX_AGE_S) throw new AttestationFailed(`lifetime over ${LOCAL_MAX_AGE_S} s`)
    const key = `${payload.jti}`
    if (this.seen.has(key)) throw new AttestationFailed('replayed (single-use jti already seen)')
    if (this.seen.size >= this.seen.maxSize && this.now() - this.sweptAt >= 1000) {
      this.sweptAt = this.now()
      this.seen.purgeStale()
    }
    if (this.seen.size >= this.seen.maxSize) throw new AttestationFailed(`more than ${this.seen.maxSize} local attestations are live at once: refused rather than remember fewer and let one be replayed`)
    this.seen.set(key, true, { ttl: Math.max(1, payload.exp! - nowS + MAX_SKEW_S) * 1000 })
    return { kind: 'local', agentType: type!, instanceId: payload.sub!, subject: payload.sub!, expiresAt: payload.exp! }
  }
}
