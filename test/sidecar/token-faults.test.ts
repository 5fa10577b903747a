// The credential lifecycle's fault table. Each fault ends in a clear response to the agent and
// an audit event, and never in a forward without a valid token: the API counts what reached it.
import t from 'tap'
import { createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net'
import { createServer as createHttpServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { mkdtempSync, writeFileSync, renameSync, readFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client, Pool } from 'undici'
import { startTestBroker, API, freePort } from '../helpers/broker.js'
import { startBrokerFront } from '../helpers/broker-front.js'
import { startTokenRig, AGENT } from '../helpers/tokens.js'
import { BrokerClient } from '../../proxy/credentials/broker-client.js'
import { BrokerTokenSource, FAILURE_HOLD_MS } from '../../proxy/credentials/broker-source.js'
import { LocalKeyEvidence } from '../../proxy/attest/local-key.js'
import { KubernetesTokenFile } from '../../proxy/attest/kubernetes-token.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { TaskRegistry } from '../../proxy/tasks/registry.js'
import { startTestSidecar, startUpstream, loopbackPolicy, assertNoCanary, CANARY } from '../helpers/harness.js'
import { SPELLINGS, holds } from '../helpers/spellings.js'
import { TOKEN_TYPES } from '../../lib/oauth.js'

async function call(proxyUrl: string, url: string): Promise<{ status: number; body: Record<string, unknown>; headers: Record<string, unknown> }> {
  const u = new URL(proxyUrl)
  const auth = u.password ? `Basic ${Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')}` : undefined
  // Absolute-form straight to the proxy, as HTTP_PROXY clients send it (undici's ProxyAgent
  // turns a 407 into an exception, and the 407 is what some of these tests look at).
  const client = new Client(`${u.protocol}//${u.host}`)
  const res = await client.request({ method: 'GET', path: url, headers: { host: new URL(url).host, ...(auth ? { 'proxy-authorization': auth } : {}) } })
  const text = await res.body.text()
  await client.close()
  let body: Record<string, unknown> = {}
  try {
    body = JSON.parse(text) as Record<string, unknown>
  } catch {
    body = { text }
  }
  return { status: res.statusCode, body, headers: res.headers }
}

/** A TCP server that accepts and never answers: a broker that hangs (a fault no real broker can be made to show on demand). */
async function hangingServer(): Promise<{ url: string; close(): Promise<void> }> {
  const sockets = new Set<Socket>()
  const srv: NetServer = createNetServer((s) => {
    sockets.add(s)
    s.on('error', () => {})
  })
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  return {
    url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`,
    close: () => new Promise<void>((r) => { for (const s of sockets) s.destroy(); srv.close(() => r()) }),
  }
}

t.test('broker down: 503 that says why, audited, nothing forwarded', async (t) => {
  const broker = await startTestBroker()
  const rig = await startTokenRig({ broker, brokerUrl: `http://127.0.0.1:${await freePort()}` })
  t.teardown(rig.close)
  // A task for a user cannot open: its token is the broker's to verify first.
  const forUser = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: await broker.userToken('u', 'read') })
  t.equal(forUser.status, 503)
  t.match(forUser.body, { error: 'broker_unavailable', reason: /broker unreachable/, retryable: true }, 'a broker that is down passes: worth repeating')
  const task = await rig.openTask({ purpose: 'x', duration_s: 60 })
  const res = await call(task.body.proxy_url as string, `${rig.api.origin}/a`)
  t.equal(res.status, 503)
  t.match(res.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', retryable: true, reason: /broker unreachable \(ECONNREFUSED\)/ })
  t.equal(rig.api.seen.length, 0, 'no unauthenticated forward')
  const audit = await rig.sidecar.audit()
  t.match(audit.at(-1), { status: 503, error: 'LK_CREDENTIAL_UNAVAILABLE', task: task.body.id })
  // A burst against a dead broker does not hammer it: one failed exchange answers the calls
  // within its hold (FAILURE_HOLD_MS), so a slow host's longer burst may see one more per hold.
  const before = rig.sidecar.sidecar.brokerTokens!.exchanges
  const started = performance.now()
  const burst = await Promise.all(Array.from({ length: 50 }, () => call(task.body.proxy_url as string, `${rig.api.origin}/b`)))
  const windows = 1 + Math.ceil((performance.now() - started) / FAILURE_HOLD_MS)
  t.ok(burst.every((r) => r.status === 503), 'all refused')
  const attempts = rig.sidecar.sidecar.brokerTokens!.exchanges - before
  t.ok(attempts <= Math.min(windows, 25), `a 50-request burst caused ${attempts} exchange attempt(s) over ${windows} failure holds`)
})

t.test('broker hangs: the timeout answers, not the agent\'s patience', async (t) => {
  const hang = await hangingServer()
  const rig = await startTokenRig({ brokerUrl: hang.url, sidecar: { sidecar: { broker: { timeout_ms: 300 } } } })
  t.teardown(async () => {
    await rig.close()
    await hang.close()
  })
  const task = await rig.openTask({ purpose: 'x', duration_s: 60 })
  const started = Date.now()
  const res = await call(task.body.proxy_url as string, `${rig.api.origin}/a`)
  t.equal(res.status, 503)
  t.match(res.body.reason, /broker did not answer within 300 ms/)
  t.ok(Date.now() - started < 2000, 'answered promptly')
  t.equal(rig.api.seen.length, 0)
  const opened = await rig.openTask({ purpose: 'y', duration_s: 60, audiences: [API] })
  t.equal(opened.status, 503, 'opening a task that wants tokens reports the outage')
  t.match(opened.body, { error: 'broker_unavailable', reason: /did not answer/ })
})

t.test('broker errors: a 500 and a refusal each say so', async (t) => {
  const srv = createHttpServer((req, res) => {
    req.resume()
    res.writeHead(500, { 'content-type': 'text/html' }).end('<h1>oops</h1>')
  })
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const rig = await startTokenRig({ brokerUrl: `http://127.0.0.1:${(srv.address() as AddressInfo).port}` })
  t.teardown(async () => {
    await rig.close()
    srv.close()
  })
  const task = await rig.openTask({ purpose: 'x', duration_s: 60 })
  const res = await call(task.body.proxy_url as string, `${rig.api.origin}/a`)
  t.equal(res.status, 503)
  t.match(res.body.reason, /broker answered 500 without a JSON body/)

  // A real refusal: the agent is revoked at the broker.
  const rig2 = await startTokenRig()
  t.teardown(rig2.close)
  await rig2.broker.broker.revocations.revoke('agent', AGENT, 'drill')
  const task2 = await rig2.openTask({ purpose: 'x', duration_s: 60 })
  const refused = await call(task2.body.proxy_url as string, `${rig2.api.origin}/a`)
  t.equal(refused.status, 403, 'a refusal is not worth retrying, and says so')
  t.match(refused.body, { code: 'LK_CREDENTIAL_REFUSED', retryable: false })
  t.match(refused.body.reason, new RegExp(`broker refused the exchange \\(400 invalid_request: agent ${AGENT} is revoked\\)`))
  t.equal(rig2.api.seen.length, 0)
})

t.test('a user token the broker refuses: at task open, and at first use', async (t) => {
  const rig = await startTokenRig()
  t.teardown(rig.close)
  const expired = await rig.broker.userToken('u', 'read', { exp: Math.floor(Date.now() / 1000) - 120 })
  const opened = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: expired, audiences: [API] })
  t.equal(opened.status, 403)
  t.match(opened.body, { error: 'task_refused', reason: /subject_token: expired/ })
  t.notOk(JSON.stringify(opened.body).includes(expired.split('.')[2]!), 'the refusal does not echo the token')
  // With no audience named, the broker still verifies the token before the task opens.
  const unnamed = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: await rig.broker.userToken('u', 'admin') })
  t.equal(unnamed.status, 403)
  t.match(unnamed.body, { error: 'task_refused', reason: /invalid_scope/ })
  // A forged token (no signature) claiming a user: no task is recorded as acting for them.
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const forged = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: `${b64({ alg: 'none' })}.${b64({ sub: 'alice@example.com' })}.AAAA` })
  t.equal(forged.status, 403)
  t.match(forged.body, { error: 'task_refused' })
  // Unsigned outright (no third segment): not a JWS the broker takes, refused before it is asked.
  const unsigned = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: `${b64({ alg: 'none' })}.${b64({ sub: 'alice@example.com' })}.` })
  t.same([unsigned.status, unsigned.body.error], [400, 'bad_request'])
  t.equal(rig.sidecar.sidecar.tasks.size, 0, 'neither task stayed open')
  // Nor logged as opened (and ended) for the user it claimed: the broker never took it.
  t.notOk(rig.sidecar.logs.some((l) => l.includes('alice@example.com')), 'no log line names the user a forged token claims')
  t.notOk(rig.sidecar.logs.some((l) => /"msg":"task (opened|ended)"/.test(l)), 'no task refused as it opened is logged as opened or ended')
  // A token the broker accepts opens; a refusal at first use (a task longer than the agent may
  // have, here) is a 403 the agent is told not to retry.
  const ok = await rig.openTask({ purpose: 'x', duration_s: 60, user_token: await rig.broker.userToken('u', 'read') })
  t.equal(ok.status, 201)
  t.equal(ok.body.user, 'u')
  t.ok(rig.sidecar.logs.some((l) => l.includes('"msg":"task opened"') && l.includes('"user":"u"')), 'the task the broker took is logged as opened, for its user')
  t.equal(rig.api.seen.length, 0)
})

