// Faults on the control stream, all with real servers: the broker restarting (and revocations
// made while a sidecar was away: missed deltas), and a sidecar past its staleness limit.
import t from 'tap'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { startApi, startControlBroker, restartableBroker, startControlSidecar, viaProxy, revoke, until } from './rig.js'
import { mkdtempSync, writeFileSync, readFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ControlServiceService } from '../../protos/gen/latchkey/v1/control.js'
import { startTestSidecar, loopbackPolicy, CANARY } from '../helpers/harness.js'
import { freePort, API } from '../helpers/broker.js'
import { SPELLINGS, holds } from '../helpers/spellings.js'
import { startBearerEcho } from '../helpers/bearer-echo.js'

t.test('broker restart: the sidecar reconnects and resyncs from the snapshot, missed revocations and unrevocations included', async (t) => {
  const broker = await restartableBroker(t, 'restart')
  const first = broker.first
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(first, api, 'agent:summarizer:prod:restart')
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const task = await s.openTask()
  t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200)
  // Revoke the task now, so the snapshot after the restart must also *remove* something.
  await first.broker.revocations.revoke('task', 'task-that-will-be-unrevoked', 'test')
  await until('first delta applied', () => s.sidecar.control!.state.has('task', 'task-that-will-be-unrevoked'))

  await broker.stop()
  await until('the sidecar saw the stream end', () => !s.sidecar.control!.connected)
  // While the broker is down, its store changes (another replica, or an operator's direct fix).
  const store = new SqliteRevocationStore(broker.dbFile)
  await store.add({ kind: 'agent', value: s.agent, reason: 'revoked while the sidecar was away', created_at: Date.now() })
  await store.remove('task', 'task-that-will-be-unrevoked')
  await store.close()
  t.notOk(s.sidecar.control!.state.agentRevoked, 'nothing heard yet')
  t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200, 'the last known state is still enforced and serves')

  await broker.restart()
  await until('reconnected and resynchronised', () => s.sidecar.control!.connected && s.sidecar.control!.state.agentRevoked, 5000)
  t.notOk(s.sidecar.control!.state.has('task', 'task-that-will-be-unrevoked'), 'the unrevocation it missed is applied too')
  t.match(await viaProxy(s, task.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED' } })
  t.equal(s.sidecar.brokerTokens!.size, 0, 'tokens dropped on the resync')
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  const reconnects = Number(/latchkey_control_reconnects_total (\d+)/.exec(metrics)?.[1])
  t.ok(reconnects >= 2, `reconnects counted (${reconnects})`)
})

t.test('a stale sidecar: past its limit no new token is minted, cached ones still serve, /readyz and metrics say why', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  // 1.5 s: heartbeats come every 100 ms, but a test process sharing its core with two others can
  // miss a shorter window and read as stale while fresh.
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:stale', { control: { stale_after_ms: 1500 } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const warm = await s.openTask()
  t.equal((await viaProxy(s, warm.handle, `${api.origin}/x`)).status, 200)
  const ready = await fetch(`${s.sidecar.adminUrl}/readyz`)
  t.equal(ready.status, 200, 'fresh: ready')
  t.match(await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text(), /latchkey_control_stale 0/)

  // The control stream goes away (the broker's HTTP side with it, but the refusal must come from staleness).
  await broker.broker.control!.close()
  await until('stale', () => s.sidecar.control!.staleReason() !== null, 5000)
  const cold = await s.openTask().catch((e: Error) => e)
  // Opening a task asks for nothing; its first request needs a new token, which is refused.
  t.notOk(cold instanceof Error)
  const refused = await viaProxy(s, (cold as { handle: string }).handle, `${api.origin}/x`)
  t.equal(refused.status, 503)
  t.match(refused.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /control stream stale: nothing heard from the broker for \d+ ms \(limit 1500 ms\)/ })
  t.equal((await viaProxy(s, warm.handle, `${api.origin}/x`)).status, 200, 'a cached token still serves until it expires')
  const unready = await fetch(`${s.sidecar.adminUrl}/readyz`)
  t.equal(unready.status, 503)
  t.match(await unready.json(), { ok: false, reasons: [/control stream stale.*no new tokens are minted/] })
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /latchkey_control_stale 1/)
  t.match(metrics, /latchkey_control_connected 0/)
})

