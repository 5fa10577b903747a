// A relayed WebSocket cut on purpose (its agent revoked, its task ended, a new policy denying it)
// tells its agent why: a Close, 1008 Policy Violation, reason the error code (and a denial's
// rule), where the bare cut read as a network fault (1006); the upstream gets a masked 1008 too.
// Still a cut: within the second, nothing relayed after it either way, no Close written into a
// frame under way. All real: broker, control stream, sidecar, a WebSocket API, undici's client.
import t, { type Test } from 'tap'
import { existsSync, readFileSync } from 'node:fs'
import { ProxyAgent, WebSocket, type WebSocketInit } from 'undici'
import { startRig, viaProxy, openWebSocket, revoke, until, type Api } from './rig.js'
import { clientFrame, closeOf, framePayloads, serverFrame } from '../helpers/websocket-frames.js'
import type { TestSidecar } from '../helpers/harness.js'

interface Closed {
  code: number
  reason: string
  /** performance.now() when the agent's client saw it. */
  at: number
}

/** undici's WebSocket (what an SDK opens) through the sidecar, once open; `closed` resolves with its close event. */
async function agentWebSocket(url: string, init: WebSocketInit): Promise<{ closed: Promise<Closed> }> {
  const ws = new WebSocket(url, init)
  const closed = new Promise<Closed>((resolve) => (ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, at: performance.now() })))
  await new Promise((resolve, reject) => {
    ws.onopen = resolve
    ws.onerror = reject
  })
  return { closed }
}

/** undici's WebSocket on the route `api`, the task named by Proxy-Authorization, as an SDK given the sidecar as its base URL. */
function onRoute(s: TestSidecar, handle: string, path: string): Promise<{ closed: Promise<Closed> }> {
  return agentWebSocket(`ws://127.0.0.1:${s.sidecar.port}/api${path}`, { headers: { 'proxy-authorization': `Bearer ${handle}` } })
}

/** undici's WebSocket through a plaintext CONNECT tunnel (ProxyAgent), as with HTTP_PROXY set. */
function tunnelled(t: { teardown(fn: () => unknown): void }, s: TestSidecar, handle: string, api: Api): Promise<{ closed: Promise<Closed> }> {
  const dispatcher = new ProxyAgent({ uri: s.proxy, token: `Basic ${Buffer.from(`task:${handle}`).toString('base64')}` })
  t.teardown(() => dispatcher.destroy())
  return agentWebSocket(`ws://127.0.0.1:${api.port}/ws`, { dispatcher })
}

/** A raw WebSocket through the sidecar (absolute-form), with what its agent and its upstream each receive after the 101. */
async function recorded(s: TestSidecar, handle: string, api: Api) {
  const agent = await openWebSocket(s, handle, api)
  agent.on('error', () => {})
  // The API adds each socket before its 101, and nothing else opens meanwhile: the newest is this one's.
  const upstream = [...api.webSockets].at(-1)!
  const toAgent: Buffer[] = []
  const toUpstream: Buffer[] = []
  agent.on('data', (d: Buffer) => toAgent.push(d))
  upstream.on('data', (d: Buffer) => toUpstream.push(d))
  // Not events.once: it rejects on the error a write racing the cut may meet (a reset), before the close.
  const closed = new Promise<number>((resolve) => agent.once('close', () => resolve(performance.now())))
  return { agent, upstream, closed, agentGot: () => Buffer.concat(toAgent), upstreamGot: () => Buffer.concat(toUpstream) }
}

/** The Close `bytes` end with (its code and reason, and whether masked), if they end with one and nothing follows it. */
function finalClose(bytes: Buffer): { code: number; reason: string; masked: boolean } | null {
  const last = framePayloads(bytes).at(-1)
  return last?.opcode === 0x8 && last.end === bytes.length ? { ...closeOf(last.payload), masked: last.masked } : null
}

/** The task's bearer token, as the API received it: what no log, audit event or frame may hold. */
async function tokenOf(t: Test, s: TestSidecar, handle: string, api: Api): Promise<string> {
  t.equal((await viaProxy(s, handle, `${api.origin}/x`)).status, 200, 'a call of the task, its token recorded by the API')
  return api.tokens.at(-1)!
}

