// Two broker replicas sharing the real PostgreSQL (a schema of this test's own) and the real NATS
// JetStream (a stream of this test's own): a revocation made on one replica reaches a sidecar
// connected to the other. A third replica without NATS still catches up from the store.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import pg from 'pg'
import { connect } from 'nats'
import { startApi, startControlBroker, startControlSidecar, viaProxy, revoke, until } from './rig.js'
import { delegatedRequest, why } from '../helpers/broker.js'

const PG_URL = 'postgres://postgres@127.0.0.1:5432/test'
const NATS = 'nats://127.0.0.1:4222'

t.test('a revocation on replica 1 reaches sidecars on replica 2 (NATS) and replica 3 (store resync)', async (t) => {
  const id = randomBytes(6).toString('hex')
  const schema = `lk_ctl_${id}`
  const stream = `LK_CTL_${id}`
  const subject = `lk.test.${id}.revocations`
  t.teardown(async () => {
    const c = new pg.Client(PG_URL)
    await c.connect()
    await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`)
    await c.end()
    const nc = await connect({ servers: NATS })
    await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {})
    await nc.close()
  })
  const store = { postgres: { url: PG_URL, schema } }
  const nats = { servers: [NATS], stream, subject }
  const one = await startControlBroker({ store, control: { nats, resync_ms: 60_000 } })
  t.teardown(() => one.close())
  const two = await startControlBroker({ store, control: { nats, resync_ms: 60_000 } })
  t.teardown(() => two.close())
  // No NATS, and a short resync: hears only through the shared store.
  const three = await startControlBroker({ store, control: { resync_ms: 200 } })
  t.teardown(() => three.close())
  const api = await startApi()
  t.teardown(api.close)

  const onTwo = await startControlSidecar(two, api, 'agent:summarizer:prod:r2')
  t.teardown(onTwo.close)
  const onThree = await startControlSidecar(three, api, 'agent:summarizer:prod:r3')
  t.teardown(onThree.close)
  const other = await startControlSidecar(two, api, 'agent:summarizer:prod:keep')
  t.teardown(other.close)
  await until('connected', () => onTwo.sidecar.control!.connected && onThree.sidecar.control!.connected && other.sidecar.control!.connected)
  const t2 = await onTwo.openTask()
  const t3 = await onThree.openTask()
  const tk = await other.openTask()
  for (const [s, task] of [[onTwo, t2], [onThree, t3], [other, tk]] as const) t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200)

  const r = await revoke(one, 'agent', onTwo.agent)
  const returned = performance.now()
  t.equal(r.status, 201, 'revoked on replica 1')
  await until('reached the sidecar on replica 2', () => onTwo.sidecar.control!.state.agentRevoked, 3000)
  const ms = performance.now() - returned
  t.ok(ms < 1000, `across replicas in ${ms.toFixed(1)} ms`)
  t.match(await viaProxy(onTwo, t2.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED', reason: 'revoked' } })
  t.equal(onTwo.sidecar.brokerTokens!.size, 0, 'its tokens are gone')
  t.ok(two.broker.revocations.get('agent', onTwo.agent), 'replica 2 refuses exchanges for it too')
  t.ok(two.broker.bus!.stats.applied >= 1, 'replica 2 heard it over NATS')
  t.equal((await viaProxy(other, tk.handle, `${api.origin}/x`)).status, 200, 'another agent on replica 2 unaffected')
  t.notOk(two.events.some((e) => e.type === 'revocation'), 'recorded once, by the replica that made it')
  t.ok(one.events.some((e) => e.type === 'revocation' && e.value === onTwo.agent))

  // Replica 3 has no NATS: it catches up from the store within its resync period.
  t.equal((await revoke(one, 'agent', onThree.agent)).status, 201)
  await until('reached replica 3 through the store', () => onThree.sidecar.control!.state.agentRevoked, 3000)
  t.equal((await viaProxy(onThree, t3.handle, `${api.origin}/x`)).status, 403)

  // Unrevoke on replica 2 reaches replica 1's list.
  const del = await fetch(`${two.url}/v1/revocations/agent/${encodeURIComponent(onTwo.agent)}`, { method: 'DELETE', headers: { authorization: `Bearer ${two.adminToken}` } })
  t.equal(del.status, 200)
  await until('unrevoke reached replica 1', () => !one.broker.revocations.get('agent', onTwo.agent))
  await until('and the sidecar', () => !onTwo.sidecar.control!.state.agentRevoked)
  t.equal((await viaProxy(onTwo, t2.handle, `${api.origin}/x`)).status, 200)
})

// The bus is a hint and the shared store the record. An unrevoke published by anyone who can
// publish on the subject (NATS credentials shared with other consumers, a stray tool) was applied
// on every replica and told to its sidecars; a resync restored it, and the next such message
// lifted it again. Now an unrevoke counts only once the store no longer holds the revocation.
t.test('an unrevoke heard on the bus for a revocation the store still holds is ignored', async (t) => {
  const id = randomBytes(6).toString('hex')
  const schema = `lk_ctl_${id}`
  const stream = `LK_CTL_${id}`
  const subject = `lk.test.${id}.revocations`
  t.teardown(async () => {
    const c = new pg.Client(PG_URL)
    await c.connect()
    await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`)
    await c.end()
    const nc = await connect({ servers: NATS })
    await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {})
    await nc.close()
  })
  const b = await startControlBroker({ store: { postgres: { url: PG_URL, schema } }, control: { nats: { servers: [NATS], stream, subject }, resync_ms: 60_000 } })
  t.teardown(() => b.close())
  const agent = 'agent:summarizer:prod:forged-unrevoke'
  t.equal((await revoke(b, 'agent', agent)).status, 201)

  const nc = await connect({ servers: NATS })
  t.teardown(() => nc.close())
  const js = nc.jetstream()
  const forged = (op: string, value: string) => js.publish(subject, JSON.stringify({ replica: 'someone-else', op, kind: 'agent', value, reason: null, created_at: Date.now() }))
  await forged('unrevoke', agent)
  // Messages are applied in order: once this later one is in, the unrevoke has been handled.
  const marker = 'agent:summarizer:prod:marker'
  await forged('revoke', marker)
  await until('the bus delivered both', () => !!b.broker.revocations.get('agent', marker))

  t.ok(b.broker.revocations.get('agent', agent), 'the revocation is still in force')
  const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(agent)))
  t.equal(res.status, 400, why(res))
  t.notOk('access_token' in res.body, 'no token for the revoked agent')
  t.match(b.logs(), /unrevoke of a revocation the store still holds; ignored/)

  // A real unrevoke (the row gone from the store first) is still heard.
  const c = new pg.Client(PG_URL)
  await c.connect()
  await c.query(`DELETE FROM "${schema}".revocations WHERE kind = 'agent' AND value = $1`, [agent])
  await c.end()
  await forged('unrevoke', agent)
  await until('a genuine unrevoke applies', () => !b.broker.revocations.get('agent', agent))
})
