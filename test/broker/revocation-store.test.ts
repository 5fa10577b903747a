// One conformance suite, run against every RevocationStore on its real database: SQLite in a
// temp file and PostgreSQL on this machine (a schema of its own, dropped afterwards).
import t from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import pg from 'pg'
import type { RevocationStore } from '../../broker/revocations/store.js'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { PostgresRevocationStore } from '../../broker/revocations/postgres.js'
import { RevocationList } from '../../broker/revocations/list.js'

export const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'

interface Impl {
  name: string
  /** Opens the store at the same place each time, so reopening proves persistence. */
  open(): RevocationStore
  cleanup(): Promise<void>
}

function sqlite(): Impl {
  const file = join(mkdtempSync(join(tmpdir(), 'lk-rev-')), 'broker.db')
  return { name: 'sqlite', open: () => new SqliteRevocationStore(file), cleanup: async () => {} }
}

function postgres(): Impl {
  const schema = `lk_test_${randomBytes(6).toString('hex')}`
  return {
    name: 'postgres',
    open: () => new PostgresRevocationStore(PG_URL, schema),
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
    await t.rejects(store.add({ kind: 'bogus' as 'agent', value: 'x', reason: 'r', created_at: 1 }), 'the kind is checked by the database too')
    await store.close()

    // A restart forgets nothing.
    const again = impl.open()
    const list = new RevocationList(again)
    await list.load()
    t.ok(list.check(['agent:a:prod:1'], undefined, undefined), 'agent revocation survived the restart')
    t.ok(list.check([], undefined, 'j-1'), 'jti revocation survived the restart')
    t.notOk(list.check(['agent:a:prod:2'], 'task-9', 'j-2'), 'nothing else is revoked')
    const changes: string[] = []
    list.onChange((c) => changes.push(c.op))
    await list.revoke('agent', 'agent:b:prod:1', 'drill')
    await list.revoke('agent', 'agent:b:prod:1', 'drill again')
    await list.unrevoke('agent', 'agent:b:prod:1')
    t.same(changes, ['revoke', 'unrevoke'], 'listeners hear each real change once (the seam for the control stream)')
    await again.close()
  })
}
