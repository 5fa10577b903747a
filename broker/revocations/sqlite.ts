import Database from 'better-sqlite3'
import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import type { Revocation, RevocationKind, RevocationStore } from './store.js'

export class SqliteRevocationStore implements RevocationStore {
  private readonly db: Database.Database

  constructor(path: string) {
    if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true })
    this.db = new Database(path)
    this.db.pragma('journal_mode = WAL')
    this.db.pragma('synchronous = FULL')
  }

  async init(): Promise<void> {
    this.db.exec(`CREATE TABLE IF NOT EXISTS revocations (
      kind TEXT NOT NULL CHECK (kind IN ('agent', 'task', 'jti')),
      value TEXT NOT NULL,
      reason TEXT NOT NULL,
      created_at INTEGER NOT NULL,
      PRIMARY KEY (kind, value)
    )`)
  }

  async add(r: Revocation): Promise<boolean> {
    const info = this.db
      .prepare('INSERT INTO revocations (kind, value, reason, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (kind, value) DO NOTHING')
      .run(r.kind, r.value, r.reason, r.created_at)
    return info.changes === 1
  }

  async remove(kind: RevocationKind, value: string): Promise<boolean> {
    return this.db.prepare('DELETE FROM revocations WHERE kind = ? AND value = ?').run(kind, value).changes === 1
  }

  async list(): Promise<Revocation[]> {
    return this.db.prepare('SELECT kind, value, reason, created_at FROM revocations ORDER BY created_at, kind, value').all() as Revocation[]
  }

  async close(): Promise<void> {
    this.db.close()
  }
}
