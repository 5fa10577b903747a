import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { openDatabase, pragma, statement, type Database } from '../../lib/sqlite.js'
import { assertShape, refusedWrite, sqliteShape } from '../../lib/store-schema.js'
import { REVOCATION_KINDS, REVOCATIONS_SHAPE, SINGLE_USE_SHAPE, type Revocation, type RevocationKind, type RevocationStore } from './store.js'

export class SqliteRevocationStore implements RevocationStore {
  private readonly db: Database.Database

  constructor(path: string) {
    if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true })
    this.db = openDatabase(path)
    pragma(this.db, 'journal_mode = WAL')
    pragma(this.db, 'synchronous = FULL')
  }

  async init(): Promise<void> {
    this.db.exec(`CREATE TABLE IF NOT EXISTS revocations (
      kind TEXT NOT NULL CHECK (kind IN ('agent', 'task', 'jti')),
      value TEXT NOT NULL,
      reason TEXT NOT NULL,
      created_at INTEGER NOT NULL,
      PRIMARY KEY (kind, value)
    )`)
    // A table made by another version stays as it was: check it has what add() and list() need.
    const shape = sqliteShape(this.db, 'revocations')
    if (shape) assertShape({ ...REVOCATIONS_SHAPE, name: 'revocations' }, shape, 'broker.store.sqlite')
    this.db.exec('CREATE TABLE IF NOT EXISTS single_use_jtis (jti TEXT NOT NULL PRIMARY KEY, expires_at INTEGER NOT NULL)')
    const used = sqliteShape(this.db, 'single_use_jtis')
    if (used) assertShape({ ...SINGLE_USE_SHAPE, name: 'single_use_jtis' }, used, 'broker.store.sqlite')
    // Its constraints must take every kind this version revokes (an older CHECK knew no 'jti'):
    // one row of each, rolled back.
    const probe = statement(this.db, `INSERT INTO revocations (kind, value, reason, created_at) VALUES (?, 'latchkey:schema-check', 'schema check', 0) ON CONFLICT (kind, value) DO NOTHING`)
    this.db.exec('SAVEPOINT latchkey_schema_check')
    try {
      for (const kind of REVOCATION_KINDS) {
        try {
          probe.run(kind)
        } catch (err) {
          if (String((err as { code?: unknown }).code).startsWith('SQLITE_CONSTRAINT')) throw refusedWrite('broker.store.sqlite', 'revocations', `a '${kind}' revocation`, (err as Error).message)
          throw err
        }
      }
    } finally {
      this.db.exec('ROLLBACK TO latchkey_schema_check; RELEASE latchkey_schema_check')
    }
  }

  async add(r: Revocation): Promise<boolean> {
    const insert = statement(this.db, 'INSERT INTO revocations (kind, value, reason, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (kind, value) DO NOTHING')
    return insert.run(r.kind, r.value, r.reason, r.created_at).changes === 1
  }

  async remove(kind: RevocationKind, value: string): Promise<boolean> {
    return statement(this.db, 'DELETE FROM revocations WHERE kind = ? AND value = ?').run(kind, value).changes === 1
  }

  async list(): Promise<Revocation[]> {
    return statement<[], Revocation>(this.db, 'SELECT kind, value, reason, created_at FROM revocations ORDER BY created_at, kind, value').all()
  }

  async holds(kind: RevocationKind, value: string): Promise<boolean> {
    return statement<[RevocationKind, string], { one: number }>(this.db, 'SELECT 1 AS one FROM revocations WHERE kind = ? AND value = ?').get(kind, value) !== undefined
  }

  async useOnce(jti: string, expiresAt: number): Promise<boolean> {
    return statement(this.db, 'INSERT INTO single_use_jtis (jti, expires_at) VALUES (?, ?) ON CONFLICT (jti) DO NOTHING').run(jti, expiresAt).changes === 1
  }

  async pruneUsed(before: number): Promise<number> {
    return statement(this.db, 'DELETE FROM single_use_jtis WHERE expires_at < ?').run(before).changes
  }

  async close(): Promise<void> {
    this.db.close()
  }
}
