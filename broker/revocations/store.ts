// Where revocations persist, so a broker restart forgets nothing. One interface; SQLite (the
// embedded default) and PostgreSQL (several replicas) implement it, and one conformance suite
// runs against both real databases (test/broker/revocation-store.test.ts).
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

export interface RevocationStore {
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
  close(): Promise<void>
}
