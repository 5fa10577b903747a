import t from 'tap'
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import { SqliteAuditStore } from '../../collector/store/sqlite.js'
import { conformance, type Place } from './store-conformance.js'

/** A file where a reader is pointed: `contents()` is null while neither it nor a journal of its is there. */
function place(dir: string, path: string): Place {
  return {
    openReadOnly: () => SqliteAuditStore.openReadOnly(path),
    contents: async () => {
      if (!existsSync(path)) return readdirSync(dir).length === 0 ? null : readdirSync(dir)
      const db = new Database(path, { readonly: true })
      try {
        return (db.prepare(`SELECT name FROM sqlite_master`).all() as { name: string }[]).map((r) => r.name)
      } finally {
        db.close()
      }
    },
    names: ['collector.store.path', path],
    cleanup: async () => rmSync(dir, { recursive: true, force: true }),
  }
}

conformance(t, {
  name: 'sqlite',
  async create() {
    const dir = mkdtempSync(join(tmpdir(), 'lk-store-'))
    const path = join(dir, 'audit.db')
    const store = new SqliteAuditStore(path)
    const replicas: SqliteAuditStore[] = []
    return {
      store,
      replica: () => {
        const r = new SqliteAuditStore(path)
        replicas.push(r)
        return r
      },
      readOnly: () => SqliteAuditStore.openReadOnly(path),
      raw: async (sql) => void store.db.exec(sql),
      disableGuards: async () => void store.db.exec('DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete'),
      cleanup: async () => {
        await store.close()
        rmSync(dir, { recursive: true, force: true })
      },
    }
  },
  async preexisting(ddl) {
    const dir = mkdtempSync(join(tmpdir(), 'lk-store-'))
    const path = join(dir, 'audit.db')
    const db = new Database(path)
    db.exec(ddl.replaceAll('{events}', 'audit_events').replaceAll('{cursors}', 'audit_cursors'))
    db.close()
    return {
      open: async () => {
        const store = new SqliteAuditStore(path)
        await store.checkSchema()
        return store
      },
      openReadOnly: () => SqliteAuditStore.openReadOnly(path),
      table: (name) => `${name} in ${path}`,
      cleanup: async () => rmSync(dir, { recursive: true, force: true }),
    }
  },
  async missing() {
    const dir = mkdtempSync(join(tmpdir(), 'lk-store-'))
    return place(dir, join(dir, 'audit.db'))
  },
  async empty() {
    const dir = mkdtempSync(join(tmpdir(), 'lk-store-'))
    const path = join(dir, 'audit.db')
    writeFileSync(path, '')
    return place(dir, path)
  },
})
