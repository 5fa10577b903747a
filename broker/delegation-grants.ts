// What a delegation token lets the agent it is handed to ask for, audience by audience. A scope
// means something only at its audience: `admin` held at one API says nothing about another. So a
// delegation carries its scopes per audience, as RFC 9396 `authorization_details` (`locations`:
// the audience, `actions`: its scopes), and a token exchanged from it is bounded by the entry for
// its own audience. A flat `scope` list would let a child take, at an audience the delegator held
// nothing or less at, any scope the delegator held anywhere.

/** The `type` of each `authorization_details` entry a delegation token carries. */
export const DELEGATION_DETAIL_TYPE = 'latchkey_delegation'

/** Audience → the scopes delegated there (possibly none: an audience whose registry names none). */
export type DelegationGrants = ReadonlyMap<string, readonly string[]>

export interface DelegationDetail {
  type: typeof DELEGATION_DETAIL_TYPE
  locations: [string]
  actions: string[]
}

export function writeDelegationGrants(grants: DelegationGrants): DelegationDetail[] {
  return [...grants].map(([audience, scopes]) => ({ type: DELEGATION_DETAIL_TYPE, locations: [audience], actions: [...scopes] }))
}

/**
 * The grants a delegation token carries, or undefined when the claim is absent or malformed: such
 * a token is refused, never read as "no limit" (a token from a broker before this claim existed
 * lives minutes; its holder asks again).
 */
export function readDelegationGrants(claim: unknown): DelegationGrants | undefined {
  if (!Array.isArray(claim)) return undefined
  const grants = new Map<string, readonly string[]>()
  for (const d of claim as unknown[]) {
    if (typeof d !== 'object' || d === null) return undefined
    const { type, locations, actions } = d as { type?: unknown; locations?: unknown; actions?: unknown }
    if (type !== DELEGATION_DETAIL_TYPE) return undefined
    if (!Array.isArray(locations) || locations.length !== 1 || typeof locations[0] !== 'string') return undefined
    if (!Array.isArray(actions) || !actions.every((a) => typeof a === 'string')) return undefined
    // One entry per audience: two would leave which one bounds it to the reader.
    if (grants.has(locations[0])) return undefined
    grants.set(locations[0], actions as string[])
  }
  return grants
}
