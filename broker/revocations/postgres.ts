import pg from 'pg'
import { assertShape, postgresShape, refusedWrite } from '../../lib/store-schema.js'
import { REVOCATION_KINDS, REVOCATIONS_SHAPE, SINGLE_USE_SHAPE, type Revocation, type RevocationKind, type RevocationStore } from './store.js'

export class PostgresRevocationStore implements RevocationStore {
  private readonly pool: pg.Pool
  private readonly table: string
  private readonly used: string

  constructor(url: string, readonly schema: string) {
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) throw new Error(`invalid schema name ${JSON.stringify(schema)}`)
    // A server that stops answering (not down: a black-holed route, a stalled failover) must not
    // hold exchanges for ever: each wait is bounded, and the exchange answers 503.
    this.pool = new pg.Pool({ connectionString: url, max: 4, connectionTimeoutMillis: 5_000, query_timeout: 5_000 })
    // A pool error (server restart) must not crash the broker; the next query reconnects.
    this.pool.on('error', () => {})
    this.table = `"${schema}".revocations`
    this.used = `"${schema}".single_use_jtis`
  }

  async init(): Promise<void> {
    const client = await this.pool.connect()
    try {
      // Replicas starting together: serialise DDL on an advisory lock.
      await client.query('SELECT pg_advisory_lock(hashtext($1))', [`latchkey:${this.schema}:init`])
      await client.query(`CREATE SCHEMA IF NOT EXISTS "${this.schema}"`)
      await client.query(`CREATE TABLE IF NOT EXISTS ${this.table} (
        kind TEXT NOT NULL CHECK (kind IN ('agent', 'task', 'jti')),
        value TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (kind, value)
      )`)
      // A table made by another version stays as it was: check it has what add() and list() need.
      const shape = await postgresShape(client, this.schema, 'revocations')
      if (shape) assertShape({ ...REVOCATIONS_SHAPE, name: `"${this.schema}".revocations` }, shape, 'broker.store.postgres')
      await client.query(`CREATE TABLE IF NOT EXISTS ${this.used} (jti TEXT NOT NULL PRIMARY KEY, expires_at BIGINT NOT NULL)`)
      const used = await postgresShape(client, this.schema, 'single_use_jtis')
      if (used) assertShape({ ...SINGLE_USE_SHAPE, name: this.used }, used, 'broker.store.postgres')
      // Its constraints must take every kind this version revokes (an older CHECK knew no 'jti'):
      // one row of each, in a transaction rolled back.
      await client.query('BEGIN')
      try {
        for (const kind of REVOCATION_KINDS) {
          try {
            await client.query(`INSERT INTO ${this.table} (kind, value, reason, created_at) VALUES ($1, 'latchkey:schema-check', 'schema check', 0) ON CONFLICT (kind, value) DO NOTHING`, [kind])
          } catch (err) {
            // Class 23: integrity constraint violation (check, not null, foreign key).
            if (String((err as { code?: unknown }).code).startsWith('23')) throw refusedWrite('broker.store.postgres', `"${this.schema}".revocations`, `a '${kind}' revocation`, (err as Error).message)
            throw err
          }
        }
      } finally {
        await client.query('ROLLBACK')
      }
    } finally {
      await client.query('SELECT pg_advisory_unlock(hashtext($1))', [`latchkey:${this.schema}:init`]).catch(() => {})
      client.release()
    }
  }

  async add(r: Revocation): Promise<boolean> {
    const res = await this.pool.query(
      `INSERT INTO ${this.table} (kind, value, reason, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (kind, value) DO NOTHING`,
      [r.kind, r.value, r.reason, r.created_at],
    )
    return res.rowCount === 1
  }

  async remove(kind: RevocationKind, value: string): Promise<boolean> {
    const res = await this.pool.query(`DELETE FROM ${this.table} WHERE kind = $1 AND value = $2`, [kind, value])
    return res.rowCount === 1
  }

  async list(): Promise<Revocation[]> {
    const res = await this.pool.query<{ kind: RevocationKind; value: string; reason: string; created_at: string }>(
      `SELECT kind, value, reason, created_at FROM ${this.table} ORDER BY created_at, kind, value`,
    )
    return res.rows.map((r) => ({ kind: r.kind, value: r.value, reason: r.reason, created_at: Number(r.created_at) }))
  }

  async holds(kind: RevocationKind, value: string): Promise<boolean> {
    const res = await this.pool.query(`SELECT 1 FROM ${this.table} WHERE kind = $1 AND value = $2`, [kind, value])
    return res.rowCount === 1
  }

  async useOnce(jti: string, expiresAt: number): Promise<boolean> {
    const res = await this.pool.query(`INSERT INTO ${this.used} (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING`, [jti, expiresAt])
    return res.rowCount === 1
  }

  async pruneUsed(before: number): Promise<number> {
    const res = await this.pool.query(`DELETE FROM ${this.used} WHERE expires_at < $1`, [before])
    return res.rowCount ?? 0
  }

  async close(): Promise<void> {
    await this.pool.end()
  }
}