function assertNoToken(t: Test, s: TestSidecar, token: string, ...seen: string[]): void {
  const audit = existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : ''
  t.notOk(s.logs.some((l) => l.includes(token)), 'no log line holds the token')
  t.notOk(audit.includes(token), 'no audit event holds it')
  t.notOk(seen.some((x) => x.includes(token)), 'nor anything the agent or the upstream read')
}

t.test("a revoked agent's WebSockets read 1008 LK_REVOKED, each way, within the second; nothing relayed after the Close", async (t) => {
  const { broker, api, s } = await startRig(t, 'agent:summarizer:prod:ws-revoked', (api) => ({ routes: { api: api.origin } }))
  const task = await s.openTask()
  const token = await tokenOf(t, s, task.handle, api)
  const route = await onRoute(s, task.handle, '/ws')
  const tunnel = await tunnelled(t, s, task.handle, api)
  // Busy both ways as the revocation lands: the agent sends a frame every 2 ms, the API echoes each.
  const busy = await recorded(s, task.handle, api)
  let n = 0
  const sending = setInterval(() => busy.agent.writable && busy.agent.write(clientFrame(`n${n++}`)), 2)
  t.teardown(() => clearInterval(sending))
  await until('frames flowing both ways', () => framePayloads(busy.agentGot()).length >= 5)

  t.equal((await revoke(broker, 'agent', s.agent)).status, 201)
  const revoked = performance.now()
  const [a, b, c] = await Promise.all([route.closed, tunnel.closed, busy.closed])
  clearInterval(sending)
  const ms = Math.max(a.at, b.at, c) - revoked
  t.ok(ms < 1000, `every WebSocket cut within a second of the revoke returning (${ms.toFixed(1)} ms)`)
  t.same([a.code, a.reason], [1008, 'LK_REVOKED'], "on a route: the agent's client read 1008 Policy Violation, LK_REVOKED")
  t.same([b.code, b.reason], [1008, 'LK_REVOKED'], 'in a plaintext tunnel: the same')

  const agentGot = busy.agentGot()
  const upstreamGot = busy.upstreamGot()
  t.same(finalClose(agentGot), { code: 1008, reason: 'LK_REVOKED', masked: false }, 'the busy one: its agent got the Close last, unmasked, nothing after it')
  t.same(finalClose(upstreamGot), { code: 1008, reason: 'LK_REVOKED', masked: true }, 'its upstream got a masked Close last, nothing after it')
  t.ok(framePayloads(agentGot).slice(0, -1).every((f) => f.opcode === 0x1) && framePayloads(upstreamGot).slice(0, -1).every((f) => f.opcode === 0x1), 'before the Close, whole frames only, each way')
  t.ok(framePayloads(upstreamGot).length > 5, `frames were flowing until then (${n} sent)`)

  await until('the cuts audited', async () => (await s.audit()).filter((e) => e.via === 'upgrade').length === 3)
  const events = (await s.audit()).filter((e) => e.via === 'upgrade')
  t.same(events.map((e) => [e.status, e.error, e.reason]), Array(3).fill([101, 'LK_REVOKED', 'revoked']), 'each audited as before: 101, LK_REVOKED, revoked')
  assertNoToken(t, s, token, agentGot.toString('latin1'), upstreamGot.toString('latin1'), a.reason, b.reason)
})

