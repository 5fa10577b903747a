// The revocation list the exchange path consults: in memory (a Map lookup per chain link), written
// through to the store first so an acknowledged revocation survives a restart. The seam for the
// control stream: `onChange` listeners hear every revoke and unrevoke.
import type { Revocation, RevocationKind, RevocationStore } from './store.js'

export type RevocationChange = { op: 'revoke'; revocation: Revocation } | { op: 'unrevoke'; kind: RevocationKind; value: string }

export class RevocationList {
  private readonly entries = new Map<string, Revocation>()
  private readonly listeners: ((c: RevocationChange) => void)[] = []

  constructor(readonly store: RevocationStore) {}

  async load(): Promise<void> {
    await this.store.init()
    this.entries.clear()
    for (const r of await this.store.list()) this.entries.set(`${r.kind}\0${r.value}`, r)
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
    return (task !== undefined ? this.get('task', task) : undefined) ?? (jti !== undefined ? this.get('jti', jti) : undefined)
  }

  async revoke(kind: RevocationKind, value: string, reason: string): Promise<{ revocation: Revocation; created: boolean }> {
    const revocation: Revocation = { kind, value, reason, created_at: Date.now() }
    const created = await this.store.add(revocation)
    const stored = created ? revocation : (this.get(kind, value) ?? revocation)
    this.entries.set(`${kind}\0${value}`, stored)
    if (created) for (const l of this.listeners) l({ op: 'revoke', revocation })
    return { revocation: stored, created }
  }

  async unrevoke(kind: RevocationKind, value: string): Promise<boolean> {
    const removed = await this.store.remove(kind, value)
    const had = this.entries.delete(`${kind}\0${value}`)
    if (removed || had) for (const l of this.listeners) l({ op: 'unrevoke', kind, value })
    return removed || had
  }

  all(): Revocation[] {
    return [...this.entries.values()]
  }
}
