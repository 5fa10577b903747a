// The sidecar with the real gRPC sink and spool, against a real collector: every call arrives,
// through outages, and a full spool does what it is configured to do.
import t from 'tap'
import { mkdtempSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Writable } from 'node:stream'
import { request } from 'undici'
import { startSidecar } from '../../proxy/sidecar.js'
import type { CollectorAuditSink } from '../../proxy/audit/collector-sink.js'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'
import { CANARY, startUpstream } from '../helpers/harness.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { call, freePort, proxyAgent, sidecarConfig, startCollectedSidecar } from './sidecar-helpers.js'

const AGENT = 'agent:summarizer:test:a1'

async function pathsAt(store: { eventsByAgent: (q: { agent: string; since: Date; limit?: number }) => Promise<{ event: { call?: { path: string } } }[]> }) {
  return (await store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 100_000 })).map((e) => e.event.call?.path ?? '')
}

t.test('every call reaches the collector once, credential never', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const s = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  const made: string[] = []
  await Promise.all(
    Array.from({ length: 300 }, async (_, i) => {
      const status = await call(agent, `${upstream.origin}/call/${i}`)
      t.equal(status, 200)
      made.push(`/call/${i}`)
    }),
  )
  // One denied by policy: refused by the sidecar, still audited.
  t.equal(await call(agent, 'http://127.0.0.1:1/denied'), 403)
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'collector acked everything spooled')
  const at = await pathsAt(c.store)
  t.same(at.filter((p) => p.startsWith('/call/')).sort(), made.sort(), 'the set of events at the store is the set of calls')
  t.equal(at.length, 301)
  const denied = await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), deniedOnly: true })
  t.same(denied.map((e) => [e.event.call?.path, e.event.decision?.action, e.event.call?.status]), [['/denied', Action.ACTION_DENY, 403]])
  const withCred = (await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1 }))[0]!
  t.same(withCred.event.credential?.audience, upstream.origin)
  t.equal(Buffer.from(withCred.event.credential!.tokenSha256).length, 0, 'a static secret gets no hash: it may be short enough to guess from one')
  t.same((await c.store.verify()).ok, true)
  await s.close()
  // The injected credential reached the upstream and nowhere else: not the store, not a log.
  t.ok(upstream.requests.every((r) => r.headers.authorization === `Bearer ${CANARY}`))
  t.notOk(readFileSync(join(c.dir, 'audit.db')).includes(CANARY), 'the store file does not contain the credential')
  t.notOk(s.logs.join('').includes(CANARY), 'no sidecar log line contains the credential')
  t.notOk(s.logs.join('').includes(id.token), 'no sidecar log line contains the collector token')
  t.notOk(c.logs.join('').includes(id.token), 'no collector log line contains the collector token')
})

t.test('collector down for the whole run, then up: nothing lost', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 100; i++) t.equal(await call(agent, `${upstream.origin}/outage/${i}`), 200)
  await new Promise((r) => setTimeout(r, 300))
  t.equal(s.sink.stats.acked, 0, 'nothing acked while the collector is down')
  t.ok(s.sink.stats.reconnects >= 2, `the sink kept retrying (${s.sink.stats.reconnects})`)
  t.match(s.logs.join(''), /audit stream to collector lost/)
  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  t.ok(await s.sink.waitForAck(100, 10_000), 'replayed and acked after the collector came up')
  t.same((await pathsAt(c.store)).sort(), Array.from({ length: 100 }, (_, i) => `/outage/${i}`).sort())
  t.ok((await c.store.verify()).ok)
  await s.close()
})

t.test('full spool, on_full refuse: new egress refused (503) until the collector catches up', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port, collectorOpts: { spool_max_bytes: 65536, segment_bytes: 8192 } })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  const ok: string[] = []
  let refusedAt = -1
  for (let i = 0; i < 2000 && refusedAt < 0; i++) {
    const status = await call(agent, `${upstream.origin}/fill/${i}`)
    if (status === 200) ok.push(`/fill/${i}`)
    else if (status === 503) refusedAt = i
    else t.fail(`unexpected status ${status}`)
  }
  t.ok(refusedAt > 0, `refused once the spool was full (after ${refusedAt} calls)`)
  const forwarded = upstream.requests.length
  const res = await fetchThrough(s.sidecar.proxyUrl, `${upstream.origin}/after-full`)
  t.equal(res.status, 503)
  t.equal(res.code, 'LK_AUDIT_UNAVAILABLE')
  t.equal(upstream.requests.length, forwarded, 'the refused call never reached the upstream')
  t.match(s.logs.join(''), /audit spool full: refusing new egress/)
  const { request } = await import('undici')
  const readyz = async () => {
    const r = await request(`${s.sidecar.adminUrl}/readyz`)
    return { status: r.statusCode, body: (await r.body.json()) as { reasons?: string[] } }
  }
  const full = await readyz()
  t.equal(full.status, 503, 'not ready while every new call is refused')
  t.same(full.body.reasons, ['the audit spool is full; no new egress until the collector catches up'])
  // A flood of refused calls: recorded up to an eighth over the limit, then only counted.
  let refused = 0
  for (let i = 0; i < 600; i++) if ((await call(agent, `${upstream.origin}/flood/${i}`)) === 503) refused++
  t.equal(refused, 600)
  t.ok(s.sink.spool.bytes < 65536 * 1.125 + 1024, `the spool stopped growing (${s.sink.spool.bytes} bytes)`)
  t.ok(s.sink.stats.dropped > 0, `refusals past the hard limit counted, not kept (${s.sink.stats.dropped})`)
  t.equal(upstream.requests.length, forwarded, 'none of them reached the upstream')
  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000))
  t.equal(s.sink.accepting(), true, 'accepting again once acked segments were deleted')
  t.equal((await readyz()).status, 200, 'ready again')
  t.equal(await call(agent, `${upstream.origin}/after-catch-up`), 200)
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000))
  const at = new Set(await pathsAt(c.store))
  t.same(ok.filter((p) => !at.has(p)), [], 'every call that went out is at the store')
  t.ok(at.has('/after-catch-up'))
  const droppedPaths = upstream.requests.map((r) => r.url).filter((p) => !at.has(p))
  t.same(droppedPaths, [], 'every call that reached the upstream is at the store; only refusals were dropped')
  await s.close()
})

