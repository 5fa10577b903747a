import t from 'tap'
import pg from 'pg'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { conformance } from './store-conformance.js'
import { PG_URL, uniqueSchema } from './events.js'

conformance(t, {
  name: 'postgres',
  async create() {
    const schema = uniqueSchema()
    const store = new PostgresAuditStore({ url: PG_URL, schema })
    await store.ensureReady()
    const admin = new pg.Client({ connectionString: PG_URL })
    await admin.connect()
    await admin.query(`SET search_path TO ${schema}`)
    return {
      store,
      replica: () => new PostgresAuditStore({ url: PG_URL, schema }),
      raw: async (sql) => void (await admin.query(sql)),
      disableGuards: async () => void (await admin.query('ALTER TABLE audit_events DISABLE TRIGGER USER')),
      cleanup: async () => {
        await admin.query(`DROP SCHEMA ${schema} CASCADE`)
        await admin.end()
        await store.close()
      },
    }
  },
})

t.test('postgres: TRUNCATE is refused too', async (t) => {
  const schema = uniqueSchema()
  const store = new PostgresAuditStore({ url: PG_URL, schema })
  t.teardown(async () => {
    await store.dropSchema()
    await store.close()
  })
  await store.ensureReady()
  await t.rejects(store.pool.query(`TRUNCATE ${schema}.audit_events`), /append-only: TRUNCATE refused/)
})

t.test('postgres: an unreachable database is named, not hung on', async (t) => {
  const store = new PostgresAuditStore({ url: 'postgres://postgres@127.0.0.1:1/test', schema: uniqueSchema() })
  t.teardown(() => store.close())
  await t.rejects(store.append('s', []), { code: 'LK_STORE_UNAVAILABLE', message: /postgres schema setup failed: .*ECONNREFUSED/ })
})
