// Revocation reaching work already in flight when it lands: a call still waiting on its token
// exchange, calls open on a token revoked by its jti, a task whose POST is still being read. All
// real: the broker with its control stream, a front holding the broker's answers back where a slow
// broker is the point, sidecars, an upstream API.
import t from 'tap'
import { EnvHttpProxyAgent, fetch as undiciFetch } from 'undici'
import { once } from 'node:events'
import { startApi, startControlBroker, startControlSidecar, startRig, viaProxy, openStream, openWebSocket, openRecorded, revoke, until } from './rig.js'
import { startBrokerFront } from '../helpers/broker-front.js'
import { DnsResolver, type LookupFn } from '../../proxy/resolve/resolver.js'
import { NetworkPolicy } from '../../proxy/resolve/network-policy.js'
import { parseConfig } from '../../lib/config/load.js'

t.test('calls waiting on a slow broker when their task is revoked are answered 403 at once, not when the broker answers', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const front = await startBrokerFront(broker.url)
  t.teardown(front.close)
  const api = await startApi()
  t.teardown(api.close)
  // The broker may take up to 20 s: a refusal held until then is what the test is about.
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:slow-broker', { sidecar: { broker: { url: front.url, timeout_ms: 20_000 } } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const revoked = await s.openTask()
  const other = await s.openTask()

  front.mode = { mode: 'hold' }
  // One exchange per task: the revoked task's two calls wait on the same one.
  const arrived = front.handled(front.requests + 2)
  const request = (handle: string, path: string, extra = '') => `GET ${api.origin}${path} HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\nProxy-Authorization: Bearer ${handle}\r\n${extra}\r\n`
  // With a request pipelined behind it, which waits for its turn.
  const get = openRecorded(t, s.sidecar.port, request(revoked.handle, '/waiting') + request(revoked.handle, '/queued'))
  // An upload waiting for its 100 (curl sends Expect: 100-continue for a body over 1 KiB).
  const upload = openRecorded(t, s.sidecar.port, request(revoked.handle, '/upload', 'Expect: 100-continue\r\nContent-Length: 5\r\n').replace(/^GET/, 'POST'))
  // A WebSocket handshake, which waits on the same exchange.
  const ws = openRecorded(t, s.sidecar.port, request(revoked.handle, '/ws', 'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'))
  const bystander = openRecorded(t, s.sidecar.port, request(other.handle, '/bystander'))
  await arrived

  t.equal((await revoke(broker, 'task', revoked.id)).status, 201)
  await until('the revocation applied', () => s.sidecar.control!.state.has('task', revoked.id))
  const applied = performance.now()
  // The broker still holds every answer: the agent is told now, or only when the broker answers.
  await until('the calls of the revoked task answered', () => get.closed() && upload.closed() && ws.closed(), 5000).catch(() => {})
  const ms = performance.now() - applied
  for (const [name, call] of [['the waiting call', get], ['the upload waiting for its 100', upload], ['the WebSocket handshake', ws]] as const) {
    t.match(call.received(), /^HTTP\/1\.1 403 [^\r]*\r\n/, `${name} is answered 403 while the broker still holds its exchange`)
    t.match(call.received(), /"code":"LK_REVOKED"/)
    t.match(call.received(), /"rule":"revocation:task"/, 'naming the revocation, as a refusal at admission does')
  }
  t.notMatch(upload.received(), /^HTTP\/1\.1 100/, 'the upload was never told to send its body')
  t.ok(ms < 2000, `answered ${ms.toFixed(0)} ms after the revocation applied, the broker's answer still held`)
  // Recorded now, as the agent saw it: the trail does not wait on the broker either.
  const events = await s.audit()
  t.match(events.find((e) => e.path === '/waiting'), { task: revoked.id, status: 403, error: 'LK_REVOKED' })
  t.match(events.find((e) => e.path === '/upload'), { task: revoked.id, status: 403, error: 'LK_REVOKED' })
  t.match(events.find((e) => e.path === '/queued'), { task: revoked.id, status: 0, error: 'LK_REVOKED', reason: 'not sent: the connection was cut before its turn (revoked)' }, 'the request pipelined behind it: not sent, and why')
  t.equal(get.received().match(/^HTTP\/1\.1 /gm)?.length, 1, 'one answer on that connection, then its close')
  t.match(events.find((e) => e.path === '/ws'), { task: revoked.id, via: 'upgrade', status: 403, error: 'LK_REVOKED' })
  t.equal(bystander.received(), '', "the other task's call still waits on its own exchange")
  t.notOk(bystander.closed())

  front.release()
  await until('the other task answered', () => bystander.received().includes('"ok":true'))
  t.match(bystander.received(), /^HTTP\/1\.1 200/, 'and is served once its token comes')
  await new Promise((r) => setTimeout(r, 200))
  t.same(api.paths, ['/bystander'], 'nothing of the revoked task reached the API, once its tokens came either')
  t.equal(api.tokens.length, 1)
  t.same((await s.audit()).filter((e) => e.path === '/waiting' || e.path === '/upload' || e.path === '/ws').length, 3, 'each cut call recorded once, not again when its exchange landed')
})