t.test('broker restart during a drill: traffic of the others never fails, and the revocation after the restart still lands', async (t) => {
  const broker = await restartableBroker(t, 'drill-restart')
  const first = broker.first
  const api = await startApi()
  t.teardown(api.close)
  const sidecars: { s: Awaited<ReturnType<typeof startControlSidecar>>; task: Awaited<ReturnType<Awaited<ReturnType<typeof startControlSidecar>>['openTask']>>; ok: number; failed: string[] }[] = []
  for (let i = 0; i < 4; i++) {
    const s = await startControlSidecar(first, api, `agent:summarizer:prod:d${i}`)
    t.teardown(s.close)
    sidecars.push({ s, task: await s.openTask(), ok: 0, failed: [] as string[] })
  }
  await until('all connected', () => sidecars.every((x) => x.s.sidecar.control!.connected))
  const [victim, ...others] = sidecars
  let running = true
  const loops = sidecars.map(async (x) => {
    while (running) {
      const r = await viaProxy(x.s, x.task.handle, `${api.origin}/steady`).catch((e: Error) => ({ status: 0, body: { error: e.message } }))
      if (r.status === 200) x.ok++
      else if (x !== victim) x.failed.push(`${r.status} ${String((r.body as Record<string, unknown>).code ?? r.body.error ?? '')}`)
      await new Promise((res) => setTimeout(res, 20))
    }
  })
  await until('traffic flowing', () => sidecars.every((x) => x.ok > 2))

  await broker.stop()
  await until('streams lost', () => sidecars.every((x) => !x.s.sidecar.control!.connected))
  const okBefore = others.map((x) => x.ok)
  await new Promise((res) => setTimeout(res, 300))
  t.ok(others.every((x, i) => x.ok > okBefore[i]!), 'cached tokens keep serving while the broker is down')
  const second = await broker.restart()
  await until('all reconnected', () => sidecars.every((x) => x.s.sidecar.control!.connected), 5000)
  const r = await revoke(second, 'agent', victim!.s.agent)
  t.equal(r.status, 201)
  await until('victim refused', () => victim!.s.sidecar.control!.state.agentRevoked, 2000)
  t.match(await viaProxy(victim!.s, victim!.task.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED' } })
  await new Promise((res) => setTimeout(res, 200))
  running = false
  await Promise.all(loops)
  t.same(others.flatMap((x) => x.failed), [], 'zero failed requests for the other agents across the restart')
})

t.test('a control endpoint that echoes the bearer token in its error: the stale reason quotes none of it, in any spelling', async (t) => {
  // Whatever answers at sidecar.control.url is sent the control token; its gRPC error text
  // becomes the stale reason: a refused mint's reason (the agent), /readyz and the log.
  const token = `ctl-${CANARY}`
  let spell: (s: string) => string = (s) => s
  const { port, close } = await startBearerEcho(ControlServiceService, 'watch', () => spell)
  t.teardown(close)
  const dir = mkdtempSync(join(tmpdir(), 'lk-ctl-echo-'))
  writeFileSync(join(dir, 'token'), 'e30.e30.sig')
  const api = await startApi()
  t.teardown(api.close)
  for (const [name, spelling] of Object.entries(SPELLINGS)) {
    spell = spelling
    const s = await startTestSidecar(
      {
        ...loopbackPolicy([api.port]),
        sidecar: {
          agent_id: 'agent:summarizer-k8s:prod:echo',
          broker: { url: `http://127.0.0.1:${await freePort()}`, timeout_ms: 500 },
          attestation: { kubernetes: { token_file: join(dir, 'token') } },
          control: { url: `grpc://127.0.0.1:${port}`, token_secret: 'CONTROL', stale_after_ms: 400, backoff_min_ms: 20, backoff_max_ms: 100, state_file: join(dir, `state-${Object.keys(SPELLINGS).indexOf(name)}.json`) },
        },
        credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }],
      },
      { LATCHKEY_SECRET_CONTROL: token },
    )
    await until('stale, with an error heard', () => s.sidecar.control!.staleReason() !== null && s.sidecar.control!.lastError !== null, 3000)
    const task = s.sidecar.tasks.open({ purpose: name, durationS: 60 })
    const res = await viaProxy(s, task.handle, `${api.origin}/x`)
    const ready = await fetch(`${s.sidecar.adminUrl}/readyz`)
    const readyText = await ready.text()
    await s.close()
    t.equal(res.status, 503, `${name}: no token is minted`)
    t.match(res.body.reason, /control stream stale: .*last error: its error text quoted a credential the sidecar sent and is not repeated \(gRPC 16\)/, `${name}: the reason says the text is withheld`)
    const quoted = spelling(token)
    const leaked = (x: string) => holds(x, quoted) || x.includes(CANARY)
    t.notOk(leaked(JSON.stringify(res)) || leaked(readyText), `${name}: not in the agent's response nor /readyz`)
    t.notOk(leaked(existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : ''), `${name}: not in the audit file`)
    t.notOk(s.logs.some(leaked), `${name}: not in the log`)
  }
})
