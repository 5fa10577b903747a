// SPIFFE evidence through a Workload API server that speaks SPIFFE's own proto over a unix
// socket, as the SPIRE agent does (it is in-test because no SPIRE agent runs here): the sidecar
// fetches a JWT-SVID with the required metadata, the broker verifies it against the trust
// domain's bundle, and the API sees the SPIFFE-attested instance. Then the socket's faults.
import t, { type Test } from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer as createNetServer } from 'node:net'
import { Server, ServerCredentials, status, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js'
import { SpiffeWorkloadAPIService, type JWTSVIDRequest, type JWTSVIDResponse } from '../../protos/gen/spiffe/workload.js'
import { SpiffeWorkloadEvidence } from '../../proxy/attest/spiffe-workload.js'
import { startTestBroker, API, type TestBroker } from '../helpers/broker.js'
import { startResourceServer } from '../helpers/tokens.js'
import { startTestSidecar, loopbackPolicy, assertNoCanary, CANARY } from '../helpers/harness.js'
import { Client } from 'undici'
import { decodeJwt } from 'jose'

interface WorkloadApi {
  socket: string
  calls: { audience: string[]; header: string | undefined; spiffeId: string }[]
  close(): Promise<void>
}

async function startWorkloadApi(broker: TestBroker, answer?: (req: JWTSVIDRequest) => Promise<JWTSVIDResponse>): Promise<WorkloadApi> {
  const socket = join(mkdtempSync(join(tmpdir(), 'lk-spire-')), 'agent.sock')
  const calls: WorkloadApi['calls'] = []
  const server = new Server()
  server.addService(SpiffeWorkloadAPIService, {
    fetchJwtsvid: (call: ServerUnaryCall<JWTSVIDRequest, JWTSVIDResponse>, cb: sendUnaryData<JWTSVIDResponse>) => {
      const header = call.metadata.get('workload.spiffe.io')[0]?.toString()
      calls.push({ audience: call.request.audience, header, spiffeId: call.request.spiffeId })
      // What SPIRE answers to a call without the security header.
      if (header !== 'true') return cb({ code: status.INVALID_ARGUMENT, details: 'security header missing from request' })
      const reply =
        answer?.(call.request) ??
        broker.spiffe.sign({ iss: null, sub: 'spiffe://example.org/agents/summarizer/w-1', aud: call.request.audience }).then((svid) => ({ svids: [{ spiffeId: 'spiffe://example.org/agents/summarizer/w-1', svid, hint: '' }] }))
      reply.then((r) => cb(null, r), (e: Error) => cb({ code: status.INTERNAL, details: e.message }))
    },
    fetchJwtBundles: () => {},
  })
  await new Promise<void>((resolve, reject) => server.bindAsync(`unix:${socket}`, ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())))
  return { socket, calls, close: () => new Promise<void>((r) => server.tryShutdown(() => r())) }
}

/** A broker, a Workload API answering as `answer` says (SPIRE's own answer by default), an API, and a sidecar attested by SPIFFE to that broker; all closed at the test's end. */
async function startSpiffeRig(t: Test, answer?: (req: JWTSVIDRequest) => Promise<JWTSVIDResponse>) {
  const broker = await startTestBroker()
  const spire = await startWorkloadApi(broker, answer)
  const api = await startResourceServer(broker)
  const s = await startTestSidecar({
    ...loopbackPolicy([api.port]),
    sidecar: { agent_id: 'agent:summarizer-spiffe:prod:w-1', broker: { url: broker.url }, attestation: { spiffe: { socket: spire.socket, audience: broker.issuer } } },
    credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await api.close()
    await spire.close()
    await broker.close()
  })
  return { broker, spire, api, s }
}

async function get(proxy: string, handle: string, url: string) {
  const c = new Client(proxy)
  const res = await c.request({ method: 'GET', path: url, headers: { host: new URL(url).host, 'proxy-authorization': `Basic ${Buffer.from(`task:${handle}`).toString('base64')}` } })
  const body = JSON.parse(await res.body.text()) as Record<string, unknown>
  await c.close()
  return { status: res.statusCode, body }
}

