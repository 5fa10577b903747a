// The broker and its revocation store going wrong: a store it cannot open, or a table of the
// wrong shape, stops the start in one line naming the setting and the cause (not a stack, and not
// a broker that reports ready and then fails every revoke); a store that fails once running is
// answered with a generic 500 and its cause in the log, never a credential.
import t, { type Test } from 'tap'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { stringify } from 'yaml'
import { brokerCliStart, startTestBroker, TEST_REGISTRY } from '../helpers/broker.js'
import type { BrokerConfig } from '../../lib/config/schema.js'

const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'

async function sql(text: string): Promise<void> {
  const c = new pg.Client(PG_URL)
  await c.connect()
  try {
    await c.query(text)
  } finally {
    await c.end()
  }
}

/** A schema of the test's own, dropped when it ends. */
function ownSchema(t: Test): string {
  const schema = `lk_test_${randomBytes(6).toString('hex')}`
  t.teardown(() => sql(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`))
  return schema
}

// What an older broker left: no primary key on (kind, value), and no 'jti' kind.
const OLD_TABLE = (schema: string) =>
  `CREATE SCHEMA "${schema}"; CREATE TABLE "${schema}".revocations (kind text NOT NULL CHECK (kind IN ('agent', 'task')), value text NOT NULL, reason text NOT NULL, created_at bigint NOT NULL)`

async function startFails(t: Test, store: BrokerConfig['store']): Promise<Error & { code?: string }> {
  const err = await startTestBroker({ store }).then(
    async (b) => {
      await b.close()
      return null
    },
    (e: unknown) => e as Error & { code?: string },
  )
  t.ok(err, 'the broker does not start')
  return err ?? new Error('started')
}

t.test('a revocations table of an older shape stops the start, naming schema.table and what it lacks', async (t) => {
  const schema = ownSchema(t)
  await sql(OLD_TABLE(schema))
  const err = await startFails(t, { postgres: { url: PG_URL, schema } })
  t.equal(err.message, `broker.store.postgres: table "${schema}".revocations exists but is not the shape this version needs: no primary key or unique constraint on (kind, value). Move it aside (or migrate it) and start again; nothing was changed.`)
  t.equal(err.code, 'LK_STARTUP', 'printed as it is by the CLI')

  await sql(`ALTER TABLE "${schema}".revocations DROP COLUMN created_at; ALTER TABLE "${schema}".revocations ADD PRIMARY KEY (kind, value)`)
  const missing = await startFails(t, { postgres: { url: PG_URL, schema } })
  t.equal(missing.message, `broker.store.postgres: table "${schema}".revocations exists but is not the shape this version needs: no column created_at. Move it aside (or migrate it) and start again; nothing was changed.`, 'a missing column is named, not a raw "column does not exist" stack')
})

t.test('PostgreSQL down, or the database missing: one start-up line naming the setting and the cause, never the password', async (t) => {
  const down = await startFails(t, { postgres: { url: 'postgres://postgres:LKCANARYPW@127.0.0.1:1/test', schema: 'latchkey' } })
  t.equal(down.message, 'broker.store.postgres: cannot open the store at 127.0.0.1:1/test: connect ECONNREFUSED 127.0.0.1:1')
  t.equal(down.code, 'LK_STARTUP')
  const db = `lk_missing_${randomBytes(4).toString('hex')}`
  const url = new URL(PG_URL)
  url.pathname = `/${db}`
  url.password = 'LKCANARYPW'
  const nodb = await startFails(t, { postgres: { url: url.toString(), schema: 'latchkey' } })
  t.equal(nodb.message, `broker.store.postgres: cannot open the store at ${url.hostname}:${url.port || '5432'}/${db}: database "${db}" does not exist`)
  t.notMatch(down.message + nodb.message, /LKCANARYPW/)
})

t.test('a SQLite store that cannot be opened stops the start naming its setting and path', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-store-'))
  writeFileSync(join(dir, 'file'), '')
  const err = await startFails(t, { sqlite: { path: join(dir, 'file', 'broker.db') } })
  t.match(err.message, new RegExp(`^broker\\.store\\.sqlite: cannot open the store at ${join(dir, 'file', 'broker.db').replace(/[.]/g, '\\.')}: .*(EEXIST|ENOTDIR)`))
  t.equal(err.code, 'LK_STARTUP')
})

t.test('`latchkey broker` on the older table: exit 1, one line on stderr, no stack', async (t) => {
  const schema = ownSchema(t)
  await sql(OLD_TABLE(schema))
  const r = await brokerCliStart(stringify(TEST_REGISTRY), { postgres: { url: PG_URL, schema } })
  t.equal(r.status, 1)
  t.equal(r.stderr, `broker.store.postgres: table "${schema}".revocations exists but is not the shape this version needs: no primary key or unique constraint on (kind, value). Move it aside (or migrate it) and start again; nothing was changed.\n`)
})

t.test('a store failing while the broker runs: a generic 500 to the client, the cause in the log, no token', async (t) => {
  const schema = ownSchema(t)
  const b = await startTestBroker({ store: { postgres: { url: PG_URL, schema } } })
  t.teardown(b.close)
  await sql(`ALTER TABLE "${schema}".revocations RENAME TO revocations_gone`)
  const res = await fetch(`${b.url}/v1/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ kind: 'agent', value: 'agent:summarizer:prod:x', reason: 'drill' }),
  })
  t.equal(res.status, 500)
  t.same(await res.json(), { error: 'server_error', error_description: 'revocation store unavailable' }, 'the body says nothing of the cause')
  const line = b
    .logs()
    .split('\n')
    .find((l) => l.includes('admin request failed'))
  t.ok(line, 'the failure is logged')
  t.match(JSON.parse(line ?? '{}'), { level: 50, method: 'POST', reason: `relation "${schema}.revocations" does not exist`, msg: 'admin request failed: revocation store unavailable' })
  t.notOk(b.logs().includes(b.adminToken), 'the admin token is not logged')
})

t.test('a resync that fails is logged with its cause', async (t) => {
  const schema = ownSchema(t)
  const b = await startTestBroker({ store: { postgres: { url: PG_URL, schema } }, broker: { control: { port: 0, resync_ms: 50 } }, env: { LATCHKEY_CONTROL_TOKEN: 'control-token' } })
  t.teardown(b.close)
  await sql(`ALTER TABLE "${schema}".revocations RENAME TO revocations_gone`)
  const end = Date.now() + 5_000
  while (Date.now() < end && !b.logs().includes('revocation resync failed')) await sleep(20)
  const line = b
    .logs()
    .split('\n')
    .find((l) => l.includes('revocation resync failed'))
  t.ok(line, 'logged')
  t.match(JSON.parse(line ?? '{}'), { level: 40, reason: `relation "${schema}.revocations" does not exist`, msg: 'revocation resync failed: store unavailable' })
})

t.test('`latchkey broker` with its NATS unreachable: exit 1, one line naming the servers, never their password', async (t) => {
  process.env.LATCHKEY_CONTROL_TOKEN ??= randomBytes(16).toString('hex')
  const r = await brokerCliStart(stringify(TEST_REGISTRY), undefined, { control: { port: 0, insecure_plaintext: true, nats: { servers: ['nats://probe:NATS-PASSWORD-CANARY@127.0.0.1:1'] } } })
  t.equal(r.status, 1)
  t.equal(r.stderr, 'broker.control.nats nats://***@127.0.0.1:1: cannot connect (CONNECTION_REFUSED)\n')
  t.notMatch(r.stderr, /NATS-PASSWORD-CANARY/)
})
