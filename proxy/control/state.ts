// What the sidecar knows is revoked, from the control stream. Looked up on every request (after
// identify): a revoked agent or task is refused with 403 LK_REVOKED, reason "revoked".
import type { Identity, TaskRef } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { agentMatches } from '../../lib/agent-pattern.js'

export type RevocationKind = 'agent' | 'task' | 'jti'

export interface KnownRevocation {
  kind: RevocationKind
  value: string
  /** Epoch ms the broker made it (its retention counts from here); 0 when unknown. */
  createdAt?: number
}

/**
 * How long the broker keeps a jti or task revocation, in ms after it was made: the broker's
 * REVOCATION_RETENTION_MS (broker/revocations/list.ts, which the sidecar does not import; a test
 * holds the two equal). Past it the broker forgets the entry (an `expired` unrevoke), and a
 * sidecar loading its state file forgets it too. Agent revocations never expire.
 */
export const RETENTION_MS: Readonly<Record<'jti' | 'task', number>> = {
  jti: (86_400 + 30) * 1000,
  task: (604_800 + 86_400 + 30) * 1000,
}

/** Whether the broker would have forgotten this revocation by nowMs (an unknown time never expires). */
export function isExpired(r: KnownRevocation, nowMs: number): boolean {
  return r.kind !== 'agent' && (r.createdAt ?? 0) > 0 && nowMs - r.createdAt! > RETENTION_MS[r.kind]
}


export class RevocationState {
  private readonly entries = new Map<string, KnownRevocation>()
  private readonly tasks = new Set<string>()
  private readonly jtis = new Set<string>()
  /** Whether this sidecar's own agent is revoked (by ID or pattern): every request is refused. */
  agentRevoked = false
  /** Called after every change (add, remove, replace): the state file is rewritten from it. */
  onChange: (() => void) | undefined

  constructor(readonly agentId: string) {}

  all(): KnownRevocation[] {
    return [...this.entries.values()]
  }

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
    if (!this.put(r)) return false
    this.onChange?.()
    return true
  }

  remove(kind: RevocationKind, value: string): boolean {
    if (!this.drop(kind, value)) return false
    this.onChange?.()
    return true
  }

  /** Replaces everything with a snapshot; returns the revocations that are new. */
  replace(all: KnownRevocation[]): KnownRevocation[] {
    const next = new Set(all.map((r) => `${r.kind}\0${r.value}`))
    for (const r of [...this.entries.values()]) if (!next.has(`${r.kind}\0${r.value}`)) this.drop(r.kind, r.value)
    const added = all.filter((r) => this.put(r))
    // Told even when nothing changed: the file then records when the broker last confirmed it.
    this.onChange?.()
    return added
  }

  private put(r: KnownRevocation): boolean {
    const k = `${r.kind}\0${r.value}`
    if (this.entries.has(k)) return false
    this.entries.set(k, r)
    if (r.kind === 'task') this.tasks.add(r.value)
    if (r.kind === 'jti') this.jtis.add(r.value)
    if (this.appliesToAgent(r)) this.agentRevoked = true
    return true
  }

  private drop(kind: RevocationKind, value: string): boolean {
    if (!this.entries.delete(`${kind}\0${value}`)) return false
    if (kind === 'task') this.tasks.delete(value)
    if (kind === 'jti') this.jtis.delete(value)
    if (kind === 'agent') this.agentRevoked = [...this.entries.values()].some((r) => this.appliesToAgent(r))
    return true
  }

  /**
   * Which revocation stops this agent's task (or the agent, for `null`), if any: the agent, the
   * task, or a delegation the task's token was derived from (its task or its jti).
   */
  revokedBy(task: Pick<TaskRef, 'id' | 'delegatedFrom'> | null): 'revocation:agent' | 'revocation:task' | 'revocation:delegation' | null {
    if (this.agentRevoked) return 'revocation:agent'
    if (task === null) return null
    if (this.tasks.has(task.id)) return 'revocation:task'
    const from = task.delegatedFrom
    if (from) for (const a of from) if ((a.task_id !== undefined && this.tasks.has(a.task_id)) || this.jtis.has(a.jti)) return 'revocation:delegation'
    return null
  }

  check(identity: Identity): void {
    const by = this.revokedBy(identity.task ?? (identity.taskId === null ? null : { id: identity.taskId }))
    if (by !== null) throw new LatchkeyError('LK_REVOKED', 'revoked', by)
  }
}
