// A task ended or revoked while its token exchange is in flight: whoever waits on that exchange is
// told LK_TASK_ENDED or LK_REVOKED when it lands, and the freshly minted token is never handed
// out. Real broker; a front holds its answer back so the end or revocation lands in between.
import t from 'tap'
import { join } from 'node:path'
import { startTestBroker, API } from '../helpers/broker.js'
import { startBrokerFront } from '../helpers/broker-front.js'
import { AGENT } from '../helpers/tokens.js'
import { BrokerClient } from '../../proxy/credentials/broker-client.js'
import { BrokerTokenSource } from '../../proxy/credentials/broker-source.js'
import { LocalKeyEvidence } from '../../proxy/attest/local-key.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { TaskRegistry } from '../../proxy/tasks/registry.js'
import { startApi, startControlBroker, startControlSidecar, viaProxy, revoke, until } from '../control/rig.js'

t.test('the token source: a task revoked or ended mid-exchange voids that exchange, and only that one', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const front = await startBrokerFront(broker.url)
  t.teardown(front.close)
  const src = new BrokerTokenSource(new BrokerClient(front.url, 5000, new LocalKeyEvidence(join(broker.dir, 'local', 'local-attestor.key.json'), AGENT, broker.issuer)), { minRemainingMs: 1000 })
  t.teardown(() => src.close())
  const tasks = new TaskRegistry(AGENT, { maxDurationS: 3600 })
  tasks.onEnd((x) => src.dropTask(x.id))
  const binding = compileBinding({ id: 'api', audience: API, source: 'broker', scopes: ['read'], inject: { type: 'bearer' } })
  const revoked = tasks.open({ purpose: 'revoked', durationS: 60 })
  const ended = tasks.open({ purpose: 'ended', durationS: 60 })
  const other = tasks.open({ purpose: 'other', durationS: 60 })

  front.mode = { mode: 'hold' }
  const arrived = front.handled(3)
  const settled = (p: Promise<unknown>) => p.then((value) => ({ value, error: null }), (error: { code?: string; rule?: string }) => ({ value: null, error }))
  const [a, b, c] = [revoked, ended, other].map((task) => settled(Promise.resolve(src.get(binding, task.identity))))
  // A second request for the revoked task waits on the same exchange.
  const a2 = settled(Promise.resolve(src.get(binding, revoked.identity)))
  await arrived
  t.equal(src.exchanges, 3, 'three exchanges in flight')
  src.dropTask(revoked.id, 'revoked')
  tasks.end(ended.handle)
  front.release()
  t.match(await a, { value: null, error: { code: 'LK_REVOKED', rule: 'revocation:task' } }, 'the waiter on the revoked task gets LK_REVOKED, not the token')
  t.match(await a2, { value: null, error: { code: 'LK_REVOKED' } }, 'so does every other waiter on that exchange')
  t.match(await b, { value: null, error: { code: 'LK_TASK_ENDED' } }, 'the waiter on the ended task gets LK_TASK_ENDED')
  t.match(await c, { value: { value: String }, error: null }, 'the other task gets its token')
  t.same(src.describe(revoked.id), [], 'nothing cached for the revoked task')
  t.same(src.describe(ended.id), [], 'nothing cached for the ended task')
  t.equal(src.describe(other.id).length, 1)
})

t.test('through the sidecar: a task revoked at the broker while its exchange is in flight gets 403 LK_REVOKED, and the API no token', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const front = await startBrokerFront(broker.url)
  t.teardown(front.close)
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:race', { sidecar: { broker: { url: front.url, timeout_ms: 5000 } } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const task = await s.openTask()
  front.mode = { mode: 'hold' }
  const arrived = front.handled(front.requests + 1)
  const reply = viaProxy(s, task.handle, `${api.origin}/race`).then((r) => ({ status: r.status, code: r.body.code }), (err: Error) => ({ status: 0, code: err.message }))
  await arrived
  t.equal((await revoke(broker, 'task', task.id)).status, 201)
  await until('the revocation reached the sidecar', () => s.sidecar.control!.state.has('task', task.id))
  front.release()
  // The sidecar answers 403, or has already cut the call (it cuts a revoked task's calls): either
  // way the minted token must not reach the API.
  const got = await reply
  t.ok((got.status === 403 && got.code === 'LK_REVOKED') || got.status === 0, `refused or cut (${got.status} ${String(got.code)})`)
  await new Promise((r) => setTimeout(r, 300))
  t.same(api.tokens, [], 'no token reached the API')
})