t.test('revoking a token by its jti cuts the calls still open on it; the same task goes on with a fresh token, other tokens untouched', async (t) => {
  const { broker, api, s } = await startRig(t, 'agent:summarizer:prod:jti-reach')
  const task = await s.openTask()
  const other = await s.openTask()

  const stream = await openStream(s, task.handle, `${api.origin}/stream`)
  await until('stream flowing', () => stream.chunks() > 0)
  const ws = await openWebSocket(s, task.handle, api)
  const wsClosed = once(ws, 'close')
  const otherStream = await openStream(s, other.handle, `${api.origin}/stream/other`)
  let otherEnded = false
  void otherStream.ended.then(() => (otherEnded = true))
  await until('the other stream flowing', () => otherStream.chunks() > 0)
  const jti = s.sidecar.brokerTokens!.describe(task.id)[0]!.jti
  t.not(s.sidecar.brokerTokens!.describe(other.id)[0]!.jti, jti, 'the other task holds another token')

  t.equal((await revoke(broker, 'jti', jti)).status, 201)
  await until('the token dropped', () => s.sidecar.brokerTokens!.describe(task.id).length === 0)
  const dropped = performance.now()
  const cut = await Promise.race([Promise.all([stream.ended, wsClosed]).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))])
  t.ok(cut, `the stream and the WebSocket sent with the revoked token were cut (${(performance.now() - dropped).toFixed(0)} ms after it was dropped)`)
  t.ok(ws.destroyed)

  const before = otherStream.chunks()
  await until('the other stream still flowing', () => otherStream.chunks() > before + 2)
  t.notOk(otherEnded, "a stream on the other task's token is untouched")
  t.equal((await viaProxy(s, task.handle, `${api.origin}/next`)).status, 200, 'the task itself is not revoked: its next call goes, with a fresh token')
  t.not(s.sidecar.brokerTokens!.describe(task.id)[0]?.jti, jti)

  await until('the cuts recorded', async () => (await s.audit()).filter((e) => e.task === task.id && e.error === 'LK_REVOKED').length === 2)
  const cuts = (await s.audit()).filter((e) => e.task === task.id && e.error === 'LK_REVOKED')
  t.same(cuts.map((e) => e.via).sort(), ['absolute', 'upgrade'], 'the stream and the WebSocket, each recorded as revoked')
  t.ok(cuts.every((e) => e.status !== 0 && /jti/.test(String(e.reason)) && (e.credential as { id: string }).id === jti), 'with what they had been answered, and why: the token they were sent with')
  t.notOk((await s.audit()).some((e) => e.task === other.id && e.error !== null), 'nothing of the other task was cut')
})