t.test('a handle from another task or another sidecar is a 407', async (t) => {
  const broker = await startTestBroker()
  const a = await startTokenRig({ broker })
  const b = await startTokenRig({ broker })
  t.teardown(async () => {
    await b.sidecar.close()
    await b.api.close()
    await a.close()
  })
  const taskB = await b.openTask({ purpose: 'x', duration_s: 60 })
  const onA = (taskB.body.proxy_url as string).replace(b.sidecar.proxy.slice(7), a.sidecar.proxy.slice(7))
  const res = await call(onA, `${a.api.origin}/a`)
  t.equal(res.status, 407)
  t.equal(res.headers['proxy-authenticate'], 'Basic realm="latchkey"')
  t.match(res.body.reason, /no open task/)
  const none = await call(a.sidecar.proxy, `${a.api.origin}/a`)
  t.equal(none.status, 407, 'no task at all, on a task-scoped credential')
  t.match(none.body.reason, /task-scoped/)
  const bad = await call(`http://task:${'lkt_' + 'A'.repeat(22)}@${a.sidecar.proxy.slice(7)}`, `${a.api.origin}/a`)
  t.equal(bad.status, 407)
  t.equal(a.api.seen.length, 0)
})

t.test('1,000 concurrent first requests for one audience cause exactly one exchange', async (t) => {
  const rig = await startTokenRig()
  t.teardown(rig.close)
  const task = await rig.openTask({ purpose: 'burst', duration_s: 60, user_token: await rig.broker.userToken('u', 'read') })
  const u = new URL(task.body.proxy_url as string)
  const pool = new Pool(rig.sidecar.proxy, { connections: 100 })
  t.teardown(() => pool.close())
  const auth = `Basic ${Buffer.from(`task:${u.password}`).toString('base64')}`
  const statuses = await Promise.all(
    Array.from({ length: 1000 }, (_, i) =>
      pool.request({ method: 'GET', path: `${rig.api.origin}/burst/${i}`, headers: { 'proxy-authorization': auth, host: `127.0.0.1:${rig.api.port}` } }).then(async (r) => {
        await r.body.text()
        return r.statusCode
      }),
    ),
  )
  t.equal(statuses.filter((s) => s === 200).length, 1000, 'all 1,000 succeed')
  t.equal(rig.broker.events.filter((e) => e.type === 'token.exchange').length, 1, 'the broker saw exactly one exchange')
  t.equal(new Set(rig.api.tokens).size, 1, 'all carried the same token')

  // The same at the source, all in one tick, so every call finds the exchange in flight.
  const src = rig.sidecar.sidecar.brokerTokens!
  const before = src.exchanges
  const task2 = rig.sidecar.sidecar.tasks.open({ purpose: 'tick', durationS: 60 })
  const binding = compileBinding({ id: 'api', audience: rig.api.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } })
  const creds = await Promise.all(Array.from({ length: 1000 }, () => src.get(binding, task2.identity)))
  t.equal(src.exchanges - before, 1, 'one exchange for 1,000 same-tick requests')
  t.equal(new Set(creds.map((c) => c.id)).size, 1)
})

