// SPIFFE evidence through a Workload API server that speaks SPIFFE's own proto over a unix
// socket, as the SPIRE agent does (it is in-test because no SPIRE agent runs here): the sidecar
// fetches a JWT-SVID with the required metadata, the broker verifies it against the trust
// domain's bundle, and the API sees the SPIFFE-attested instance. Then the socket's faults.
import t from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer as createNetServer } from 'node:net'
import { Server, ServerCredentials, status, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js'
import { SpiffeWorkloadAPIService, type JWTSVIDRequest, type JWTSVIDResponse } from '../../protos/gen/spiffe/workload.js'
import { SpiffeWorkloadEvidence } from '../../proxy/attest/spiffe-workload.js'
import { startTestBroker, API, type TestBroker } from '../helpers/broker.js'
import { startResourceServer } from '../helpers/tokens.js'
import { startTestSidecar, loopbackPolicy } from '../helpers/harness.js'
import { Client } from 'undici'

interface WorkloadApi {
  socket: string
  calls: { audience: string[]; header: string | undefined }[]
  close(): Promise<void>
}

async function startWorkloadApi(broker: TestBroker, answer?: (req: JWTSVIDRequest) => Promise<JWTSVIDResponse>): Promise<WorkloadApi> {
  const socket = join(mkdtempSync(join(tmpdir(), 'lk-spire-')), 'agent.sock')
  const calls: WorkloadApi['calls'] = []
  const server = new Server()
  server.addService(SpiffeWorkloadAPIService, {
    fetchJwtsvid: (call: ServerUnaryCall<JWTSVIDRequest, JWTSVIDResponse>, cb: sendUnaryData<JWTSVIDResponse>) => {
      const header = call.metadata.get('workload.spiffe.io')[0]?.toString()
      calls.push({ audience: call.request.audience, header })
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

async function get(proxy: string, handle: string, url: string) {
  const c = new Client(proxy)
  const res = await c.request({ method: 'GET', path: url, headers: { host: new URL(url).host, 'proxy-authorization': `Basic ${Buffer.from(`task:${handle}`).toString('base64')}` } })
  const body = JSON.parse(await res.body.text()) as Record<string, unknown>
  await c.close()
  return { status: res.statusCode, body }
}

t.test('a SPIFFE-attested sidecar gets tokens for its instance', async (t) => {
  const broker = await startTestBroker()
  const spire = await startWorkloadApi(broker)
  const api = await startResourceServer(broker)
  const s = await startTestSidecar({
    ...loopbackPolicy([api.port]),
    sidecar: { agent_id: 'agent:summarizer:prod:w-1', broker: { url: broker.url }, attestation: { spiffe: { socket: spire.socket, audience: broker.issuer } } },
    credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await api.close()
    await spire.close()
    await broker.close()
  })
  const user = await broker.userToken('alice', 'read')
  const a = s.sidecar.tasks.open({ purpose: 'a', durationS: 60, userToken: user })
  const b = s.sidecar.tasks.open({ purpose: 'b', durationS: 60, userToken: user })
  const ra = await get(s.proxy, a.handle, `${api.origin}/x`)
  const rb = await get(s.proxy, b.handle, `${api.origin}/y`)
  t.equal(ra.status, 200)
  t.same(ra.body, { sub: 'alice', act: { sub: 'agent:summarizer:prod:w-1' }, scope: 'read' }, 'the API sees the SPIFFE-attested instance')
  t.equal(rb.status, 200)
  t.same(spire.calls, [{ audience: [broker.issuer], header: 'true' }], 'one fetch, for the broker audience, with the workload.spiffe.io header; the SVID is reused before its half-life')
  t.equal(broker.events.filter((e) => e.type === 'token.exchange' && e.attestor === 'spiffe').length, 2)
})

t.test('Workload API faults: missing socket, garbage on the socket, a non-JWT answer, a refusal', async (t) => {
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
})

t.test('through the sidecar, a missing SPIRE socket is a 503 that says so', async (t) => {
  const broker = await startTestBroker()
  const api = await startResourceServer(broker)
  const s = await startTestSidecar({
    ...loopbackPolicy([api.port]),
    sidecar: { agent_id: 'agent:summarizer:prod:w-1', broker: { url: broker.url }, attestation: { spiffe: { socket: '/nonexistent/agent.sock' } } },
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
