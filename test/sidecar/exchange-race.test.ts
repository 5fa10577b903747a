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

for (const kind of ['task', 'agent'] as const) {
  t.test(`through the sidecar: ${kind === 'task' ? 'a task' : 'an agent'} revoked at the broker while its exchange is in flight gets 403 LK_REVOKED, and the API no token`, async (t) => {
    const broker = await startControlBroker()
    t.teardown(() => broker.close())
    const front = await startBrokerFront(broker.url)
    t.teardown(front.close)
    const api = await startApi()
    t.teardown(api.close)
    const agent = `agent:summarizer:prod:race-${kind}`
    const s = await startControlSidecar(broker, api, agent, { sidecar: { broker: { url: front.url, timeout_ms: 5000 } } })
    t.teardown(s.close)
    await until('connected', () => s.sidecar.control!.connected)
    const task = await s.openTask()
    front.mode = { mode: 'hold' }
    const arrived = front.handled(front.requests + 1)
    const reply = viaProxy(s, task.handle, `${api.origin}/race`).then((r) => ({ status: r.status, code: r.body.code }), (err: Error) => ({ status: 0, code: err.message }))
    await arrived
    t.equal((await revoke(broker, kind, kind === 'task' ? task.id : agent)).status, 201)
    await until('the revocation reached the sidecar', () => (kind === 'task' ? s.sidecar.control!.state.has('task', task.id) : s.sidecar.control!.state.agentRevoked))
    front.release()
    // Nothing had been sent to the agent: it reads the refusal (the revocation's cut of its call
    // gave it a bare close, "empty reply from server"), and the minted token reaches no API.
    const got = await reply
    t.same(got, { status: 403, code: 'LK_REVOKED' }, 'answered with the refusal, not cut')
    await new Promise((r) => setTimeout(r, 300))
    t.same(api.tokens, [], 'no token reached the API')
    const event = (await s.audit()).find((e) => e.path === '/race')
    t.match(event, { status: 403, error: 'LK_REVOKED' }, 'recorded as the agent saw it')
  })
}

// The agent revoked while POST /v1/tasks waits on the exchange its audiences asked for: the task
// API says it is revoked (403, not retryable), as it does for a POST after the revocation, not
// that the broker is unavailable (503, retryable): an SDK told to retry came back to a 403.
t.test('an agent revoked while its task opens: 403 revoked, no task left open', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const front = await startBrokerFront(broker.url)
  t.teardown(front.close)
  const api = await startApi()
  t.teardown(api.close)
  const agent = 'agent:summarizer:prod:open-race'
  const s = await startControlSidecar(broker, api, agent, { sidecar: { broker: { url: front.url, timeout_ms: 5000 } } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  front.mode = { mode: 'hold' }
  const arrived = front.handled(front.requests + 1)
  const opening = fetch(`${s.sidecar.adminUrl}/v1/tasks`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ purpose: 'race', duration_s: 200, audiences: [API] }),
  })
  await arrived
  // Not yet open: the broker has not answered for it, so it is not listed (nor logged as opened).
  t.same(((await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`)).json()) as { tasks: unknown[] }).tasks, [], 'a task still opening is not listed')
  t.equal((await revoke(broker, 'agent', agent)).status, 201)
  await until('the revocation reached the sidecar', () => s.sidecar.control!.state.agentRevoked)
  front.release()
  const res = await opening
  const body = (await res.json()) as Record<string, unknown>
  t.equal(res.status, 403, 'refused as revoked')
  t.match(body, { error: 'revoked', reason: /revocation:agent/, retryable: false })
  t.equal(res.headers.get('x-should-retry'), 'false')
  t.equal(s.sidecar.tasks.size, 0, 'no task left open')
})