t.test('refresh at half-life, never a stale token, clock skew harmless (fake clock)', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  // The sidecar's clock runs 10 minutes ahead of the broker's: lifetimes come from expires_in.
  let clock = Date.now() + 600_000
  const now = () => clock
  const src = new BrokerTokenSource(new BrokerClient(broker.url, 2000, new LocalKeyEvidence(join(broker.dir, 'local', 'local-attestor.key.json'), AGENT, broker.issuer)), { minRemainingMs: 5000, now })
  t.teardown(() => src.close())
  const tasks = new TaskRegistry(AGENT, { maxDurationS: 3600, now })
  const task = tasks.open({ purpose: 'p', durationS: 100, userToken: await broker.userToken('u', 'read') })
  const binding = compileBinding({ id: 'api', audience: 'https://api.example.com', source: 'broker', scopes: ['read'], inject: { type: 'bearer' } })
  const first = await src.get(binding, task.identity)
  t.equal(first.expiresAt! - clock, 120_000, 'lifetime 100 s × 1.2, on the sidecar\'s own clock')
  t.equal((await src.get(binding, task.identity)).id, first.id, 'cached despite the skew')
  t.equal(src.exchanges, 1)

  clock += 59_000
  t.equal((src.get(binding, task.identity) as { id: string }).id, first.id, 'before half-life: cached, no refresh')
  t.equal(src.exchanges, 1)
  clock += 2_000
  const during = src.get(binding, task.identity) as { id: string }
  t.equal(during.id, first.id, 'at half-life the current token still serves while the refresh runs')
  t.equal(src.exchanges, 2, 'one background refresh')
  await new Promise((r) => setTimeout(r, 200))
  const refreshed = await src.get(binding, task.identity)
  t.not(refreshed.id, first.id, 'then the refreshed token is used')

  // Broker gone and the token near its end: it is not used in its last min_remaining_ms.
  await broker.close()
  clock = refreshed.expiresAt! - 4_000
  await t.rejects(Promise.resolve().then(() => src.get(binding, task.identity)), { code: 'LK_CREDENTIAL_UNAVAILABLE' }, 'a token with 4 s left (< 5 s) is never injected')

  // Ending the task drops the tokens.
  tasks.onEnd((x) => src.dropTask(x.id))
  tasks.end(task.handle)
  t.same(src.describe(task.id), [])
})

