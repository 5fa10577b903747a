// The credential values a source has issued, per binding, kept until they expire: what
// CredentialSource.held answers, so a response is checked for every token the sidecar holds for
// that binding (another task's, one a refresh superseded), not only the one the call carried.
import type { Credential } from '../context.js'

/** No credential held: one shared array, so a lookup that finds none allocates nothing. */
export const NONE_HELD: readonly Credential[] = Object.freeze([])

interface Held {
  values: Credential[]
  /** What held() hands out: the same array until the set changes (scrubbers cache their needles by it). */
  snapshot: readonly Credential[] | null
  /** The soonest expiresAt among values: until then nothing needs pruning. */
  nextExpiry: number
}

/**
 * Values by key (a CachedTokenSource's binding key: token audience and scopes), each kept until
 * its expiresAt whatever dropped it from the cache (a task's end, a revocation, a refresh): the
 * upstream may still accept it, and show it. Bounded: past `max` values in all, the oldest of the
 * largest set goes first.
 */
export class HeldValues {
  private readonly byKey = new Map<string, Held>()
  private count = 0

  constructor(
    private readonly max: number,
    private readonly now: () => number,
  ) {}

  add(key: string, credential: Credential): void {
    let h = this.byKey.get(key)
    if (!h) this.byKey.set(key, (h = { values: [], snapshot: null, nextExpiry: Infinity }))
    this.prune(h, this.now())
    h.values.push(credential)
    h.snapshot = null
    this.count++
    if (credential.expiresAt !== null && credential.expiresAt < h.nextExpiry) h.nextExpiry = credential.expiresAt
    if (this.count > this.max) this.evictOne()
  }

  get(key: string): readonly Credential[] {
    const h = this.byKey.get(key)
    if (!h) return NONE_HELD
    if (this.now() >= h.nextExpiry) this.prune(h, this.now())
    if (h.values.length === 0) return NONE_HELD
    return (h.snapshot ??= Object.freeze(h.values.slice()))
  }

  /** Values held in all (tests, the bound). */
  get size(): number {
    return this.count
  }

  clear(): void {
    this.byKey.clear()
    this.count = 0
  }

  private prune(h: Held, now: number): void {
    if (now < h.nextExpiry) return
    const kept: Credential[] = []
    let next = Infinity
    for (const c of h.values) {
      if (c.expiresAt === null) kept.push(c)
      else if (c.expiresAt > now) {
        kept.push(c)
        if (c.expiresAt < next) next = c.expiresAt
      }
    }
    this.count -= h.values.length - kept.length
    h.values = kept
    h.snapshot = null
    h.nextExpiry = next
  }

  private evictOne(): void {
    let largest: Held | null = null
    for (const h of this.byKey.values()) if (largest === null || h.values.length > largest.values.length) largest = h
    if (largest === null || largest.values.length === 0) return
    largest.values.shift()
    largest.snapshot = null
    this.count--
  }
}
