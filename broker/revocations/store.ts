// Where revocations persist, so a broker restart forgets nothing. One interface; SQLite (the
// embedded default) and PostgreSQL (several replicas) implement it, and one conformance suite
// runs against both real databases (test/broker/revocation-store.test.ts). The same store keeps
// the jtis of single-use evidence, so a restart or another replica cannot accept one twice.
export type RevocationKind = 'agent' | 'task' | 'jti'
export const REVOCATION_KINDS: readonly RevocationKind[] = ['agent', 'task', 'jti']

export interface Revocation {
  kind: RevocationKind
  /** agent:<type>:<env>:<instance>, a task ID, or a token's jti. */
  value: string
  reason: string
  /** Epoch milliseconds. */
  created_at: number
}

/** What add(), remove() and list() need of the revocations table (ON CONFLICT (kind, value) needs the key). */
export const REVOCATIONS_SHAPE = { columns: ['kind', 'value', 'reason', 'created_at'], uniqueKeys: [['kind', 'value']] } as const

/** What useOnce() needs of the single-use jti table. */
export const SINGLE_USE_SHAPE = { columns: ['jti', 'expires_at'], uniqueKeys: [['jti']] } as const

/** Single-use evidence (local attestations): each jti is accepted once, by every broker sharing the store. */
export interface SingleUseJtis {
  /**
   * Records a jti until expiresAt (epoch ms), atomically: false when it is already recorded, by
   * this broker before a restart or by another replica sharing the store.
   */
  useOnce(jti: string, expiresAt: number): Promise<boolean>
}

export interface RevocationStore extends SingleUseJtis {
  /**
   * Creates tables when missing; safe to call on every start and from several replicas. Rejects
   * with a StoreSchemaError (lib/store-schema.ts) naming what an existing table lacks.
   */
  init(): Promise<void>
  /** Idempotent: revoking what is already revoked keeps the first record and returns false. */
  add(r: Revocation): Promise<boolean>
  /** Returns whether something was revoked. */
  remove(kind: RevocationKind, value: string): Promise<boolean>
  list(): Promise<Revocation[]>
  /** Whether (kind, value) is revoked in the store now: what a replica checks an unrevoke heard on the bus against. */
  holds(kind: RevocationKind, value: string): Promise<boolean>
  /** Forgets single-use jtis that expired before `before` (epoch ms); returns how many. */
  pruneUsed(before: number): Promise<number>
  close(): Promise<void>
}
