// The `act` claim (RFC 8693 §4.1) of a token this broker issued: the agents that acted, the
// current actor outermost. Read whole or not at all: a chain is never cut, since the agents a cut
// would drop are the oldest delegators, the ones a revocation of the root must still reach.

import { MAX_ACT_DEPTH } from '../lib/delegation.js'
export { MAX_ACT_DEPTH, readAncestry, type Ancestor } from '../lib/delegation.js'

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
