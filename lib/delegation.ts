// Where a token exchanged from a delegation came from: `delegated_from`, each delegation's task
// and jti, oldest first. The broker writes and checks it (broker/exchange.ts, introspect.ts); the
// sidecar reads it from a task's subject token, so that revoking a delegation's task or jti stops
// the tasks opened with tokens derived from it (proxy/control/state.ts).

/** At most this many agents in one token's act chain, the acting agent included. */
export const MAX_ACT_DEPTH = 8

/**
 * One delegation a token rests on. A derived token lives on its own task, so without these,
 * revoking the delegating task or token would leave the tokens already derived from it active.
 */
export interface Ancestor {
  task_id?: string
  jti: string
}

/** The ancestry, or undefined when the claim is malformed or longer than a chain can be. */
export function readAncestry(claim: unknown): Ancestor[] | undefined {
  if (claim === undefined) return []
  if (!Array.isArray(claim) || claim.length > MAX_ACT_DEPTH) return undefined
  const out: Ancestor[] = []
  for (const a of claim as unknown[]) {
    if (typeof a !== 'object' || a === null) return undefined
    const { task_id, jti } = a as { task_id?: unknown; jti?: unknown }
    if (typeof jti !== 'string' || jti === '' || (task_id !== undefined && typeof task_id !== 'string')) return undefined
    out.push(task_id === undefined ? { jti } : { task_id, jti })
  }
  return out
}

/**
 * The delegations a subject token rests on, itself included when it is a delegation token (it
 * carries `act`: the broker refuses any other token that does): what the broker checks when the
 * token is exchanged. [] for a user's own token; undefined when the claims cannot be read whole.
 * Read unverified by the sidecar, and safely so: a forged list can only make more revocations
 * stop the forger's own task, and the broker refuses a token whose signature does not hold.
 */
export function subjectAncestry(claims: Record<string, unknown>): Ancestor[] | undefined {
  if (claims.act === undefined) return []
  const earlier = readAncestry(claims.delegated_from)
  if (!earlier || typeof claims.jti !== 'string' || claims.jti === '' || (claims.task_id !== undefined && typeof claims.task_id !== 'string')) return undefined
  return [...earlier, typeof claims.task_id === 'string' ? { task_id: claims.task_id, jti: claims.jti } : { jti: claims.jti }]
}