t.test('a task whose POST is still being read when the agent is revoked is refused, not opened', async (t) => {
  const agent = 'agent:summarizer:prod:slow-post'
  const { broker, s } = await startRig(t, agent)
  // No audiences and no user token: nothing is exchanged as it opens, so no exchange is there to void.
  const body = JSON.stringify({ purpose: 'opened as the revocation lands', duration_s: 60 })
  const admin = new URL(s.sidecar.adminUrl)
  const post = openRecorded(t, Number(admin.port), `POST /v1/tasks HTTP/1.1\r\nHost: ${admin.host}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 10)}`)
  await new Promise((r) => setTimeout(r, 100))
  t.equal((await revoke(broker, 'agent', agent)).status, 201)
  await until('the revocation applied', () => s.sidecar.control!.state.agentRevoked)
  post.sock.write(body.slice(10))
  await until('answered', () => /\r\n\r\n[\s\S]*\}/.test(post.received()))
  t.match(post.received(), /^HTTP\/1\.1 403 /, 'refused')
  t.match(post.received(), /"error":"revoked"/)
  t.match(post.received(), /revocation:agent/)
  t.match(post.received(), /"retryable":false/)
  t.equal(s.sidecar.tasks.size, 0, 'no task left open')
  t.same(((await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`)).json()) as { tasks: unknown[] }).tasks, [], 'none listed')
})

t.test('a CONNECT waiting on DNS when its task is revoked is answered 403 at once, not closed bare', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  // A lookup held until released: one that never answers cannot be caused on this machine (its
  // resolver is the system's), so the resolver's own injection point holds it (as dns-faults.test).
  const held: (() => void)[] = []
  const lookup: LookupFn = (host) =>
    host === 'api.test' ? new Promise((resolve) => held.push(() => resolve([{ address: '127.0.0.1', family: 4 }]))) : Promise.reject(Object.assign(new Error('getaddrinfo ENOTFOUND'), { code: 'ENOTFOUND' }))
  t.teardown(() => held.splice(0).forEach((go) => go()))
  const network = new NetworkPolicy(parseConfig(`version: 1\nnetwork:\n  allow:\n    - cidr: 127.0.0.1/32\n      ports: [${api.port}]\n`).network)
  const resolver = new DnsResolver(network, { cacheMs: 0, negativeCacheMs: 0, timeoutMs: 20_000, maxLookups: 8, lookup })
  const policy = { default: 'deny', rules: [{ id: 'allow-api', action: 'allow', hosts: ['api.test'], ports: [api.port, 80] }] }
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:dns-wait', { policy, options: { resolver } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const revoked = await s.openTask()
  const other = await s.openTask()
  const connectTo = (handle: string) => openRecorded(t, s.sidecar.port, `CONNECT api.test:${api.port} HTTP/1.1\r\nHost: api.test:${api.port}\r\nProxy-Authorization: Bearer ${handle}\r\n\r\n`)
  const tunnel = connectTo(revoked.handle)
  const bystander = connectTo(other.handle)
  // Node's fetch of http://api.test/ (port 80) for the same task, its CONNECT on the same lookup:
  // cut, it reads the 403 inside the tunnel, where the CONNECT's own was "fetch failed".
  const proxy = new URL(s.proxy)
  proxy.username = 'task'
  proxy.password = revoked.handle
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: proxy.href, noProxy: '' })
  t.teardown(() => dispatcher.close())
  const port80 = undiciFetch('http://api.test/v1/messages', { method: 'POST', body: '{}', dispatcher }).then(
    async (r) => [r.status, r.headers.get('x-latchkey-error'), ((await r.json()) as { retryable: boolean }).retryable],
    (err: Error) => [`fetch threw: ${err.message}`],
  )
  // One lookup for the name, both CONNECTs waiting on it.
  await until('the lookup held', () => held.length === 1)
  await new Promise((r) => setTimeout(r, 200))

  t.equal((await revoke(broker, 'task', revoked.id)).status, 201)
  await until('the revocation applied', () => s.sidecar.control!.state.has('task', revoked.id))
  await until('the CONNECT answered', () => tunnel.closed(), 3000).catch(() => {})
  t.match(tunnel.received(), /^HTTP\/1\.1 403 [^\r]*\r\n/, 'answered 403 while its lookup is still held')
  t.match(tunnel.received(), /"code":"LK_REVOKED"/)
  t.match(tunnel.received(), /"rule":"revocation:task"/)
  t.match((await s.audit()).find((e) => e.task === revoked.id && e.via === 'connect'), { status: 403, error: 'LK_REVOKED' }, 'recorded as the agent saw it')
  t.equal(bystander.received(), '', "the other task's CONNECT still waits on its lookup")
  t.same(await port80, [403, 'LK_REVOKED', false], 'fetch on port 80 reads the revocation inside its tunnel, while the lookup is still held')

  held.splice(0).forEach((go) => go())
  await until('the other tunnel opened', () => bystander.received().startsWith('HTTP/1.1 200'))
  await new Promise((r) => setTimeout(r, 200))
  t.same((await s.audit()).filter((e) => e.task === revoked.id).map((e) => [e.via, e.port, e.status, e.error]), [
    ['connect', api.port, 403, 'LK_REVOKED'],
    ['tunnelled', 80, 403, 'LK_REVOKED'],
  ], 'the cut CONNECT and the request inside the other recorded once each, and nothing dialled for them once the lookup answered')
})
