// The revocation list the exchange path consults: in memory (a Map lookup per chain link), written
// through to the store first so an acknowledged revocation survives a restart. The seam for the
// control stream: `onChange` listeners hear every revoke and unrevoke.
import type { Revocation, RevocationKind, RevocationStore } from './store.js'
import { MAX_LIFETIME_S } from '../registry.js'
import { MAX_SKEW_S } from '../jwt.js'
import { agentMatches } from '../../lib/agent-pattern.js'

/** The sidecar config schema's ceiling on sidecar.tasks.max_duration_s. */
const MAX_TASK_DURATION_S = 604_800

/**
 * `remote`: the change was made on another broker replica and reached this one (NATS).
 * `expired`: an unrevoke by pruning, not by an operator (see RevocationList.prune).
 */
export type RevocationChange = ({ op: 'revoke'; revocation: Revocation } | { op: 'unrevoke'; kind: RevocationKind; value: string; expired?: boolean }) & { remote?: boolean }

/**
 * How long a jti or task revocation is kept, in ms after it was made. A jti names one token, issued
 * before it was revoked and living at most MAX_LIFETIME_S (+ verifiers' skew). A task lives at
 * most the sidecar's maximum task duration (sidecar.tasks.max_duration_s, at most 7 days), and its
 * last token at most MAX_LIFETIME_S beyond. Past that nothing they could match is alive, and
 * keeping them would only grow every control-stream snapshot (one gRPC message) without bound.
 * Agent revocations are kept until an operator lifts them.
 */
export const REVOCATION_RETENTION_MS: Readonly<Record<'jti' | 'task', number>> = {
  jti: (MAX_LIFETIME_S + MAX_SKEW_S) * 1000,
  task: (MAX_TASK_DURATION_S + MAX_LIFETIME_S + MAX_SKEW_S) * 1000,
}

/** An agent value with `*` segments (agent:coder:*:*) revokes every instance it matches. */
export function isAgentPattern(value: string): boolean {
  return value.split(':').includes('*')
}

export class RevocationList {
  private readonly entries = new Map<string, Revocation>()
  private readonly listeners: ((c: RevocationChange) => void)[] = []
  /** Agent patterns among the entries, checked one by one (there are few). */
  private patterns: Revocation[] = []
  /** For each resync awaiting the store: the keys changed in memory meanwhile (see resync). */
  private readonly resyncing = new Set<Set<string>>()

  constructor(readonly store: RevocationStore) {}

  async load(): Promise<void> {
    await this.store.init()
    this.entries.clear()
    for (const r of await this.store.list()) this.entries.set(`${r.kind}\0${r.value}`, r)
    this.reindex()
  }

  /** Notes a change to `key` for every resync whose store read it may postdate. */
  private touched(key: string): void {
    for (const keys of this.resyncing) keys.add(key)
  }

  private reindex(): void {
    this.patterns = [...this.entries.values()].filter((r) => r.kind === 'agent' && isAgentPattern(r.value))
  }

  /**
   * Reloads from the store and tells listeners what changed (as `remote`): how a replica catches
   * up with revocations made elsewhere that it did not hear about (NATS away, or missed).
   */
  async resync(): Promise<number> {
    // The store's answer is a snapshot taken when the query ran; a revoke or unrevoke made here
    // while it was on its way is newer than it, and is kept. Diffed blindly, a revocation
    // acknowledged (201) during a slow list (a large store) was dropped again, announced to every
    // sidecar as lifted, and its agent served tokens until the next resync.
    const changedMeanwhile = new Set<string>()
    this.resyncing.add(changedMeanwhile)
    let stored: Revocation[]
    try {
      stored = await this.store.list()
    } finally {
      this.resyncing.delete(changedMeanwhile)
    }
    const next = new Map(stored.map((r) => [`${r.kind}\0${r.value}`, r]))
    const changes: RevocationChange[] = []
    for (const [k, r] of next) if (!this.entries.has(k) && !changedMeanwhile.has(k)) changes.push({ op: 'revoke', revocation: r, remote: true })
    for (const [k, r] of this.entries) if (!next.has(k) && !changedMeanwhile.has(k)) changes.push({ op: 'unrevoke', kind: r.kind, value: r.value, remote: true })
    for (const c of changes) this.applyRemote(c)
    return changes.length
  }

  /** A change another replica made (already in the shared store): applied in memory and announced. */
  applyRemote(change: RevocationChange): void {
    if (change.op === 'revoke') {
      const k = `${change.revocation.kind}\0${change.revocation.value}`
      if (this.entries.has(k)) return
      this.entries.set(k, change.revocation)
      this.touched(k)
    } else {
      const k = `${change.kind}\0${change.value}`
      if (!this.entries.delete(k)) return
      this.touched(k)
    }
    this.reindex()
    for (const l of this.listeners) l({ ...change, remote: true })
  }

  onChange(listener: (c: RevocationChange) => void): void {
    this.listeners.push(listener)
  }

  get(kind: RevocationKind, value: string): Revocation | undefined {
    return this.entries.get(`${kind}\0${value}`)
  }

  /** The first revocation that applies to any agent of the chain, the task or the jti. */
  check(agents: readonly string[], task: string | undefined, jti: string | undefined): Revocation | undefined {
    for (const a of agents) {
      const r = this.get('agent', a)
      if (r) return r
    }
    for (const p of this.patterns) for (const a of agents) if (agentMatches(p.value, a)) return p
    return (task !== undefined ? this.get('task', task) : undefined) ?? (jti !== undefined ? this.get('jti', jti) : undefined)
  }

  async revoke(kind: RevocationKind, value: string, reason: string): Promise<{ revocation: Revocation; created: boolean }> {
    const revocation: Revocation = { kind, value, reason, created_at: Date.now() }
    const created = await this.store.add(revocation)
    const stored = created ? revocation : (this.get(kind, value) ?? revocation)
    this.entries.set(`${kind}\0${value}`, stored)
    this.touched(`${kind}\0${value}`)
    this.reindex()
    if (created) for (const l of this.listeners) l({ op: 'revoke', revocation })
    return { revocation: stored, created }
  }

  async unrevoke(kind: RevocationKind, value: string): Promise<boolean> {
    const removed = await this.store.remove(kind, value)
    const had = this.entries.delete(`${kind}\0${value}`)
    this.touched(`${kind}\0${value}`)
    this.reindex()
    if (removed || had) for (const l of this.listeners) l({ op: 'unrevoke', kind, value })
    return removed || had
  }

  /**
   * Forgets jti and task revocations older than their retention (REVOCATION_RETENTION_MS): removed
   * from the store and announced as unrevokes marked `expired`, so sidecars forget them too.
   */
  async prune(nowMs: number): Promise<number> {
    let pruned = 0
    for (const r of [...this.entries.values()]) {
      if (r.kind === 'agent' || nowMs - r.created_at <= REVOCATION_RETENTION_MS[r.kind]) continue
      await this.store.remove(r.kind, r.value)
      if (!this.entries.delete(`${r.kind}\0${r.value}`)) continue
      this.touched(`${r.kind}\0${r.value}`)
      pruned++
      for (const l of this.listeners) l({ op: 'unrevoke', kind: r.kind, value: r.value, expired: true })
    }
    return pruned
  }

  all(): Revocation[] {
    return [...this.entries.values()]
  }
}
