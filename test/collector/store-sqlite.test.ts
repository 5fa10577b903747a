import t from 'tap'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import { SqliteAuditStore } from '../../collector/store/sqlite.js'
import { conformance } from './store-conformance.js'

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
      table: (name) => `${name} in ${path}`,
      cleanup: async () => rmSync(dir, { recursive: true, force: true }),
    }
  },
})
