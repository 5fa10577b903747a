// RFC 7662 introspection for resource servers that prefer asking to verifying: a token is active
// only if this broker signed it, it has not expired, its `act` chain reads whole (at most
// MAX_ACT_DEPTH agents), and nothing in it (any agent in `act`, its task, its jti) is revoked.
// Anything else is `{active: false}`, with no reason given, as the RFC asks.
import { jwtVerify, type JWTPayload } from 'jose'
import type { KeyRing } from './keys.js'
import type { RevocationList } from './revocations/list.js'
import { MAX_SKEW_S, MAX_TOKEN_BYTES } from './jwt.js'
import { isCompactJws } from '../lib/oauth.js'
import { readActChain, readAncestry } from './act.js'

/**
 * Every agent of the token's act chain, or undefined when the chain cannot be read whole
 * (malformed, or deeper than MAX_ACT_DEPTH): such a token is inactive, never checked in part.
 */
export function agentsInAct(act: unknown): string[] | undefined {
  const chain = readActChain(act)
  return chain.ok ? chain.agents : undefined
}

export class Introspection {
  constructor(
    private readonly keys: KeyRing,
    private readonly issuer: string,
    private readonly revocations: RevocationList,
    private readonly now: () => number = Date.now,
  ) {}

  async introspect(token: string): Promise<Record<string, unknown>> {
    // Only the spelling this broker issued: a whitespace or trailing-bits variant is not this token (see isCompactJws).
    if (token.length === 0 || token.length > MAX_TOKEN_BYTES || !isCompactJws(token)) return { active: false }
    let p: JWTPayload
    try {
      // The skew allowed is for nbf and iat only (another replica's clock); see exp below.
      ;({ payload: p } = await jwtVerify(token, this.keys.verifier, { issuer: this.issuer, algorithms: ['ES256', 'EdDSA'], clockTolerance: MAX_SKEW_S, currentDate: new Date(this.now()), requiredClaims: ['exp', 'jti', 'sub'] }))
    } catch {
      return { active: false }
    }
    // This broker set exp and keeps the time it is judged by: a token is inactive from its exp
    // (RFC 7662 §2.2), not 30 s after it, whatever skew a resource server allows itself.
    if (p.exp! * 1000 <= this.now()) return { active: false }
    const task = typeof p.task_id === 'string' ? p.task_id : undefined
    const agents = agentsInAct(p.act)
    if (!agents || this.revocations.check(agents, task, p.jti)) return { active: false }
    // A token derived from a delegation falls with that delegation's task or jti.
    const ancestry = readAncestry(p.delegated_from)
    if (!ancestry || ancestry.some((a) => this.revocations.check([], a.task_id, a.jti))) return { active: false }
    return {
      active: true,
      iss: p.iss,
      sub: p.sub,
      aud: p.aud,
      act: p.act,
      client_id: p.client_id,
      scope: p.scope,
      // RFC 9396 §9.2: a delegation's per-audience scopes, as it carries them.
      ...(p.authorization_details !== undefined ? { authorization_details: p.authorization_details } : {}),
      task_id: task,
      iat: p.iat,
      exp: p.exp,
      jti: p.jti,
      token_type: 'Bearer',
    }
  }
}