t.test('a lifetime counts from the exchange\'s start; a token too short to use is a failed exchange (fake clock)', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const front = await startBrokerFront(broker.url)
  t.teardown(front.close)
  let clock = Date.now()
  const now = () => clock
  // Each exchange's landing, and each failed refresh's reason, as the source reports them.
  let landed: () => void = () => {}
  const refreshFailures: string[] = []
  const src = new BrokerTokenSource(new BrokerClient(front.url, 2000, new LocalKeyEvidence(join(broker.dir, 'local', 'local-attestor.key.json'), AGENT, broker.issuer)), {
    minRemainingMs: 1000,
    now,
    onExchange: () => landed(),
    onRefreshFailed: (reason) => refreshFailures.push(reason),
  })
  t.teardown(() => src.close())
  const task = new TaskRegistry(AGENT, { maxDurationS: 3600, now }).open({ purpose: 'slow', durationS: 100 })
  const binding = compileBinding({ id: 'api', audience: 'https://api.example.com', source: 'broker', scopes: ['read'], inject: { type: 'bearer' } })
  front.mode = { mode: 'hold' }
  const start = clock
  const pending = Promise.resolve(src.get(binding, task.identity))
  await front.handled(1)
  clock += 4000
  front.release()
  const late = await pending
  t.equal(late.expiresAt! - start, 120_000, 'expires 120 s (its expires_in) after the exchange began, not after the answer came')

  // The broker answers the refresh at half-life with a token of 1 s: none of it is usable.
  front.mode = { mode: 'patch', patch: { expires_in: 1 } }
  clock = start + 61_000
  const before = front.requests
  const refreshed = new Promise<void>((resolve) => (landed = resolve))
  t.equal((src.get(binding, task.identity) as { id: string }).id, late.id, 'at half-life the current token serves')
  await refreshed
  await new Promise((r) => setImmediate(r))
  t.match(refreshFailures, [/expires within 1000 ms/], 'the refresh is said to have failed')
  t.equal((src.get(binding, task.identity) as { id: string }).id, late.id, 'and still does once the refresh brought a token too short to use')
  clock = start + 119_500
  for (let i = 0; i < 5; i++) {
    await t.rejects(Promise.resolve().then(() => src.get(binding, task.identity)), { code: 'LK_CREDENTIAL_UNAVAILABLE', message: /expires within 1000 ms/ }, 'not injected within min_remaining_ms of its real expiry')
  }
  t.equal(front.requests - before, 2, 'five calls past it: one exchange, its failure held for the rest')
})

