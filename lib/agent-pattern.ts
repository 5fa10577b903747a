// Agent values with `*` segments (agent:coder:*:*), as revocations and the audit CLI read them.

/** Matches an agent instance ID against an agent pattern: `*` stands for one whole segment. */
export function agentMatches(pattern: string, agent: string): boolean {
  const p = pattern.split(':')
  const a = agent.split(':')
  return p.length === a.length && p.every((seg, i) => seg === '*' || seg === a[i])
}
