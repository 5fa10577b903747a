// The `act` claim (RFC 8693 §4.1) of a token this broker issued: the agents that acted, the
// current actor outermost. Read whole or not at all: a chain is never cut, since the agents a cut
// would drop are the oldest delegators, the ones a revocation of the root must still reach.

/** At most this many agents in one token's act chain, the acting agent included. */
export const MAX_ACT_DEPTH = 8

export type ActChain = { ok: true; agents: string[] } | { ok: false; problem: string }

/** The chain's agents, outermost (current actor) first; refused if malformed or deeper than MAX_ACT_DEPTH. */
export function readActChain(act: unknown): ActChain {
  const agents: string[] = []
  let cur: unknown = act
  while (cur !== undefined) {
    if (typeof cur !== 'object' || cur === null || Array.isArray(cur)) return { ok: false, problem: 'act claim is malformed' }
    const { sub, act: next } = cur as { sub?: unknown; act?: unknown }
    if (typeof sub !== 'string' || sub === '') return { ok: false, problem: 'act claim is malformed' }
    agents.push(sub)
    if (agents.length > MAX_ACT_DEPTH) return { ok: false, problem: `its delegation chain is deeper than ${MAX_ACT_DEPTH} agents` }
    cur = next
  }
  return { ok: true, agents }
}

/**
 * The delegation tokens a token was exchanged from (`delegated_from`, oldest first): each one's
 * task and jti. A derived token lives on its own task, so without them revoking the delegating
 * task or token would leave the tokens already derived from it active.
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
