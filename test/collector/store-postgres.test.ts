import t from 'tap'
import pg from 'pg'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { conformance, type Place } from './store-conformance.js'
import { PG_URL, uniqueSchema } from './events.js'

/** A schema where a reader is pointed: `contents()` is null while there is no such schema. */
async function place(schema: string): Promise<Place> {
  const admin = new pg.Client({ connectionString: PG_URL })
  await admin.connect()
  const where = new URL(PG_URL)
  return {
    openReadOnly: () => PostgresAuditStore.openReadOnly({ url: PG_URL, schema }),
    contents: async () => {
      if ((await admin.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [schema])).rowCount === 0) return null
      // Tables, and anything else the migration makes (its trigger function).
      const objects = await admin.query<{ name: string }>(
        `SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
         UNION ALL SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1`,
        [schema],
      )
      return objects.rows.map((r) => r.name)
    },
    names: ['collector.store.schema', `"${schema}"`, `${where.hostname}:${where.port || '5432'}${where.pathname}`],
    cleanup: async () => {
      await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)
      await admin.end()
    },
  }
}

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
      readOnly: () => PostgresAuditStore.openReadOnly({ url: PG_URL, schema }),
      raw: async (sql) => void (await admin.query(sql)),
      disableGuards: async () => void (await admin.query('ALTER TABLE audit_events DISABLE TRIGGER USER')),
      cleanup: async () => {
        await admin.query(`DROP SCHEMA ${schema} CASCADE`)
        await admin.end()
        await store.close()
      },
    }
  },
  async preexisting(ddl) {
    const schema = uniqueSchema()
    const admin = new pg.Client({ connectionString: PG_URL })
    await admin.connect()
    await admin.query(`CREATE SCHEMA ${schema}`)
    await admin.query(ddl.replaceAll('{events}', `${schema}.audit_events`).replaceAll('{cursors}', `${schema}.audit_cursors`))
    return {
      open: async () => {
        const store = new PostgresAuditStore({ url: PG_URL, schema })
        try {
          await store.checkSchema()
        } catch (err) {
          await store.close()
          throw err
        }
        return store
      },
      openReadOnly: () => PostgresAuditStore.openReadOnly({ url: PG_URL, schema }),
      table: (name) => `"${schema}".${name}`,
      cleanup: async () => {
        await admin.query(`DROP SCHEMA ${schema} CASCADE`)
        await admin.end()
      },
    }
  },
  missing: () => place(uniqueSchema()),
  async empty() {
    const schema = uniqueSchema()
    const p = await place(schema)
    const admin = new pg.Client({ connectionString: PG_URL })
    await admin.connect()
    await admin.query(`CREATE SCHEMA ${schema}`)
    await admin.end()
    return p
  },
})

t.test('postgres: a read-only open names an unreachable database without its credentials', async (t) => {
  const err = await PostgresAuditStore.openReadOnly({ url: 'postgres://postgres:LKCANARYpw@127.0.0.1:1/test', schema: uniqueSchema() }).then(
    (s) => s.close().then(() => null),
    (e: unknown) => e as Error & { code?: string },
  )
  t.match(err, { code: 'LK_STARTUP', message: /^collector\.store\.url: cannot open the store at 127\.0\.0\.1:1\/test: .*ECONNREFUSED/ })
  t.notMatch(err?.message, /LKCANARY/, 'no password in the message')
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

t.test('postgres: run as a writer role, the collector can insert and read, and nothing else', async (t) => {
  const schema = uniqueSchema()
  const role = `${schema}_writer`
  const admin = new pg.Client({ connectionString: PG_URL })
  await admin.connect()
  await admin.query(`CREATE ROLE ${role} LOGIN`)
  const owner = new PostgresAuditStore({ url: PG_URL, schema, writerRole: role })
  await owner.ensureReady()
  const writerUrl = new URL(PG_URL)
  writerUrl.username = role
  const writer = new PostgresAuditStore({ url: writerUrl.toString(), schema, migrate: false })
  const raw = new pg.Client({ connectionString: writerUrl.toString() })
  await raw.connect()
  t.teardown(async () => {
    await raw.end()
    await writer.close()
    await owner.dropSchema()
    await owner.close()
    await admin.query(`DROP ROLE ${role}`)
    await admin.end()
  })
  const { seqEvents } = await import('./events.js')
  t.equal((await writer.append('s1', seqEvents(1, 5))).stored, 5)
  t.same((await writer.verify()).ok, true)
  t.equal((await writer.inventory()).agents.length, 1)
  await raw.query(`SET search_path TO ${schema}`)
  await t.rejects(raw.query(`UPDATE audit_events SET host = 'x'`), /permission denied for table audit_events/)
  await t.rejects(raw.query(`DELETE FROM audit_events`), /permission denied for table audit_events/)
  await t.rejects(raw.query(`TRUNCATE audit_events`), /permission denied for table audit_events/)
  await t.rejects(raw.query(`ALTER TABLE audit_events DISABLE TRIGGER USER`), /must be owner of table audit_events/)
  await t.rejects(raw.query(`DROP TABLE audit_events`), /must be owner of table audit_events/)
  // A writer store that would migrate is refused at the first DDL it has no right to.
  const eager = new PostgresAuditStore({ url: writerUrl.toString(), schema })
  t.teardown(() => eager.close())
  await t.rejects(eager.append('s1', []), { code: 'LK_STORE_UNAVAILABLE', message: /postgres schema setup failed: .*(permission denied|must be owner)/ })
})
