// Revocation over the control stream, end to end and all real: broker (admin API, control gRPC),
// sidecars connected to it, an upstream API. Revoking one agent drops its tokens, refuses its
// requests with 403 reason "revoked" and cuts its open streams, while the others keep working.
import t from 'tap'
import { credentials, Metadata } from '@grpc/grpc-js'
import { once } from 'node:events'
import { ControlServiceClient } from '../../protos/gen/latchkey/v1/control.js'
import { decodeJwt } from 'jose'
import { delegatedRequest, why } from '../helpers/broker.js'
import { startApi, startControlBroker, startControlSidecar, startRig, viaProxy, openStream, openTunnel, openWebSocket, openRecorded, revoke, until, CONTROL_TOKEN } from './rig.js'
import { framePayloads } from '../helpers/websocket-frames.js'
import { EnvHttpProxyAgent, fetch as undiciFetch } from 'undici'

t.test('revoking one agent: refused at once, tokens gone, streams cut; the other agent untouched', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const victim = await startControlSidecar(broker, api, 'agent:summarizer:prod:victim', { routes: { api: api.origin } })
  t.teardown(victim.close)
  const bystander = await startControlSidecar(broker, api, 'agent:summarizer:prod:bystander')
  t.teardown(bystander.close)
  await until('both sidecars connected', () => victim.sidecar.control!.connected && bystander.sidecar.control!.connected)

  const vt = await victim.openTask()
  const bt = await bystander.openTask()
  t.equal((await viaProxy(victim, vt.handle, `${api.origin}/a`)).status, 200)
  t.equal((await viaProxy(bystander, bt.handle, `${api.origin}/a`)).status, 200)
  t.equal(victim.sidecar.brokerTokens!.describe(vt.id).length, 1, 'the victim holds a token')
  const victimToken = api.tokens[0]!
  const stream = await openStream(victim, vt.handle, `${api.origin}/stream`)
  t.equal(stream.status, 200)
  await until('stream flowing', () => stream.chunks() > 0)
  // A CONNECT tunnel of the same task, open and idle.
  const { tunnel, head } = await openTunnel(victim, vt.handle, api.port)
  t.match(head, /^HTTP\/1\.1 200/, 'tunnel open')
  const tunnelClosed = once(tunnel, 'close')
  // A keep-alive connection of the agent, idle between calls: its one call answered, nothing in flight.
  const idle = openRecorded(t, victim.sidecar.port, `GET ${api.origin}/idle HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\nProxy-Authorization: Bearer ${vt.handle}\r\n\r\n`)
  await until('the keep-alive call answered', () => idle.received().includes('"ok":true'))
  t.match(idle.received(), /^HTTP\/1\.1 200 .*\r\n(?![\s\S]*connection: close)/i, 'and the connection kept open')
  // A plaintext tunnel to the sidecar itself (Node's fetch calling a route), idle after one answer.
  const own = openRecorded(
    t,
    victim.sidecar.port,
    `CONNECT 127.0.0.1:${victim.sidecar.port} HTTP/1.1\r\nHost: 127.0.0.1:${victim.sidecar.port}\r\nProxy-Authorization: Bearer ${vt.handle}\r\n\r\nGET /api/idle HTTP/1.1\r\nHost: 127.0.0.1:${victim.sidecar.port}\r\n\r\n`,
  )
  await until('the call in the tunnel answered', () => own.received().includes('"ok":true'))
  t.notMatch(own.received(), /connection: close/i, 'and the tunnel kept open')

  // A request pipelined behind a streaming response on one connection: queued, never to be sent.
  const auth = `Proxy-Authorization: Bearer ${vt.handle}\r\n`
  const piped = openRecorded(t, victim.sidecar.port, `GET ${api.origin}/stream/piped HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\n${auth}\r\nGET ${api.origin}/queued HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\n${auth}\r\n`)
  await until('the pipelined stream flowing', () => piped.received().startsWith('HTTP/1.1 200'))

  const r = await revoke(broker, 'agent', victim.agent)
  const returned = performance.now()
  t.equal(r.status, 201)
  await until('victim refused', () => victim.sidecar.control!.state.agentRevoked, 2000)
  const refusal = await viaProxy(victim, vt.handle, `${api.origin}/b`)
  const elapsed = performance.now() - returned
  t.equal(refusal.status, 403)
  t.match(refusal.body, { error: 'revoked', code: 'LK_REVOKED', reason: 'revoked', rule: 'revocation:agent', retryable: false })
  t.equal(refusal.headers['x-latchkey-error'], 'LK_REVOKED')
  t.ok(elapsed < 1000, `refused within a second of the revoke returning (${elapsed.toFixed(1)} ms)`)
  t.equal(victim.sidecar.brokerTokens!.size, 0, 'every cached token of the victim is gone')
  t.equal(victim.sidecar.brokerTokens!.describe(vt.id).length, 0)
  t.not(await stream.ended, undefined, 'the streaming response was cut')
  // Recorded as revoked, not as the upstream failure the cut itself caused.
  await until('the cut stream is audited as revoked', async () => (await victim.audit()).some((e) => e.task === vt.id && e.via === 'absolute' && e.status === 200 && e.error === 'LK_REVOKED'))
  // What was queued behind it is recorded as the revocation left it: not sent, under its task.
  await until('the queued request is audited', async () => (await victim.audit()).some((e) => e.path === '/queued'))
  t.match(
    (await victim.audit()).find((e) => e.path === '/queued'),
    { task: vt.id, status: 0, error: 'LK_REVOKED', reason: 'not sent: the connection was cut before its turn (revoked)' },
    'the request queued behind the cut stream: not sent, revoked, in its task',
  )
  t.notOk(api.paths.includes('/queued'), 'and it never reached the API')
  await tunnelClosed
  t.ok(tunnel.destroyed, 'the CONNECT tunnel was closed')
  await until('the idle keep-alive connection closed', () => idle.closed(), 2000).catch(() => {})
  t.ok(idle.closed(), 'the agent\'s idle keep-alive connection was closed too: the sidecar serves it nothing more')
  await until('the idle tunnel to the sidecar closed', () => own.closed(), 2000).catch(() => {})
  t.ok(own.closed(), 'so was its idle plaintext tunnel to the sidecar itself')
  // A new task on the revoked sidecar gets nowhere either: it is refused at opening, with why.
  await t.rejects(victim.openTask(), /task not opened: 403 this agent is revoked \(revocation:agent\)/)
  t.match(await taskState(victim, vt.handle), { status: 200, body: { state: 'revoked', revoked_by: 'revocation:agent' } }, 'and its open task says it is revoked')

  t.equal((await viaProxy(bystander, bt.handle, `${api.origin}/a`)).status, 200, 'the other agent still works')
  t.equal(bystander.sidecar.brokerTokens!.describe(bt.id).length, 1, 'and keeps its token')

  // The broker recorded it and introspection calls the victim's token inactive.
  t.ok(broker.events.some((e) => e.type === 'revocation' && e.value === victim.agent && e.op === 'revoke'), 'revocation event recorded')
  const intro = await fetch(`${broker.url}/oauth2/introspect`, {
    method: 'POST',
    headers: { authorization: 'Basic ' + Buffer.from(`api-server:${broker.introspectionSecret}`).toString('base64') },
    body: new URLSearchParams({ token: victimToken }),
  })
  t.same(await intro.json(), { active: false })
  // Nothing logged by the sidecar or the broker holds a token or the control token.
  const logs = victim.logs.join('') + broker.logs()
  t.notOk(logs.includes(victimToken), 'no access token in logs')
  t.notOk(logs.includes(CONTROL_TOKEN), 'no control token in logs')
  t.match(victim.logs.join(''), /revocation applied/)

  // Unrevoke: the agent works again (a fresh exchange).
  const del = await fetch(`${broker.url}/v1/revocations/agent/${encodeURIComponent(victim.agent)}`, { method: 'DELETE', headers: { authorization: `Bearer ${broker.adminToken}` } })
  t.equal(del.status, 200)
  await until('victim restored', () => !victim.sidecar.control!.state.agentRevoked)
  t.equal((await viaProxy(victim, vt.handle, `${api.origin}/d`)).status, 200)
  t.match(await taskState(victim, vt.handle), { status: 200, body: { state: 'open' } }, 'its task is open again')
  t.ok(await victim.openTask(), 'and it opens tasks again')
})

