// The broker and its revocation store going wrong: a store that fails once running is answered
// with a generic 500 and its cause in the log, never a credential.
import t, { type Test } from 'tap'
import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { startTestBroker } from '../helpers/broker.js'

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
