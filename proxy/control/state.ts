// What the sidecar knows is revoked, from the control stream. Looked up on every request (after
// identify): a revoked agent or task is refused with 403 LK_REVOKED, reason "revoked".
import type { Identity } from '../context.js'
import { LatchkeyError } from '../errors.js'

export type RevocationKind = 'agent' | 'task' | 'jti'

export interface KnownRevocation {
  kind: RevocationKind
  value: string
}

/** `*` stands for one whole segment: agent:coder:*:* matches every coder instance. */
export function agentMatches(pattern: string, agent: string): boolean {
  const p = pattern.split(':')
  const a = agent.split(':')
  return p.length === a.length && p.every((seg, i) => seg === '*' || seg === a[i])
}

export class RevocationState {
  private readonly entries = new Map<string, KnownRevocation>()
  private readonly tasks = new Set<string>()
  /** Whether this sidecar's own agent is revoked (by ID or pattern): every request is refused. */
  agentRevoked = false

  constructor(readonly agentId: string) {}

  get size(): number {
    return this.entries.size
  }

  has(kind: RevocationKind, value: string): boolean {
    return this.entries.has(`${kind}\0${value}`)
  }

  /** Does this revocation concern this sidecar's agent? */
  appliesToAgent(r: KnownRevocation): boolean {
    return r.kind === 'agent' && agentMatches(r.value, this.agentId)
  }

  /** Returns whether it was new. */
  add(r: KnownRevocation): boolean {
    const k = `${r.kind}\0${r.value}`
    if (this.entries.has(k)) return false
    this.entries.set(k, r)
    if (r.kind === 'task') this.tasks.add(r.value)
    if (this.appliesToAgent(r)) this.agentRevoked = true
    return true
  }

  remove(kind: RevocationKind, value: string): boolean {
    if (!this.entries.delete(`${kind}\0${value}`)) return false
    if (kind === 'task') this.tasks.delete(value)
    this.agentRevoked = [...this.entries.values()].some((r) => this.appliesToAgent(r))
    return true
  }

  /** Replaces everything with a snapshot; returns the revocations that are new. */
  replace(all: KnownRevocation[]): KnownRevocation[] {
    const next = new Set(all.map((r) => `${r.kind}\0${r.value}`))
    for (const r of [...this.entries.values()]) if (!next.has(`${r.kind}\0${r.value}`)) this.remove(r.kind, r.value)
    return all.filter((r) => this.add(r))
  }

  check(identity: Identity): void {
    if (this.agentRevoked) throw new LatchkeyError('LK_REVOKED', 'revoked', 'revocation:agent')
    if (identity.taskId !== null && this.tasks.has(identity.taskId)) throw new LatchkeyError('LK_REVOKED', 'revoked', 'revocation:task')
  }
}