t.test('a SPIFFE-attested sidecar gets tokens for its instance', async (t) => {
  const { broker, spire, api, s } = await startSpiffeRig(t)
  const user = await broker.userToken('alice', 'read')
  const a = s.sidecar.tasks.open({ purpose: 'a', durationS: 60, userToken: user })
  const b = s.sidecar.tasks.open({ purpose: 'b', durationS: 60, userToken: user })
  const ra = await get(s.proxy, a.handle, `${api.origin}/x`)
  const rb = await get(s.proxy, b.handle, `${api.origin}/y`)
  t.equal(ra.status, 200)
  t.same(ra.body, { sub: 'alice', act: { sub: 'agent:summarizer-spiffe:prod:w-1' }, scope: 'read' }, 'the API sees the SPIFFE-attested instance')
  t.equal(rb.status, 200)
  t.same(spire.calls, [{ audience: [broker.issuer], header: 'true', spiffeId: '' }], 'one fetch, for the broker audience, with the workload.spiffe.io header; the SVID is reused before its half-life')
  t.equal(broker.events.filter((e) => e.type === 'token.exchange' && e.attestor === 'spiffe').length, 2)
})

t.test('Workload API faults: missing socket, garbage on the socket, a non-JWT answer, a refusal, the agent gone past half-life', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const missing = new SpiffeWorkloadEvidence('/nonexistent/spire/agent.sock', broker.issuer, 500)
  await t.rejects(missing.get(), /SPIFFE Workload API at \/nonexistent\/spire\/agent\.sock: UNAVAILABLE/)
  missing.close()

  // A socket that answers with bytes that are not HTTP/2.
  const junkSock = join(mkdtempSync(join(tmpdir(), 'lk-junk-')), 'agent.sock')
  const junk = createNetServer((c) => {
    c.on('error', () => {})
    c.end('HTTP/1.1 200 OK\r\n\r\nthis is not grpc')
  })
  await new Promise<void>((r) => junk.listen(junkSock, r))
  t.teardown(() => junk.close())
  const garbage = new SpiffeWorkloadEvidence(junkSock, broker.issuer, 500)
  await t.rejects(garbage.get(), /SPIFFE Workload API at .*agent\.sock: (UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED)/)
  garbage.close()

  const notJwt = await startWorkloadApi(broker, async () => ({ svids: [{ spiffeId: 'spiffe://example.org/x', svid: 'garbage', hint: '' }] }))
  const ev = new SpiffeWorkloadEvidence(notJwt.socket, broker.issuer, 500)
  await t.rejects(ev.get(), /not a JWT-SVID/)
  ev.close()
  await notJwt.close()

  const empty = await startWorkloadApi(broker, async () => ({ svids: [] }))
  const ev2 = new SpiffeWorkloadEvidence(empty.socket, broker.issuer, 500)
  await t.rejects(ev2.get(), /returned no JWT-SVID/)
  ev2.close()
  await empty.close()

  // The agent gone past half-life (restarting, say): the SVID in hand serves out its life, as
  // SPIRE's renewal at half-life intends, but never into its last timeout_ms.
  let clock = Date.now()
  const agent = await startWorkloadApi(broker)
  const held = new SpiffeWorkloadEvidence(agent.socket, broker.issuer, 500, { now: () => clock })
  t.teardown(() => held.close())
  const svid = await held.get()
  await agent.close()
  const expMs = decodeJwt(svid).exp! * 1000
  clock = expMs - 140_000
  t.equal(await held.get(), svid, 'past half its life, the agent gone: the SVID in hand')
  clock = expMs - 500
  await t.rejects(held.get(), /SPIFFE Workload API at .*agent\.sock: UNAVAILABLE/, 'not with 500 ms (timeout_ms) left')
})

