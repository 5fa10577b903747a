// Revocations outlive a sidecar restart: the sidecar keeps what the broker last told it in
// sidecar.control.state_file and loads it before its first call. All real: a broker (admin API,
// control gRPC), sidecars, upstream APIs; the broker is stopped and the sidecars restarted.
import t from 'tap'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { startApi, startControlBroker, viaProxy, revoke, until, CONTROL_TOKEN, type Api } from './rig.js'
import { startTestSidecar, loopbackPolicy, CANARY, openTask, type TestSidecar } from '../helpers/harness.js'
import { API, freePort, type TestBroker } from '../helpers/broker.js'
import { REVOCATION_RETENTION_MS } from '../../broker/revocations/list.js'
import { RETENTION_MS } from '../../proxy/control/state.js'
import { defaultStateFile, StateFileWriter, STATE_FORMAT } from '../../proxy/control/persist.js'
import { validateConfig } from '../../lib/config/load.js'
import { createLogger } from '../../lib/log.js'

const DAY = 86_400_000

/** A sidecar with a broker-minted credential (api) and a static one (vault), its state in `stateFile`. */
function sidecar(
  control: { url: string; broker?: TestBroker },
  apis: { minted: Api; static: Api },
  agent: string,
  stateFile: string,
  extra: Record<string, unknown> = {},
): Promise<TestSidecar> {
  return startTestSidecar(
    {
      ...loopbackPolicy([apis.minted.port, apis.static.port]),
      sidecar: {
        agent_id: agent,
        ...(control.broker
          ? {
              broker: { url: control.broker.url, timeout_ms: 2000 },
              attestation: { local: { key_file: join(control.broker.dir, 'local', 'local-attestor.key.json'), audience: control.broker.issuer } },
            }
          : {}),
        control: { url: control.url, token_secret: 'CONTROL', stale_after_ms: 400, backoff_min_ms: 20, backoff_max_ms: 200, state_file: stateFile, ...extra },
      },
      credentials: [
        ...(control.broker ? [{ id: 'api', audience: apis.minted.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }] : []),
        { id: 'vault', audience: apis.static.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
      ],
    },
    { LATCHKEY_SECRET_CONTROL: CONTROL_TOKEN },
  )
}

async function openPersistTask(s: TestSidecar): Promise<string> {
  return (await openTask(s, 'persist test', 200)).handle
}

function stored(path: string): { revocations: { kind: string; value: string; created_at: number }[]; snapshot_at: string | null } {
  return JSON.parse(readFileSync(path, 'utf8')) as { revocations: { kind: string; value: string; created_at: number }[]; snapshot_at: string | null }
}

t.test('revoked, broker stopped, sidecar restarted: the revoked agent stays refused (static and minted), the other is served', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-persist-'))
  const broker = await startControlBroker()
  let brokerUp = true
  t.teardown(() => (brokerUp ? broker.close() : undefined))
  const minted = await startApi()
  t.teardown(minted.close)
  const stat = await startApi()
  t.teardown(stat.close)
  const apis = { minted, static: stat }
  const victimAgent = 'agent:summarizer:prod:victim'
  const bystanderAgent = 'agent:summarizer:prod:bystander'
  const victimFile = join(dir, 'victim.json')
  const bystanderFile = join(dir, 'bystander.json')
  const control = { url: broker.controlUrl, broker }

  let victim = await sidecar(control, apis, victimAgent, victimFile)
  const first = [victim]
  t.teardown(() => Promise.all(first.map((s) => s.close())))
  let bystander = await sidecar(control, apis, bystanderAgent, bystanderFile)
  first.push(bystander)
  await until('connected', () => victim.sidecar.control!.connected && bystander.sidecar.control!.connected)
  const vh = await openPersistTask(victim)
  t.equal((await viaProxy(victim, vh, `${stat.origin}/before`)).status, 200, 'static call served before the revoke')
  t.equal((await viaProxy(victim, vh, `${minted.origin}/before`)).status, 200, 'minted call served before the revoke')

  t.equal((await revoke(broker, 'agent', victimAgent)).status, 201)
  await until('victim refused', () => victim.sidecar.control!.state.agentRevoked)
  t.equal((await viaProxy(victim, vh, `${stat.origin}/revoked`)).status, 403)
  await until('both state files hold the revocation', () =>
    [victimFile, bystanderFile].every((f) => existsSync(f) && stored(f).revocations.some((r) => r.kind === 'agent' && r.value === victimAgent)),
  )
  t.equal(statSync(victimFile).mode & 0o777, 0o600, 'the state file is 0600')
  t.ok(stored(victimFile).snapshot_at, 'it records when the last snapshot came')

  await broker.close()
  brokerUp = false
  await victim.close()
  await bystander.close()

  victim = await sidecar(control, apis, victimAgent, victimFile)
  t.teardown(() => victim.close())
  bystander = await sidecar(control, apis, bystanderAgent, bystanderFile)
  t.teardown(() => bystander.close())
  t.ok(victim.sidecar.control!.state.agentRevoked, 'revoked from the first moment, with the broker down')
  t.match(victim.logs.join(''), /revocations loaded from the state file: this agent is revoked/)

  const check = async (when: string) => {
    // The revoked agent opens no task, and its calls without one are refused as revoked.
    await t.rejects(openPersistTask(victim), /task not opened: 403/, `${when}: the revoked agent opens no task`)
    const s = await viaProxy(victim, null, `${stat.origin}/after-${when}`)
    t.equal(s.status, 403, `${when}: the revoked agent's static-secret call is refused`)
    t.match(s.body, { code: 'LK_REVOKED', rule: 'revocation:agent' })
    const m = await viaProxy(victim, null, `${minted.origin}/after-${when}`)
    t.equal(m.status, 403, `${when}: and its minted-token call`)
    t.match(m.body, { code: 'LK_REVOKED' })
    const bh = await openPersistTask(bystander)
    const b = await viaProxy(bystander, bh, `${stat.origin}/after-${when}`)
    t.equal(b.status, 200, `${when}: the other agent's static-secret call is served`)
    t.equal(b.body.bearer, true, 'with its secret injected')
  }
  const statTokensBefore = stat.tokens.length
  await check('restart')
  await until('the control stream is stale', () => victim.sidecar.control!.staleReason() !== null && bystander.sidecar.control!.staleReason() !== null)
  await check('stale')
  t.equal(stat.tokens.length, statTokensBefore + 2, 'only the bystander reached the static upstream')
  t.ok(stat.tokens.every((tok) => tok === CANARY))

  // Still on disk across a second restart with nothing heard in between.
  await victim.close()
  t.ok(stored(victimFile).revocations.some((r) => r.value === victimAgent), 'shutdown keeps the file')
})