t.test('task, jti and agent-type pattern revocations; an unknown agent is accepted and harmless', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const a = await startControlSidecar(broker, api, 'agent:summarizer:prod:one')
  t.teardown(a.close)
  const h = await startControlSidecar(broker, api, 'agent:helper:prod:two')
  t.teardown(h.close)
  await until('connected', () => a.sidecar.control!.connected && h.sidecar.control!.connected)
  const t1 = await a.openTask()
  const t2 = await a.openTask()
  const ht = await h.openTask()
  for (const [s, task] of [[a, t1], [a, t2], [h, ht]] as const) t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200)

  // Unknown agent: accepted (201), recorded, nothing else changes.
  const unknown = await revoke(broker, 'agent', 'agent:nobody:prod:ghost')
  t.equal(unknown.status, 201)
  await until('unknown revocation reached the sidecar', () => a.sidecar.control!.state.has('agent', 'agent:nobody:prod:ghost'))
  t.equal((await viaProxy(a, t1.handle, `${api.origin}/x`)).status, 200, 'harmless for everyone else')
  t.ok(broker.events.some((e) => e.type === 'revocation' && e.value === 'agent:nobody:prod:ghost'))

  // One task: that task refused, its tokens gone, its WebSocket cut; the agent's other task (and its WebSocket) works.
  const ws1 = await openWebSocket(a, t1.handle, api)
  const ws2 = await openWebSocket(a, t2.handle, api)
  const ws1Closed = once(ws1, 'close')
  let ws2Closed = false
  ws2.on('close', () => (ws2Closed = true))
  const tokensBefore = a.sidecar.brokerTokens!.size
  // Each task's calls keep their own upstream socket alive (pools are per task); the API asks for 30 s.
  const pooled = (s: typeof a) => s.sidecar.metrics.upstreamCount().pooled
  t.equal(pooled(a), 2, "one idle keep-alive upstream socket for each task's calls")
  t.equal((await revoke(broker, 'task', t1.id)).status, 201)
  await until('task revocation applied', () => a.sidecar.control!.state.has('task', t1.id))
  await until("the revoked task's idle upstream socket closed", () => pooled(a) === 1, 1000).catch(() => {})
  t.equal(pooled(a), 1, "the revoked task's idle upstream socket is closed at the cut, the other task's kept")
  const refused = await viaProxy(a, t1.handle, `${api.origin}/x`)
  t.match(refused, { status: 403, body: { code: 'LK_REVOKED', reason: 'revoked', rule: 'revocation:task' } })
  t.equal(a.sidecar.brokerTokens!.describe(t1.id).length, 0, 'the task\'s token is gone')
  t.equal(a.sidecar.brokerTokens!.size, tokensBefore - 1, 'only that task\'s')
  t.equal((await viaProxy(a, t2.handle, `${api.origin}/x`)).status, 200, 'the other task still works')
  t.match(await taskState(a, t1.handle), { status: 200, body: { id: t1.id, state: 'revoked', revoked_by: 'revocation:task' } }, 'the task API says the task is revoked')
  const other = await taskState(a, t2.handle)
  t.match(other, { status: 200, body: { id: t2.id, state: 'open' } })
  t.notOk('revoked_by' in other.body, 'and the other one open, with no revocation named')
  await ws1Closed
  t.ok(ws1.destroyed, 'the revoked task\'s WebSocket was cut')
  ws2.write('ping')
  const [echo] = (await once(ws2, 'data')) as [Buffer]
  t.equal(framePayloads(echo)[0]?.payload.toString(), 'echo:ping', 'the other task\'s WebSocket still relays')
  t.notOk(ws2Closed)
  ws2.destroy()

  // One jti: that token dropped; the next request gets a new one.
  const jti = a.sidecar.brokerTokens!.describe(t2.id)[0]!.jti
  t.equal((await revoke(broker, 'jti', jti)).status, 201)
  await until('jti dropped', () => a.sidecar.brokerTokens!.describe(t2.id).length === 0)
  t.equal((await viaProxy(a, t2.handle, `${api.origin}/x`)).status, 200)
  t.not(a.sidecar.brokerTokens!.describe(t2.id)[0]?.jti, jti, 'a fresh token, not the revoked one')

  // An agent-type pattern: every helper, no summarizer.
  t.equal((await revoke(broker, 'agent', 'agent:helper:*:*')).status, 201)
  await until('pattern applied', () => h.sidecar.control!.state.agentRevoked)
  await until("the revoked agent's idle upstream socket closed", () => pooled(h) === 0, 1000).catch(() => {})
  t.equal(pooled(h), 0, "a revoked agent's idle upstream sockets are closed at the cut")
  t.equal((await viaProxy(h, ht.handle, `${api.origin}/x`)).status, 403)
  t.equal((await viaProxy(a, t2.handle, `${api.origin}/x`)).status, 200)
  t.notOk(a.sidecar.control!.state.agentRevoked)
  t.match(await taskState(h, ht.handle), { status: 200, body: { state: 'revoked', revoked_by: 'revocation:agent' } }, "a revoked agent's task says so")
  await t.rejects(h.openTask(), /task not opened: 403 this agent is revoked \(revocation:agent\)/, 'a revoked agent opens no new task')
  t.ok(await a.openTask(), 'an agent the pattern does not match still opens tasks')
  // And the broker refuses the helper's exchanges too.
  const ex = await broker.exchange({
    grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
    actor_token: await broker.attest('agent:helper:prod:two'),
    actor_token_type: 'urn:ietf:params:oauth:token-type:jwt',
    audience: 'https://api.example.com',
  })
  t.equal(ex.status, 400, 'the broker refuses an exchange for a pattern-revoked agent')
})

