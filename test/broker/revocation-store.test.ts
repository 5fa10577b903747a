// One conformance suite, run against every RevocationStore on its real database: SQLite in a
// temp file and PostgreSQL on this machine (a schema of its own, dropped afterwards).
import t from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import pg from 'pg'
import Database from 'better-sqlite3'
import type { RevocationStore } from '../../broker/revocations/store.js'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { PostgresRevocationStore } from '../../broker/revocations/postgres.js'
import { RevocationList } from '../../broker/revocations/list.js'

export const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'

interface Impl {
  name: string
  /** Opens the store at the same place each time, so reopening proves persistence. */
  open(): RevocationStore
  /** Runs DDL before the store is opened, `{t}` standing for the revocations table (a table another version left). */
  precreate(sql: string): Promise<void>
  /** How the table is named in the store's messages. */
  table: string
  cleanup(): Promise<void>
}

function sqlite(): Impl {
  const file = join(mkdtempSync(join(tmpdir(), 'lk-rev-')), 'broker.db')
  return {
    name: 'sqlite',
    open: () => new SqliteRevocationStore(file),
    precreate: async (sql) => {
      const db = new Database(file)
      db.exec(sql.replaceAll('{t}', 'revocations'))
      db.close()
    },
    table: 'revocations',
    cleanup: async () => {},
  }
}