t.test("an ended task's WebSocket reads 1008 LK_TASK_ENDED; one mid-frame towards its agent is cut with no Close in the frame", async (t) => {
  const { api, s } = await startRig(t, 'agent:summarizer:prod:ws-ended')
  const task = await s.openTask()
  const token = await tokenOf(t, s, task.handle, api)
  const tunnel = await tunnelled(t, s, task.handle, api)
  // Towards its agent, a frame begun: its header and 100 of its 300 bytes.
  const mid = await recorded(s, task.handle, api)
  const frame = serverFrame(Buffer.alloc(300, 'x'), { opcode: 0x2 })
  mid.upstream.write(frame.subarray(0, 100))
  await until('the frame begun at the agent', () => mid.agentGot().length >= 100)

  const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks/${encodeURIComponent(task.handle)}`, { method: 'DELETE' })
  const ended = performance.now()
  t.equal(res.status, 204, 'task ended')
  const [a, b] = await Promise.all([tunnel.closed, mid.closed])
  const ms = Math.max(a.at, b) - ended
  t.ok(ms < 1000, `cut within a second (${ms.toFixed(1)} ms)`)
  t.same([a.code, a.reason], [1008, 'LK_TASK_ENDED'], "the agent's client read 1008, LK_TASK_ENDED")
  t.ok(mid.agentGot().equals(frame.subarray(0, 100)), 'the one mid-frame: its agent got the frame begun and nothing more, no Close written into it')
  t.same(finalClose(mid.upstreamGot()), { code: 1008, reason: 'LK_TASK_ENDED', masked: true }, 'its upstream, at a frame boundary, got its Close')

  await until('the cuts audited', async () => (await s.audit()).filter((e) => e.via === 'upgrade').length === 2)
  const events = (await s.audit()).filter((e) => e.via === 'upgrade')
  t.same(events.map((e) => [e.status, e.error, e.reason]), Array(2).fill([101, 'LK_TASK_ENDED', 'the task ended']), 'each audited as before')
  assertNoToken(t, s, token, mid.agentGot().toString('latin1'), mid.upstreamGot().toString('latin1'), a.reason)
})

t.test('a WebSocket a new policy denies reads 1008 LK_POLICY_DENIED and the rule, at most 123 bytes; its upstream the code alone', async (t) => {
  const { api, s } = await startRig(t, 'agent:summarizer:prod:ws-denied', (api) => ({ routes: { api: api.origin } }))
  const task = await s.openTask()
  const token = await tokenOf(t, s, task.handle, api)
  const short = await onRoute(s, task.handle, '/ws/short')
  const long = await onRoute(s, task.handle, '/ws/long')
  const raw = await recorded(s, task.handle, api)
  // A rule id as long as one may be (128): with the code, past what a Close may carry.
  const longRule = 'deny-websockets-' + 'x'.repeat(112)
  const offered = s.sidecar.policy.offer(
    JSON.stringify({
      mode: 'enforce',
      default: 'deny',
      rules: [
        { id: 'no-short-ws', action: 'deny', paths: ['/ws/short'] },
        { id: longRule, action: 'deny', paths: ['/ws', '/ws/long'] },
        { id: 'api', action: 'allow', hosts: ['127.0.0.1'], ports: [api.port] },
      ],
    }),
    'control',
    'policy bundle denying WebSockets',
    'v-ws-denied',
  )
  const changed = performance.now()
  t.ok(offered.ok, 'the new policy is in force')
  const [a, b, c] = await Promise.all([short.closed, long.closed, raw.closed])
  const ms = Math.max(a.at, b.at, c) - changed
  t.ok(ms < 1000, `cut within a second (${ms.toFixed(1)} ms)`)
  t.same([a.code, a.reason], [1008, 'LK_POLICY_DENIED, rule no-short-ws'], "the agent's client read 1008, the code and the rule")
  const cutRule = `LK_POLICY_DENIED, rule ${longRule}`.slice(0, 120) + '...'
  t.same([b.code, b.reason], [1008, cutRule], 'a reason past 123 bytes is cut to 123, saying so')
  t.equal(Buffer.byteLength(b.reason), 123, 'the most a Close may carry')
  t.same(finalClose(raw.agentGot()), { code: 1008, reason: cutRule, masked: false }, 'the raw one read the same')
  t.same(finalClose(raw.upstreamGot()), { code: 1008, reason: 'LK_POLICY_DENIED', masked: true }, 'its upstream got a masked 1008, the code alone: the rules are not its to read')

  await until('the cuts audited', async () => (await s.audit()).filter((e) => e.via === 'upgrade').length === 3)
  const events = (await s.audit()).filter((e) => e.via === 'upgrade')
  t.same(
    events.map((e) => [e.path, e.status, e.error, e.rule]).sort(),
    [
      ['/ws', 101, 'LK_POLICY_DENIED', longRule],
      ['/ws/long', 101, 'LK_POLICY_DENIED', longRule],
      ['/ws/short', 101, 'LK_POLICY_DENIED', 'no-short-ws'],
    ],
    'each audited as before, with its rule',
  )
  t.ok(events.every((e) => /^the policy changed: /.test(String(e.reason))), 'and the reason the policy change gives')
  assertNoToken(t, s, token, raw.agentGot().toString('latin1'), raw.upstreamGot().toString('latin1'), a.reason, b.reason)
})