t.test('unauthenticated control streams are refused', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const wrong = await startControlSidecar(broker, api, 'agent:summarizer:prod:wrong', { token: 'not-the-token' })
  t.teardown(wrong.close)
  await until('refusal seen', () => (wrong.sidecar.control!.lastError ?? '').includes('control token does not match'))
  t.notOk(wrong.sidecar.control!.connected)
  t.notOk(wrong.logs.join('').includes('not-the-token'), 'the presented token is not logged')

  // No metadata at all.
  const client = new ControlServiceClient(broker.broker.controlAddress!, credentials.createInsecure())
  t.teardown(() => client.close())
  const err = await new Promise<{ code?: number; details?: string }>((resolve) => {
    const call = client.watch({ agentId: 'x', policyVersion: '' }, new Metadata())
    call.on('data', () => resolve({ details: 'got data' }))
    call.on('error', resolve)
  })
  t.equal(err.code, 16, 'UNAUTHENTICATED')
  t.match(err.details, /missing x-latchkey-sidecar/)
  t.ok(broker.broker.control!.stats.refused >= 2)
})

t.test("revoking a delegation's task or jti stops, within the second, the tasks another sidecar opened with tokens derived from it", async (t) => {
  // The helper is the child: summarizer (may_task: helper) hands it delegations.
  const { broker, api, s: child } = await startRig(t, 'agent:helper:prod:child')
  const user = await broker.userToken('alice', 'read write')
  const delegate = async (root: string, task: string) => {
    const r = await broker.exchange(delegatedRequest(user, await broker.attest(root), { audience: broker.issuer, task_id: task }))
    t.equal(r.status, 200, why(r))
    return r.body.access_token as string
  }
  const openWith = async (token: string | null) => {
    const res = await fetch(`${child.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'delegated', duration_s: 200, ...(token ? { user_token: token } : {}) }) })
    const body = (await res.json()) as Record<string, unknown>
    t.equal(res.status, 201, String(body.reason ?? ''))
    return { handle: body.task as string, id: body.id as string }
  }
  const rootDelegation = await delegate('agent:summarizer:prod:root', 'root-task')
  const otherDelegation = await delegate('agent:summarizer:prod:other', 'other-task')
  const derived = await openWith(rootDelegation)
  const sibling = await openWith(otherDelegation)
  const own = await openWith(null)
  for (const task of [derived, sibling, own]) t.equal((await viaProxy(child, task.handle, `${api.origin}/x`)).status, 200)
  const injected = decodeJwt(api.tokens.at(-3)!)
  t.match(injected, { sub: 'alice', act: { sub: 'agent:helper:prod:child', act: { sub: 'agent:summarizer:prod:root' } }, delegated_from: [{ task_id: 'root-task' }] }, 'the derived task injects a token resting on the root delegation')
  t.equal(child.sidecar.brokerTokens!.describe(derived.id).length, 1, 'and holds it')

  // Streams open on the derived task and on the sibling's, when the root's task is revoked.
  const derivedStream = await openStream(child, derived.handle, `${api.origin}/stream/derived`)
  const siblingStream = await openStream(child, sibling.handle, `${api.origin}/stream/sibling`)
  let siblingEnded = false
  void siblingStream.ended.then(() => (siblingEnded = true))
  await until('both streams flowing', () => derivedStream.chunks() > 0 && siblingStream.chunks() > 0)

  // The root's task: revoked at the broker, never named by the child's own task ID.
  const revokedAt = Date.now()
  t.equal((await revoke(broker, 'task', 'root-task')).status, 201)
  await until('the derived task is refused', async () => (await viaProxy(child, derived.handle, `${api.origin}/x`)).status === 403, 1000)
  t.ok(Date.now() - revokedAt < 1000, `refused ${Date.now() - revokedAt} ms after the revocation`)
  t.match(await viaProxy(child, derived.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED', reason: 'revoked', rule: 'revocation:delegation' } })
  t.equal(child.sidecar.brokerTokens!.describe(derived.id).length, 0, 'its cached token is gone, not kept until it expires')
  t.match(await taskState(child, derived.handle), { status: 200, body: { state: 'revoked', revoked_by: 'revocation:delegation' } }, 'the task API says why')
  for (const task of [sibling, own]) t.equal((await viaProxy(child, task.handle, `${api.origin}/x`)).status, 200, 'a task from another delegation, and one of its own, still work')
  t.not(await derivedStream.ended, undefined, "the derived task's stream was cut")
  await until('the cut stream recorded', async () => (await child.audit()).some((e) => e.path === '/stream/derived'))
  t.match((await child.audit()).find((e) => e.path === '/stream/derived'), { task: derived.id, status: 200, error: 'LK_REVOKED' }, 'recorded as revoked')
  const flowed = siblingStream.chunks()
  await until("the sibling's stream still flowing", () => siblingStream.chunks() > flowed + 2)
  t.notOk(siblingEnded, 'a stream of a task from another delegation is untouched')

  // The other delegation by its jti: the same.
  t.equal((await revoke(broker, 'jti', decodeJwt(otherDelegation).jti!)).status, 201)
  await until('jti revocation applied', () => child.sidecar.control!.state.has('jti', decodeJwt(otherDelegation).jti!))
  t.match(await viaProxy(child, sibling.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED', rule: 'revocation:delegation' } })
  t.equal(child.sidecar.brokerTokens!.describe(sibling.id).length, 0)
  t.equal((await viaProxy(child, own.handle, `${api.origin}/x`)).status, 200, 'the task of its own is untouched')

  // A task opened afterwards with the revoked delegation: refused at once.
  const late = await fetch(`${child.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'late', duration_s: 60, user_token: rootDelegation }) })
  t.equal(late.status, 403)
  // Refused by the sidecar, which knows the delegation revoked: no broker need say so (down, it made this a retryable 503).
  t.match(await late.json(), { error: 'revoked', reason: /rests on a revoked delegation \(revocation:delegation\)/, retryable: false })
  // A delegation token whose ancestry cannot be read is no task at all.
  const res = await fetch(`${child.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'x', duration_s: 60, user_token: unsignedJwt({ sub: 'alice', act: { sub: 'agent:summarizer:prod:root' }, jti: 'j1', delegated_from: 'root-task' }) }) })
  t.equal(res.status, 400)
  t.match(await res.json(), { reason: /delegated_from, jti or task_id cannot be read/ })
})

function unsignedJwt(claims: Record<string, unknown>): string {
  const part = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
  return `${part({ alg: 'ES256', typ: 'JWT' })}.${part(claims)}.${Buffer.from('not a signature').toString('base64url')}`
}

/** GET /v1/tasks/<handle> on the sidecar's admin port. */
async function taskState(s: { sidecar: { adminUrl: string } }, handle: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks/${handle}`)
  return { status: res.status, body: (await res.json()) as Record<string, unknown> }
}