t.test('a rotated service-account token file is re-read', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const dir = mkdtempSync(join(tmpdir(), 'lk-sa-'))
  const file = join(dir, 'token')
  const mint = (pod: string, times: { iat?: number; exp?: number } = {}) =>
    broker.k8s.sign({ aud: broker.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name: pod, uid: pod } }, ...times })
  writeFileSync(file, await mint('pod-a'))
  let clock = Date.now()
  const ev = new KubernetesTokenFile(file, { now: () => clock })
  const src = new BrokerTokenSource(new BrokerClient(broker.url, 2000, ev), { minRemainingMs: 1000 })
  t.teardown(() => src.close())
  // Each pod's sidecar names the agent its token attests (a token for another agent is refused).
  const podA = new TaskRegistry('agent:summarizer-k8s:prod:pod-a', { maxDurationS: 3600 })
  const podB = new TaskRegistry('agent:summarizer-k8s:prod:pod-b', { maxDurationS: 3600 })
  const binding = compileBinding({ id: 'api', audience: 'https://api.example.com', source: 'broker', inject: { type: 'bearer' } })
  await src.get(binding, podA.open({ purpose: 'a', durationS: 60 }).identity)
  // The kubelet's atomic replace.
  writeFileSync(join(dir, 'token.new'), await mint('pod-b'))
  renameSync(join(dir, 'token.new'), file)
  await src.get(binding, podB.open({ purpose: 'b', durationS: 60 }).identity)
  const agents = broker.events.filter((e) => e.type === 'token.exchange').map((e) => (e as { agent: string }).agent)
  t.same(agents, ['agent:summarizer-k8s:prod:pod-a', 'agent:summarizer-k8s:prod:pod-b'], 'the new token was presented after rotation')

  // Not replaced in time: an expired token is not presented. The broker would refuse it (400), a
  // 403 to the agent, not retryable, naming no file; it is a 503 naming the file.
  const expired = new RegExp(`service-account token file ${file}: the token in it expired \\d+ s ago and has not been replaced`)
  clock += 301_000
  await t.rejects(ev.get(), expired, 'the token read earlier, once its exp passes')
  clock = Date.now()
  const nowS = Math.floor(clock / 1000)
  writeFileSync(file, await mint('pod-c', { iat: nowS - 400, exp: nowS - 100 }))
  const podC = new TaskRegistry('agent:summarizer-k8s:prod:pod-c', { maxDurationS: 3600 })
  await t.rejects(Promise.resolve().then(() => src.get(binding, podC.open({ purpose: 'c', durationS: 60 }).identity)), { code: 'LK_CREDENTIAL_UNAVAILABLE', message: expired }, 'a file holding an expired one')
  t.equal(broker.events.filter((e) => e.type === 'token.exchange').length, 2, 'neither was presented to the broker')
  writeFileSync(file, 'not a token')
  await t.rejects(ev.get(), /does not hold a JWT/)
})

