// jti and task revocations are forgotten once nothing they could match is alive, so the control
// stream's snapshot (one gRPC message) does not grow for ever; agent revocations stay until lifted.
import t from 'tap'
import { join } from 'node:path'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { startTestBroker } from '../helpers/broker.js'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { REVOCATION_RETENTION_MS } from '../../broker/revocations/list.js'

const HOUR = 3_600_000
const DAY = 24 * HOUR

t.test('expired jti and task revocations are pruned at start and on schedule; agents never', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-prune-'))
  const path = join(dir, 'broker.db')
  const start = Date.now()
  const pre = new SqliteRevocationStore(path)
  await pre.init()
  await pre.add({ kind: 'jti', value: 'jti-25h', reason: 'leaked', created_at: start - 25 * HOUR })
  await pre.add({ kind: 'jti', value: 'jti-1h', reason: 'leaked', created_at: start - HOUR })
  await pre.add({ kind: 'task', value: 'task-2d', reason: 'stop', created_at: start - 2 * DAY })
  await pre.add({ kind: 'task', value: 'task-9d', reason: 'stop', created_at: start - 9 * DAY })
  await pre.add({ kind: 'agent', value: 'agent:summarizer:prod:old', reason: 'compromised', created_at: start - 400 * DAY })
  await pre.close()
  t.equal(REVOCATION_RETENTION_MS.jti, (86_400 + 30) * 1000, 'a jti outlives the longest token (and skew) only')
  t.equal(REVOCATION_RETENTION_MS.task, (604_800 + 86_400 + 30) * 1000, 'a task outlives the longest task and its last token')

  let clock = start
  const b = await startTestBroker({ store: { sqlite: { path } }, now: () => clock })
  t.teardown(b.close)
  const admin = async () =>
    ((await (await fetch(`${b.url}/v1/revocations`, { headers: { authorization: `Bearer ${b.adminToken}` } })).json()) as { revocations: { kind: string; value: string }[] }).revocations
      .map((r) => `${r.kind}:${r.value}`)
      .sort()
  t.same(await admin(), ['agent:agent:summarizer:prod:old', 'jti:jti-1h', 'task:task-2d'], 'pruned at start: the 25 h jti and the 9-day task')

  const changes: unknown[] = []
  b.broker.revocations.onChange((c) => changes.push(c))
  clock = start + DAY
  t.equal(await b.broker.revocations.prune(clock), 1, 'a day later the 1 h jti has outlived every token it could match')
  t.same(changes, [{ op: 'unrevoke', kind: 'jti', value: 'jti-1h', expired: true }], 'announced as an expired unrevoke (sidecars forget it too)')
  t.match(b.events.filter((e) => e.type === 'revocation').at(-1), { op: 'unrevoke', kind: 'jti', value: 'jti-1h', reason: 'expired' })
  clock = start + 400 * DAY
  t.equal(await b.broker.revocations.prune(clock), 1, 'the task goes once its retention has passed')
  t.same(await admin(), ['agent:agent:summarizer:prod:old'], 'the agent revocation stays, however old')
  const store = new SqliteRevocationStore(path)
  t.same((await store.list()).map((r) => r.value), ['agent:summarizer:prod:old'], 'removed from the store, so a restart does not bring them back')
  await store.close()
})