t.test('a fresh snapshot replaces what was loaded: an unrevoke made while the sidecar was down lifts it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-persist-'))
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const minted = await startApi()
  t.teardown(minted.close)
  const stat = await startApi()
  t.teardown(stat.close)
  const agent = 'agent:persist:dev:lifted'
  const file = join(dir, 'state.json')
  // What an earlier run left: this agent revoked.
  writeFileSync(file, JSON.stringify({ format: STATE_FORMAT, version: 1, agent_id: agent, saved_at: new Date().toISOString(), snapshot_at: null, revocations: [{ kind: 'agent', value: agent, created_at: Date.now() }] }), { mode: 0o600 })
  const s = await sidecar({ url: broker.controlUrl, broker }, { minted, static: stat }, agent, file)
  t.teardown(() => s.close())
  await until('the snapshot arrived', () => s.sidecar.control!.connected)
  t.notOk(s.sidecar.control!.state.agentRevoked, 'the broker does not revoke it: lifted')
  const h = await openPersistTask(s)
  t.equal((await viaProxy(s, h, `${stat.origin}/x`)).status, 200)
  await until('the file follows', () => !stored(file).revocations.some((r) => r.value === agent))
})

t.test('a corrupt, unreadable or unwritable state file stops start-up with a clear reason', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-persist-'))
  const minted = await startApi()
  t.teardown(minted.close)
  const stat = await startApi()
  t.teardown(stat.close)
  const control = { url: `grpc://127.0.0.1:${await freePort()}` }
  const apis = { minted, static: stat }

  const corrupt = join(dir, 'corrupt.json')
  writeFileSync(corrupt, '{"format": "latchkey-sidecar-revocations", "version": 1, "revocations": [{"kind": "agent", "va')
  await t.rejects(sidecar(control, apis, 'agent:persist:dev:a', corrupt), { code: 'LK_STARTUP', message: /state_file .*corrupt\.json: not a usable revocation state file \(invalid JSON.*Delete the file/ })
  t.equal(readFileSync(corrupt, 'utf8').length > 0, true, 'the file is left as it was')

  const foreign = join(dir, 'foreign.json')
  writeFileSync(foreign, JSON.stringify({ format: STATE_FORMAT, version: 1, revocations: [{ kind: 'user', value: 'x', created_at: 1 }] }))
  await t.rejects(sidecar(control, apis, 'agent:persist:dev:a', foreign), { code: 'LK_STARTUP', message: /revocations\[0\] is not/ })

  const truncated = join(dir, 'empty.json')
  writeFileSync(truncated, '')
  await t.rejects(sidecar(control, apis, 'agent:persist:dev:a', truncated), { code: 'LK_STARTUP', message: /not a usable revocation state file/ })

  const aDir = join(dir, 'a-directory')
  mkdirSync(aDir)
  await t.rejects(sidecar(control, apis, 'agent:persist:dev:a', aDir), { code: 'LK_STARTUP', message: /a-directory: cannot read \(EISDIR\)/ })

  await t.rejects(sidecar(control, apis, 'agent:persist:dev:a', join(dir, 'no-such-dir', 'state.json')), { code: 'LK_STARTUP', message: /cannot write \(ENOENT\); revocations would not survive a restart/ })

  // No file at all (first start): starts, says it knows nothing yet, and writes one.
  const fresh = join(dir, 'fresh.json')
  const s = await sidecar(control, apis, 'agent:persist:dev:a', fresh)
  t.teardown(() => s.close())
  t.match(s.logs.join(''), /no revocation state file: no revocation is known until the broker's first snapshot/)
  t.same(stored(fresh).revocations, [])
  t.equal(stored(fresh).snapshot_at, null)
})

t.test('entries past the broker\'s retention are dropped at load; agent revocations never expire', async (t) => {
  t.same(RETENTION_MS, REVOCATION_RETENTION_MS, 'the sidecar prunes with the broker\'s retention')
  const dir = mkdtempSync(join(tmpdir(), 'lk-persist-'))
  const minted = await startApi()
  t.teardown(minted.close)
  const stat = await startApi()
  t.teardown(stat.close)
  const now = Date.now()
  const file = join(dir, 'state.json')
  const revocations = [
    { kind: 'agent', value: 'agent:old:dev:1', created_at: now - 400 * DAY },
    { kind: 'agent', value: 'agent:coder:*:*', created_at: 0 },
    { kind: 'jti', value: 'jti-expired', created_at: now - REVOCATION_RETENTION_MS.jti - 60_000 },
    { kind: 'jti', value: 'jti-live', created_at: now - REVOCATION_RETENTION_MS.jti + 60_000 },
    { kind: 'task', value: 'task-expired', created_at: now - REVOCATION_RETENTION_MS.task - 60_000 },
    { kind: 'task', value: 'task-live', created_at: now - 2 * DAY },
    { kind: 'task', value: 'task-undated', created_at: 0 },
  ]
  writeFileSync(file, JSON.stringify({ format: STATE_FORMAT, version: 1, agent_id: 'x', saved_at: new Date(now).toISOString(), snapshot_at: new Date(now - DAY).toISOString(), revocations }))
  chmodSync(file, 0o644)
  const s = await sidecar({ url: `grpc://127.0.0.1:${await freePort()}` }, { minted, static: stat }, 'agent:persist:dev:keep', file)
  t.teardown(() => s.close())
  const st = s.sidecar.control!.state
  t.ok(st.has('agent', 'agent:old:dev:1'))
  t.ok(st.has('agent', 'agent:coder:*:*'))
  t.ok(st.has('jti', 'jti-live'))
  t.ok(st.has('task', 'task-live'))
  t.ok(st.has('task', 'task-undated'), 'an entry of unknown age is kept')
  t.notOk(st.has('jti', 'jti-expired'))
  t.notOk(st.has('task', 'task-expired'))
  t.notOk(st.agentRevoked, 'none of them is this agent')
  t.match(s.logs.join(''), /"expired_dropped":2/)
  t.same(stored(file).revocations.map((r) => r.value).sort(), ['agent:coder:*:*', 'agent:old:dev:1', 'jti-live', 'task-live', 'task-undated'], 'the file is rewritten without them')
  t.equal(statSync(file).mode & 0o777, 0o600, 'and is 0600 again')
  t.equal(stored(file).snapshot_at, new Date(now - DAY).toISOString(), 'the last snapshot time is kept')
})

t.test('a burst of changes is a couple of writes, not one per change', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-persist-'))
  const path = join(dir, 'burst.json')
  const entries: { kind: 'jti'; value: string; createdAt: number }[] = []
  let writes = 0
  const log = createLogger('error', 'test', new Writable({ write: (_c, _e, cb) => cb() }))
  const w = new StateFileWriter(path, () => entries, { agentId: 'agent:a:b:c', log, now: Date.now, delayMs: 20, onWrite: (o) => o === 'ok' && writes++ })
  for (let i = 0; i < 5000; i++) {
    entries.push({ kind: 'jti', value: `j${i}`, createdAt: Date.now() })
    w.schedule()
    if (i % 1000 === 0) await new Promise((r) => setImmediate(r))
  }
  await until('written', () => existsSync(path) && stored(path).revocations.length === 5000)
  await w.close()
  t.ok(writes >= 1 && writes <= 3, `5000 changes, ${writes} writes`)
})

t.test('the default state file sits beside the audit state', async (t) => {
  const base = { version: 1, sidecar: { agent_id: 'agent:a:b:c', control: { url: 'grpc://broker:15004', token_secret: 'CONTROL', tls: { ca_file: '/etc/latchkey/broker-ca.pem' } } } }
  t.equal(defaultStateFile(validateConfig({ ...base, audit: { jsonl: { path: '/var/lib/latchkey/audit.jsonl' } } })), '/var/lib/latchkey/audit.revocations.json')
  t.equal(defaultStateFile(validateConfig(base)), 'latchkey-audit.revocations.json')
  t.equal(defaultStateFile(validateConfig({ ...base, audit: { collector: { address: 'c:1', insecure_plaintext: true, sidecar_id: 's1', token_secret: 'T', spool_dir: '/var/lib/latchkey/spool/' } } })), '/var/lib/latchkey/spool.revocations.json')
})
