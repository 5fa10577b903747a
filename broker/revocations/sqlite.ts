import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { openDatabase, pragma, statement, type Database } from '../../lib/sqlite.js'
import { assertShape, sqliteShape } from '../../lib/store-schema.js'
import { REVOCATIONS_SHAPE, type Revocation, type RevocationKind, type RevocationStore } from './store.js'

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

  async close(): Promise<void> {
    this.db.close()
  }
}