t.test('a broker that echoes the tokens it was sent: the agent, the audit and the log get none of them, in any spelling', async (t) => {
  // The sidecar sends the broker secrets: the workload's evidence (here a service-account token)
  // and a task's user token. A hostile or sloppy broker quotes them back; each spelling of each,
  // in a refusal's error_description or error, or in a 200's scope, aud, act.sub or jti.
  const dir = mkdtempSync(join(tmpdir(), 'lk-echo-'))
  const evidence = `e30.e30.${CANARY}`
  writeFileSync(join(dir, 'token'), evidence)
  const userToken = `e30.e30.${CANARY} +`
  let answer: (form: URLSearchParams) => { status: number; body: unknown } = () => ({ status: 500, body: {} })
  const forms: URLSearchParams[] = []
  const srv = createHttpServer((req, res) => {
    let raw = ''
    req.on('data', (c: Buffer) => (raw += c.toString()))
    req.on('end', () => {
      const form = new URLSearchParams(raw)
      forms.push(form)
      const out = answer(form)
      res.writeHead(out.status, { 'content-type': 'application/json' }).end(JSON.stringify(out.body))
    })
  })
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const up = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    sidecar: { agent_id: AGENT, broker: { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`, timeout_ms: 1000 }, attestation: { kubernetes: { token_file: join(dir, 'token') } } },
    credentials: [{ id: 'api', audience: up.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
    await new Promise<void>((r) => srv.close(() => r()))
  })
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const jwt = (claims: Record<string, unknown>) => `${b64({ alg: 'none' })}.${b64({ exp: Math.floor(Date.now() / 1000) + 600, ...claims })}.`
  const granted = (body: Record<string, unknown>) => ({ status: 200, body: { token_type: 'Bearer', issued_token_type: TOKEN_TYPES.accessToken, expires_in: 600, ...body } })
  const withheld = /broker refused the exchange \(40[01]; its error text quoted a credential the sidecar sent and is not repeated\)/
  const notRepeated = (before: string) => new RegExp(`${before} \\(not repeated: it quotes a credential the sidecar sent\\)`)
  const pad = 'x'.repeat(280)
  /** Where the echo goes, and what a sidecar quoting it would show (each field is cut: 300, 64, 128, 256 characters). */
  const places: [string, (quoted: string) => { status: number; body: unknown }, (quoted: string) => string, RegExp][] = [
    ['error_description', (q) => ({ status: 400, body: { error: 'invalid_request', error_description: q } }), (q) => q.slice(0, 300), withheld],
    ['error_description, across the cut', (q) => ({ status: 400, body: { error: 'invalid_request', error_description: pad + q } }), (q) => (pad + q).slice(0, 300), withheld],
    ['error', (q) => ({ status: 401, body: { error: q } }), (q) => q.slice(0, 64), withheld],
    ['scope', (q) => granted({ access_token: jwt({ aud: API, act: { sub: AGENT } }), scope: `read ${q}` }), (q) => q.split(' ')[0]!.slice(0, 64), notRepeated('broker granted scope')],
    ['aud', (q) => granted({ access_token: jwt({ aud: q, act: { sub: AGENT } }) }), (q) => q.slice(0, 128), notRepeated('another audience \\(aud')],
    ['act.sub', (q) => granted({ access_token: jwt({ aud: API, act: { sub: q } }) }), (q) => q.slice(0, 256), notRepeated('the broker attested agent')],
    ['jti', (q) => granted({ access_token: jwt({ aud: API, act: { sub: AGENT }, jti: q }) }), (q) => q.slice(0, 128), /broker issued a token whose jti is not repeated: it quotes a credential the sidecar sent/],
  ]
  const leaked = (output: string, shown: string) => holds(output, shown) || output.includes(CANARY)
  const auditText = () => (existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : '')
  let rows = 0
  for (const [place, respond, shownOf, said] of places) {
    for (const [name, spell] of Object.entries(SPELLINGS)) {
      for (const sent of ['evidence', 'user token'] as const) {
        const row = `${sent} echoed ${name} in ${place}`
        const secret = sent === 'evidence' ? evidence : userToken
        const quoted = spell(secret)
        answer = () => respond(quoted)
        // Through the proxy: the exchange for the agent's call is refused, and says why.
        const task = s.sidecar.tasks.open({ purpose: row, durationS: 60, userToken: sent === 'user token' ? userToken : null })
        const before = forms.length
        // Only what this row wrote is looked at: a row that leaked must not fail the rows after it.
        await s.sidecar.audit.flush()
        const auditFrom = auditText().length
        const logFrom = s.logs.length
        const res = await call(`http://task:${task.handle}@${s.proxy.slice(7)}`, `${up.origin}/a`)
        t.equal(forms.at(-1)?.get('subject_token'), secret, `${row}: the broker was sent it`)
        t.equal(forms.length, before + 1, `${row}: one exchange`)
        t.ok(res.status === 403 || res.status === 503, `${row}: refused (${res.status})`)
        t.match(res.body.reason, said, `${row}: the reason says the text is withheld`)
        const proxied = JSON.stringify(res)
        // Opening a task for the user through the API: this token (its space and `+` are there to
        // be spelled) is no compact JWS, so it is refused before any broker sees it.
        let opened = ''
        if (sent === 'user token') {
          const r = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: row, duration_s: 60, user_token: userToken }) })
          opened = JSON.stringify({ status: r.status, headers: Object.fromEntries(r.headers), body: await r.text() })
          t.equal(r.status, 400, `${row}: the task does not open`)
          t.match(opened, /user_token must be a signed JWT in compact form/, `${row}: and the reason says why`)
        }
        await s.sidecar.audit.flush()
        const shown = shownOf(quoted)
        t.notOk(leaked(proxied, shown) || leaked(opened, shown), `${row}: not in the agent's responses (bodies, headers)`)
        t.notOk(leaked(auditText().slice(auditFrom), shown), `${row}: not in the audit file`)
        t.notOk(s.logs.slice(logFrom).some((l) => leaked(l, shown)), `${row}: not in the log`)
        rows++
      }
    }
  }
  t.equal(rows, places.length * Object.keys(SPELLINGS).length * 2, `${rows} rows`)
  t.equal(up.requests.length, 0, 'no call went out without a token')
  assertNoCanary(t, s)
})