function postgres(): Impl {
  const schema = `lk_test_${randomBytes(6).toString('hex')}`
  return {
    name: 'postgres',
    open: () => new PostgresRevocationStore(PG_URL, schema),
    precreate: async (sql) => {
      const c = new pg.Client(PG_URL)
      await c.connect()
      await c.query(`CREATE SCHEMA IF NOT EXISTS "${schema}"`)
      await c.query(sql.replaceAll('{t}', `"${schema}".revocations`))
      await c.end()
    },
    table: `"${schema}".revocations`,
    cleanup: async () => {
      const c = new pg.Client(PG_URL)
      await c.connect()
      await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`)
      await c.end()
    },
  }
}

for (const make of [sqlite, postgres]) {
  const impl = make()
  t.test(`${impl.name} revocation store`, async (t) => {
    t.teardown(impl.cleanup)
    const store = impl.open()
    await store.init()
    await store.init() // idempotent: every start runs it
    t.same(await store.list(), [], 'starts empty')

    t.equal(await store.add({ kind: 'agent', value: 'agent:a:prod:1', reason: 'compromised', created_at: 1000 }), true)
    t.equal(await store.add({ kind: 'agent', value: 'agent:a:prod:1', reason: 'again', created_at: 2000 }), false, 'second revoke is a no-op')
    t.equal(await store.add({ kind: 'task', value: 'task-9', reason: 'ended', created_at: 1500 }), true)
    t.equal(await store.add({ kind: 'jti', value: 'j-1', reason: 'leaked', created_at: 1200 }), true)
    t.same(await store.list(), [
      { kind: 'agent', value: 'agent:a:prod:1', reason: 'compromised', created_at: 1000 },
      { kind: 'jti', value: 'j-1', reason: 'leaked', created_at: 1200 },
      { kind: 'task', value: 'task-9', reason: 'ended', created_at: 1500 },
    ], 'listed oldest first, the first reason kept')
    t.equal(await store.remove('task', 'task-9'), true)
    t.equal(await store.remove('task', 'task-9'), false, 'removing twice reports nothing removed')
    t.equal(await store.remove('agent', 'agent:a:prod:2'), false)
    t.equal(await store.holds('agent', 'agent:a:prod:1'), true, 'holds: what is revoked')
    t.equal(await store.holds('task', 'task-9'), false, 'not what was removed')
    t.equal(await store.holds('task', 'agent:a:prod:1'), false, 'nor a value of another kind')
    await t.rejects(store.add({ kind: 'bogus' as 'agent', value: 'x', reason: 'r', created_at: 1 }), 'the kind is checked by the database too')

    // Single-use jtis (local attestations): recorded once, atomically, until they expire.
    t.equal(await store.useOnce('att-1', 5000), true, 'a jti is taken once')
    t.equal(await store.useOnce('att-1', 9000), false, 'and not twice')
    const raced = await Promise.all(Array.from({ length: 8 }, () => store.useOnce('att-race', 5000)))
    t.equal(raced.filter(Boolean).length, 1, 'eight at once: exactly one takes it')
    t.equal(await store.useOnce('att-late', 7000), true)
    t.equal(await store.pruneUsed(5000), 0, 'nothing expired before 5000')
    t.equal(await store.pruneUsed(5001), 2, 'att-1 and att-race expired')
    t.equal(await store.useOnce('att-late', 7000), false, 'an unexpired jti is kept by pruning')
    t.same(await store.list(), [
      { kind: 'agent', value: 'agent:a:prod:1', reason: 'compromised', created_at: 1000 },
      { kind: 'jti', value: 'j-1', reason: 'leaked', created_at: 1200 },
    ], 'single-use jtis are not revocations')
    await store.close()

    // A restart forgets nothing.
    const again = impl.open()
    const list = new RevocationList(again)
    await list.load()
    t.ok(list.check(['agent:a:prod:1'], undefined, undefined), 'agent revocation survived the restart')
    t.ok(list.check([], undefined, 'j-1'), 'jti revocation survived the restart')
    t.notOk(list.check(['agent:a:prod:2'], 'task-9', 'j-2'), 'nothing else is revoked')
    t.equal(await again.useOnce('att-late', 7000), false, 'a used jti survived the restart')
    const changes: string[] = []
    list.onChange((c) => changes.push(c.op))
    await list.revoke('agent', 'agent:b:prod:1', 'drill')
    await list.revoke('agent', 'agent:b:prod:1', 'drill again')
    await list.unrevoke('agent', 'agent:b:prod:1')
    t.same(changes, ['revoke', 'unrevoke'], 'listeners hear each real change once (the seam for the control stream)')
    await again.close()
  })
}

// A table another version made is kept as it is by CREATE TABLE IF NOT EXISTS: the store must say
// at init what it lacks, not start and then fail every revoke.
const OLDER_SHAPES: [string, string, RegExp | null][] = [
  [
    'no primary key (the shape before jti revocations)',
    `CREATE TABLE {t} (kind TEXT NOT NULL CHECK (kind IN ('agent', 'task')), value TEXT NOT NULL, reason TEXT NOT NULL, created_at BIGINT NOT NULL)`,
    /^broker\.store\.(sqlite|postgres): table (\S+) exists but is not the shape this version needs: no primary key or unique constraint on \(kind, value\)\. Move it aside/,
  ],
  [
    'no created_at column',
    `CREATE TABLE {t} (kind TEXT NOT NULL, value TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (kind, value))`,
    /^broker\.store\.(sqlite|postgres): table (\S+) exists but is not the shape this version needs: no column created_at\. Move it aside/,
  ],
  [
    'neither reason nor created_at, and a key on value alone',
    `CREATE TABLE {t} (kind TEXT NOT NULL, value TEXT NOT NULL UNIQUE)`,
    /: no columns reason, created_at; no primary key or unique constraint on \(kind, value\)\./,
  ],
  [
    'the key, but a CHECK that knows no jti',
    `CREATE TABLE {t} (kind TEXT NOT NULL CHECK (kind IN ('agent', 'task')), value TEXT NOT NULL, reason TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (kind, value))`,
    /^broker\.store\.(sqlite|postgres): table (\S+) exists but refuses a 'jti' revocation: (new row for relation "revocations" violates check constraint "revocations_kind_check"|CHECK constraint failed: kind IN \('agent', 'task'\))\. Move it aside/,
  ],
  [
    'a NOT NULL column this version does not fill',
    `CREATE TABLE {t} (kind TEXT NOT NULL, value TEXT NOT NULL, reason TEXT NOT NULL, created_at BIGINT NOT NULL, actor TEXT NOT NULL, PRIMARY KEY (kind, value))`,
    /^broker\.store\.(sqlite|postgres): table (\S+) exists but refuses a 'agent' revocation: (null value in column "actor" of relation "revocations" violates not-null constraint|NOT NULL constraint failed: revocations\.actor)\. Move it aside/,
  ],
  // What the code needs, said another way, is accepted.
  ['a unique constraint on (value, kind) and an extra column', `CREATE TABLE {t} (value TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, created_at BIGINT NOT NULL, note TEXT, UNIQUE (value, kind))`, null],
]

for (const make of [sqlite, postgres]) {
  const impl = make()
  t.test(`${impl.name} revocation store, a single_use_jtis table without its key: refused at init`, async (t) => {
    t.teardown(impl.cleanup)
    await impl.precreate(`CREATE TABLE ${impl.table.replace(/revocations$/, 'single_use_jtis')} (jti TEXT NOT NULL, expires_at BIGINT NOT NULL)`)
    const store = impl.open()
    const err = await store.init().then(() => null, (e: unknown) => e as Error & { code?: string })
    await store.close()
    t.equal(err?.code, 'LK_STARTUP')
    t.match(err?.message, /^broker\.store\.(sqlite|postgres): table (\S*)single_use_jtis"? exists but is not the shape this version needs: no primary key or unique constraint on \(jti\)\. Move it aside/)
  })
}

for (const make of [sqlite, postgres]) {
  for (const [what, ddl, refused] of OLDER_SHAPES) {
    const impl = make()
    t.test(`${impl.name} revocation store, existing table with ${what}: ${refused ? 'refused at init, naming the table and what it lacks' : 'accepted'}`, async (t) => {
      t.teardown(impl.cleanup)
      await impl.precreate(ddl)
      const store = impl.open()
      t.teardown(() => store.close())
      if (!refused) {
        await store.init()
        t.same(await store.list(), [], 'the start-up check left nothing behind')
        t.equal(await store.add({ kind: 'jti', value: 'j', reason: 'r', created_at: 1 }), true)
        t.equal(await store.add({ kind: 'jti', value: 'j', reason: 'again', created_at: 2 }), false, 'ON CONFLICT finds the key')
        return
      }
      const err = await store.init().then(
        () => null,
        (e: unknown) => e as Error & { code?: string },
      )
      t.ok(err, 'init rejects')
      t.match(err?.message, refused)
      t.ok(err?.message.includes(`table ${impl.table} exists`), `names ${impl.table}`)
      t.equal(err?.code, 'LK_STARTUP', 'a message for people (printed without a stack)')
      t.notOk(err?.message.includes('\n'), 'one line')
    })
  }
}