t.test('full spool, on_full drop: keeps serving and counts the drops, and says so', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port, collectorOpts: { spool_max_bytes: 65536, segment_bytes: 8192, on_full: 'drop', close_timeout_ms: 0 } })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 600; i++) t.equal(await call(agent, `${upstream.origin}/drop/${i}`), 200)
  await s.sink.flush()
  t.ok(s.sink.stats.dropped > 0, `dropped ${s.sink.stats.dropped}`)
  t.equal(s.sink.stats.spooled + s.sink.stats.dropped, 600, 'every event is either spooled or counted as dropped')
  t.match(s.logs.join(''), /audit spool full: dropping audit events \(counted\)/)
  const metrics = await (await request(`${s.sidecar.adminUrl}/metrics`)).body.text()
  t.match(metrics, new RegExp(`^latchkey_audit_events_dropped_total ${s.sink.stats.dropped}$`, 'm'), 'the metric says so')
  t.match(metrics, /^latchkey_audit_spool_full 1$/m)
  t.equal((await request(`${s.sidecar.adminUrl}/readyz`)).statusCode, 200, 'still ready: dropping, not refusing')
  t.match(metrics, /^latchkey_audit_unacked_events [1-9]\d*$/m)
  await s.close()
})

async function fetchThrough(proxyUrl: string, url: string): Promise<{ status: number; code: string }> {
  const { request, ProxyAgent } = await import('undici')
  const a = new ProxyAgent({ uri: proxyUrl, proxyTunnel: false })
  try {
    const r = await request(url, { dispatcher: a })
    const body = (await r.body.json()) as { code?: string }
    return { status: r.statusCode, code: body.code ?? '' }
  } finally {
    await a.close()
  }
}

t.test('a collector token rotated in secrets.file is sent from the next stream: refused with the old one, delivered with the new', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const old = sidecarIdentity()
  const rotated = { ...old, token: `LKCANARYNEW${randomBytes(16).toString('hex')}` }
  // The collector already knows only the new token: the operator rotated its side first.
  const c = await startTestCollector([rotated])
  t.teardown(() => c.close())
  const dir = mkdtempSync(join(tmpdir(), 'lk-rot-collector-'))
  const file = join(dir, 'secrets.yaml')
  const write = (token: string) => {
    writeFileSync(join(dir, 'next.yaml'), `CANARY: "${CANARY}"\nCOLLECTOR: "${token}"\n`)
    renameSync(join(dir, 'next.yaml'), file)
  }
  write(old.token)
  const config = sidecarConfig({ id: old, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir: join(dir, 'spool') })
  config.secrets = { file, env_prefix: 'LATCHKEY_SECRET_', reload_interval_ms: 50 }
  const logs: string[] = []
  const logDestination = new Writable({ write: (chunk: Buffer, _enc, cb) => void (logs.push(chunk.toString()), cb()) })
  const sidecar = await startSidecar(config, { env: {}, logDestination })
  const sink = sidecar.audit as CollectorAuditSink
  const agent = proxyAgent(sidecar.proxyUrl)
  t.teardown(async () => {
    await agent.close()
    await sidecar.close()
  })
  for (let i = 0; i < 5; i++) t.equal(await call(agent, `${upstream.origin}/rotation/${i}`), 200)
  for (const stop = Date.now() + 5_000; !logs.some((l) => l.includes('UNAUTHENTICATED')) && Date.now() < stop; ) await new Promise((r) => setTimeout(r, 20))
  t.match(logs.join(''), /"code":"UNAUTHENTICATED".*audit stream to collector lost/, 'the old token is refused')
  t.equal(sink.stats.acked, 0, 'and nothing is stored with it')
  const scrape = async () => (await (await request(`${sidecar.adminUrl}/metrics`)).body.text()).match(/^latchkey_audit_collector_refusing (\d)$/m)?.[1]
  t.equal(await scrape(), '1', 'the refusal shows on /metrics')
  const ready = await request(`${sidecar.adminUrl}/readyz`)
  t.equal(ready.statusCode, 200, 'while calls go on, spooled: still ready')
  await ready.body.dump()
  write(rotated.token)
  t.ok(await sink.waitForAck(sink.spool.lastSeq, 10_000), 'the spooled calls are delivered with the new token, no restart')
  t.equal(await scrape(), '0', 'and the refusal is over once a batch is acknowledged')
  t.same((await pathsAt(c.store)).sort(), Array.from({ length: 5 }, (_, i) => `/rotation/${i}`))
  t.notOk(logs.join('').includes(old.token) || logs.join('').includes(rotated.token), 'no log line holds either token')
})