t.test('through the sidecar, a missing SPIRE socket is a 503 that says so', async (t) => {
  const broker = await startTestBroker()
  const api = await startResourceServer(broker)
  const s = await startTestSidecar({
    ...loopbackPolicy([api.port]),
    sidecar: { agent_id: 'agent:summarizer-spiffe:prod:w-1', broker: { url: broker.url }, attestation: { spiffe: { socket: '/nonexistent/agent.sock' } } },
    credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await api.close()
    await broker.close()
  })
  const task = s.sidecar.tasks.open({ purpose: 'a', durationS: 60 })
  const res = await get(s.proxy, task.handle, `${api.origin}/x`)
  t.equal(res.status, 503)
  t.match(res.body.reason, /workload evidence unavailable: SPIFFE Workload API at \/nonexistent\/agent\.sock: UNAVAILABLE/)
  t.equal(api.seen.length, 0)
})

const CODER = 'spiffe://example.org/agents/summarizer/w-1'
const HELPER = 'spiffe://example.org/agents/summarizer/helper-1'

/** What SPIRE answers a workload holding several identities: all of them, or only the one asked for. */
function holding(broker: TestBroker, ids: string[]) {
  return async (req: JWTSVIDRequest): Promise<JWTSVIDResponse> => {
    const wanted = req.spiffeId ? ids.filter((id) => id === req.spiffeId) : ids
    if (wanted.length === 0) throw new Error('no identity issued')
    return { svids: await Promise.all(wanted.map(async (id) => ({ spiffeId: id, svid: await broker.spiffe.sign({ iss: null, sub: id, aud: req.audience }), hint: '' }))) }
  }
}

t.test('several JWT-SVIDs and no spiffe_id: refused with the IDs offered, never the first taken', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  // The helper's SVID comes first, as in the probe: taking svids[0] would act as the helper.
  const spire = await startWorkloadApi(broker, holding(broker, [HELPER, CODER]))
  t.teardown(spire.close)
  const ev = new SpiffeWorkloadEvidence(spire.socket, broker.issuer, 1000)
  t.teardown(() => ev.close())
  const err = (await ev.get().then(() => null, (e: Error) => e))!
  t.ok(err, 'refused')
  t.match(err.message, /returned 2 JWT-SVIDs \("spiffe:\/\/example\.org\/agents\/summarizer\/helper-1", "spiffe:\/\/example\.org\/agents\/summarizer\/w-1"\); set sidecar\.attestation\.spiffe\.spiffe_id/)
  t.notOk(/eyJ/.test(err.message), 'no token material in the reason')
  t.same(spire.calls.map((c) => c.spiffeId), [''], 'no ID was asked for')
})

t.test('with spiffe_id: that ID is requested and only it is accepted', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const spire = await startWorkloadApi(broker, holding(broker, [HELPER, CODER]))
  t.teardown(spire.close)
  const ev = new SpiffeWorkloadEvidence(spire.socket, broker.issuer, 1000, { spiffeId: CODER })
  t.teardown(() => ev.close())
  t.equal(decodeJwt(await ev.get()).sub, CODER, 'the SVID for the configured ID')
  t.same(spire.calls, [{ audience: [broker.issuer], header: 'true', spiffeId: CODER }], 'FetchJWTSVID named the ID')

  // A Workload API that ignores spiffe_id and answers with everything, or with another ID only.
  for (const ids of [[HELPER, CODER], [CODER, HELPER], [HELPER]]) {
    const loose = await startWorkloadApi(broker, async (req) => holding(broker, ids)({ ...req, spiffeId: '' }))
    const ev2 = new SpiffeWorkloadEvidence(loose.socket, broker.issuer, 1000, { spiffeId: CODER })
    await t.rejects(ev2.get(), /answered a request for "spiffe:\/\/example\.org\/agents\/summarizer\/w-1" with JWT-SVIDs for .*helper-1.*; refused/, `refused: ${ids.join(' ')}`)
    ev2.close()
    await loose.close()
  }

  // The label says the configured ID, the JWT inside is the helper's: the JWT is what the broker attests.
  const lying = await startWorkloadApi(broker, async (req) => ({ svids: [{ spiffeId: CODER, svid: await broker.spiffe.sign({ iss: null, sub: HELPER, aud: req.audience }), hint: '' }] }))
  t.teardown(lying.close)
  for (const opts of [{ spiffeId: CODER }, {}]) {
    const ev3 = new SpiffeWorkloadEvidence(lying.socket, broker.issuer, 1000, opts)
    await t.rejects(ev3.get(), /returned a JWT-SVID for "spiffe:\/\/example\.org\/agents\/summarizer\/helper-1" labelled "spiffe:\/\/example\.org\/agents\/summarizer\/w-1"; refused/)
    ev3.close()
  }
})