t.test("a revoked task's fetch of an http:// URL on port 80 reads its 403 inside the tunnel, not \"fetch failed\"", async (t) => {
  const { broker, api, s } = await startRig(t, 'agent:summarizer:prod:port-80')
  const task = await s.openTask()
  t.equal((await revoke(broker, 'task', task.id)).status, 201)
  await until('the revocation applied', () => s.sidecar.control!.state.has('task', task.id))

  // HTTP_PROXY naming the task, as an SDK on Node's fetch is given it: undici tunnels http:// on
  // port 80, and a CONNECT refused on its status line was only "fetch failed", retried by the SDK.
  const proxy = new URL(s.proxy)
  proxy.username = 'task'
  proxy.password = task.handle
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: proxy.href, noProxy: '' })
  t.teardown(() => dispatcher.close())
  let seen: { status: number; error: string | null; body: Record<string, unknown> } | string
  try {
    const res = await undiciFetch('http://api.example/v1/messages', { method: 'POST', body: '{}', dispatcher })
    seen = { status: res.status, error: res.headers.get('x-latchkey-error'), body: (await res.json()) as Record<string, unknown> }
  } catch (err) {
    seen = String((err as Error).message)
  }
  t.match(seen, { status: 403, error: 'LK_REVOKED', body: { error: 'revoked', retryable: false } }, 'a refusal fetch hands over, saying not to retry')
  // Another port keeps the CONNECT's own refusal.
  const other = openRecorded(t, s.sidecar.port, `CONNECT 127.0.0.1:${api.port} HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\nProxy-Authorization: Bearer ${task.handle}\r\n\r\n`)
  await until('the CONNECT answered and closed', () => other.closed())
  t.match(other.received(), /^HTTP\/1\.1 403 /, 'a CONNECT elsewhere is refused on its status line')
  t.same(api.paths, [], 'nothing reached the API')
})