t.test('through the sidecar: several SVIDs are a 503 naming them; the chosen spiffe_id gets its own token', async (t) => {
  const broker = await startTestBroker()
  const spire = await startWorkloadApi(broker, holding(broker, [HELPER, CODER]))
  const api = await startResourceServer(broker)
  const fragment = (spiffe: Record<string, unknown>) => ({
    ...loopbackPolicy([api.port]),
    sidecar: { agent_id: 'agent:summarizer-spiffe:prod:w-1', broker: { url: broker.url }, attestation: { spiffe: { socket: spire.socket, audience: broker.issuer, ...spiffe } } },
    credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, inject: { type: 'bearer' } }],
  })
  const unnamed = await startTestSidecar(fragment({}))
  const named = await startTestSidecar(fragment({ spiffe_id: CODER }))
  t.teardown(async () => {
    await unnamed.close()
    await named.close()
    await api.close()
    await spire.close()
    await broker.close()
  })
  const a = unnamed.sidecar.tasks.open({ purpose: 'a', durationS: 60 })
  const refused = await get(unnamed.proxy, a.handle, `${api.origin}/x`)
  t.equal(refused.status, 503)
  t.match(refused.body.reason, /workload evidence unavailable: SPIFFE Workload API at .* returned 2 JWT-SVIDs \(.*helper-1.*w-1.*\)/)
  t.equal(api.seen.length, 0, 'nothing reached the API')
  t.equal(broker.events.filter((e) => e.type === 'token.exchange').length, 0, 'no exchange was attempted')

  const b = named.sidecar.tasks.open({ purpose: 'b', durationS: 60 })
  const ok = await get(named.proxy, b.handle, `${api.origin}/y`)
  t.equal(ok.status, 200)
  t.same(ok.body.act, { sub: 'agent:summarizer-spiffe:prod:w-1' }, 'the API sees the configured workload, not the helper')
})

t.test('a Workload API that puts an SVID where an ID goes: the 503, the log and the audit quote no token', async (t) => {
  // A confused or hostile agent: the label is the SVID itself (fields swapped), or the SVID's sub
  // is. An SVID of a short key fits in the 256 characters a label was quoted to, signature and all.
  let answer: JWTSVIDResponse = { svids: [] }
  const { broker, api, s } = await startSpiffeRig(t, async () => answer)
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const svid = (sub: string) => `${b64({ alg: 'ES256' })}.${b64({ sub, aud: [broker.issuer], exp: Math.floor(Date.now() / 1000) + 600 })}.${CANARY}`
  const other = svid(HELPER)
  const rows: [string, JWTSVIDResponse][] = [
    ['labelled with itself', { svids: [{ spiffeId: svid(CODER), svid: svid(CODER), hint: '' }] }],
    ['its sub another SVID', { svids: [{ spiffeId: CODER, svid: svid(other), hint: '' }] }],
    ['two, each labelled with itself', { svids: [{ spiffeId: svid(CODER), svid: svid(CODER), hint: '' }, { spiffeId: other, svid: other, hint: '' }] }],
  ]
  const seen: string[] = []
  for (const [name, a] of rows) {
    answer = a
    const task = s.sidecar.tasks.open({ purpose: name, durationS: 60 })
    const r = await get(s.proxy, task.handle, `${api.origin}/x`)
    seen.push(JSON.stringify(r))
    t.equal(r.status, 503, `${name}: refused`)
    t.match(r.body.reason, /workload evidence unavailable: SPIFFE Workload API at .*(not a SPIFFE ID|refused|set sidecar)/, `${name}: saying why`)
  }
  t.equal(api.seen.length, 0, 'nothing reached the API')
  assertNoCanary(t, s, ...seen)
})
