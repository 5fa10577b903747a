// Faults on the sidecar side: SIGKILLed in a loop under load, a damaged spool, its active segment
// cut short or deleted under it. After each:
// every call that completed is at the store exactly once, and the chain verifies.
import t from 'tap'
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, statSync, truncateSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { CANARY, startUpstream } from '../helpers/harness.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { freePort, sidecarConfig, startCollectedSidecar, call, proxyAgent } from './sidecar-helpers.js'
import { loadGenerator, startChild } from './process-helpers.js'
import { until } from '../helpers/until.js'

const AGENT = 'agent:summarizer:test:a1'
// Child processes, kills and restarts: slower than the 60 s default allows on a loaded 2-core CI.
t.setTimeout(180_000)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

t.test('sidecar SIGKILLed in a loop under load: every completed call reaches the store once', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const dir = mkdtempSync(join(tmpdir(), 'lk-kill-'))
  const port = await freePort()
  const config = sidecarConfig({ id, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir: join(dir, 'spool') })
  config.sidecar.listen.port = port
  const cfgPath = join(dir, 'sidecar.yaml')
  writeFileSync(cfgPath, stringify(config))
  const env = { LATCHKEY_SECRET_CANARY: CANARY, LATCHKEY_SECRET_COLLECTOR: id.token }
  const load = loadGenerator(() => `http://127.0.0.1:${port}`, upstream.origin, '/sigkill', 6)
  let kills = 0
  for (let round = 0; round < 4; round++) {
    const child = await startChild(['sidecar', '-c', cfgPath], /sidecar listening/, env)
    // Killed once this run has answered its share of calls (more each round, so the kill lands at
    // another point of the spool), not after a fixed time: the load runs flat out, and a fixed
    // 0.6-1.05 s made ~180 calls a round, CPU in proportion to the time, and proved none were made.
    const okAtStart = load.ok.length
    await until(`round ${round}: calls answered`, () => load.ok.length >= okAtStart + 50 + round * 25, 20_000)
    await child.kill('SIGKILL')
    kills++
    t.notOk(child.output().includes(CANARY), `round ${round}: no credential in the sidecar's output`)
  }
  await load.stop()
  // One last, orderly run delivers whatever the killed ones left in the spool.
  const last = await startChild(['sidecar', '-c', cfgPath], /sidecar listening/, env)
  const expected = new Set(load.ok)
  let at: string[] = []
  for (let i = 0; i < 100; i++) {
    at = (await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1_000_000 })).map((e) => e.event.call?.path ?? '')
    if ([...expected].every((p) => at.includes(p))) break
    await sleep(100)
  }
  await last.kill('SIGTERM')
  t.equal(kills, 4)
  t.ok(load.ok.length > 50, `${load.ok.length} calls completed across ${kills} kills`)
  t.same(at.filter((p, i) => at.indexOf(p) !== i), [], 'no call stored twice')
  t.same(load.ok.filter((p) => !at.includes(p)), [], 'every call that completed is at the store')
  const attempted = new Set(load.attempted)
  t.same(at.filter((p) => !attempted.has(p)), [], 'nothing at the store that was not a call')
  // A call the sidecar recorded but whose response the kill cut off may be at the store: it reached the upstream.
  const upstreamSaw = new Set(upstream.requests.map((r) => r.url))
  t.same(at.filter((p) => !upstreamSaw.has(p)), [], 'every stored call did reach the upstream')
  t.same((await c.store.verify()).ok, true)
})

t.test('a damaged spool: the damaged record is skipped and counted, every other event delivered', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const spoolDir = join(mkdtempSync(join(tmpdir(), 'lk-corrupt-')), 'spool')
  const opts = { spool_max_bytes: 1 << 20, segment_bytes: 4096, close_timeout_ms: 0 }
  const s1 = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port, spoolDir, collectorOpts: opts })
  const agent = proxyAgent(s1.sidecar.proxyUrl)
  for (let i = 0; i < 120; i++) t.equal(await call(agent, `${upstream.origin}/spooled/${i}`), 200)
  await agent.close()
  await s1.close()
  const segs = readdirSync(spoolDir).filter((n) => n.endsWith('.seg')).sort()
  t.ok(segs.length >= 3, `${segs.length} segments`)
  // Damage one byte inside the first record's payload of the second segment, and tear the newest segment's tail.
  const second = join(spoolDir, segs[1]!)
  const data = readFileSync(second)
  data[16 + 20]! ^= 0x55
  writeFileSync(second, data)
  const newest = join(spoolDir, segs[segs.length - 1]!)
  truncateSync(newest, statSync(newest).size - 7)
  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  const s2 = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir, collectorOpts: opts })
  const r = s2.sink.spool.recovery
  t.equal(r.records, 118, 'all but the damaged and the torn record recovered')
  t.ok(r.corruptBytes > 0 && r.tornBytes > 0, `corrupt ${r.corruptBytes} B, torn ${r.tornBytes} B`)
  t.match(s2.logs.join(''), /audit spool damaged: skipped unreadable bytes/)
  t.ok(await s2.sink.waitForAck(s2.sink.spool.lastSeq, 10_000))
  const at = (await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1000 })).map((e) => e.event.call?.path ?? '')
  const missing = Array.from({ length: 120 }, (_, i) => `/spooled/${i}`).filter((p) => !at.includes(p))
  t.equal(at.length, 118)
  t.equal(missing.length, 2, `exactly the two damaged records are missing: ${missing.join(', ')}`)
  t.ok(missing.includes('/spooled/119'), 'the torn one is the last call')
  t.same((await c.store.verify()).ok, true)
  await s2.close()
})

/** Calls `${prefix}/${n}` one after another until `done()` (a log line, awaited: the spool looks at its active segment once a second), or 5 s; returns the paths answered 200. */
async function callUntil(agent: ReturnType<typeof proxyAgent>, origin: string, prefix: string, done: () => boolean): Promise<string[]> {
  const ok: string[] = []
  for (let n = 0, stop = Date.now() + 5000; !done() && Date.now() < stop; n++) {
    if ((await call(agent, `${origin}${prefix}/${n}`)) === 200) ok.push(`${prefix}/${n}`)
    await sleep(20)
  }
  return ok
}

const activeSegment = (dir: string) => join(dir, readdirSync(dir).filter((n) => n.endsWith('.seg')).sort().at(-1)!)

t.test('the active segment cut short under the running sidecar: said with the sequences lost, and every later call delivered', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  // The collector is not up yet: nothing is acked, so what the cut removes is lost for good.
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port })
  t.teardown(() => s.close())
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 20; i++) t.equal(await call(agent, `${upstream.origin}/before/${i}`), 200)
  const seg = activeSegment(s.spoolDir)
  truncateSync(seg, Math.floor(statSync(seg).size / 2)) // mid-record, most likely
  const repaired = () => s.logs.some((l) => l.includes('audit spool segment cut short under the sidecar'))
  const after = await callUntil(agent, upstream.origin, '/after', repaired)
  t.ok(repaired(), 'the cut is noticed and said at the next append a second on')
  const line = JSON.parse(s.logs.find((l) => l.includes('cut short')) ?? '{}') as { level: number; lost: number; lost_from: number; lost_to: number }
  t.ok(line.level >= 50, 'at error level')
  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'everything the spool still holds is acknowledged')
  const at = new Set((await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1000 })).map((e) => e.event.call?.path ?? ''))
  t.same(after.filter((p) => !at.has(p)), [], `every call after the cut is at the store (${after.length})`)
  const before = Array.from({ length: 20 }, (_, i) => `/before/${i}`)
  const missing = before.filter((p) => !at.has(p))
  t.ok(missing.length > 0 && missing.length < 20, `the cut took ${missing.length} of the 20 earlier calls`)
  t.same([line.lost, line.lost_from, line.lost_to], [missing.length, 21 - missing.length, 20], 'the log names exactly the sequences lost')
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, new RegExp(`^latchkey_audit_events_lost_total ${missing.length}$`, 'm'), 'and counts them on /metrics')
  t.same((await c.store.verify()).ok, true)
})

t.test('the active segment deleted under the running sidecar: put back, so a restart numbers on and is not refused', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const spoolDir = join(mkdtempSync(join(tmpdir(), 'lk-deleted-')), 'spool')
  const s1 = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir })
  let agent = proxyAgent(s1.sidecar.proxyUrl)
  for (let i = 0; i < 10; i++) t.equal(await call(agent, `${upstream.origin}/first/${i}`), 200)
  t.ok(await s1.sink.waitForAck(10, 5000))
  // The only segment, as in a quiet sidecar: a tmp cleaner removing it left a spool a restart numbered from 1.
  rmSync(activeSegment(spoolDir))
  const repaired = () => s1.logs.some((l) => l.includes('audit spool segment deleted under the sidecar'))
  const first = await callUntil(agent, upstream.origin, '/deleted', repaired)
  t.ok(repaired(), 'the deletion is noticed and said')
  await agent.close()
  await s1.close()
  const s2 = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir })
  t.teardown(() => s2.close())
  t.ok(s2.sink.spool.next > 10 + first.length, `the restart numbers on from ${s2.sink.spool.next}`)
  agent = proxyAgent(s2.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 5; i++) t.equal(await call(agent, `${upstream.origin}/second/${i}`), 200)
  t.ok(await s2.sink.waitForAck(s2.sink.spool.lastSeq, 10_000), 'the restarted sidecar is acknowledged, not refused')
  const at = (await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1000 })).map((e) => e.event.call?.path ?? '')
  t.equal(at.length, 10 + first.length + 5, 'every call at the store once')
  t.same((await c.store.verify()).ok, true)
})

t.test('older segments deleted or cut short before they were sent: passed over, said with their sequences, and the rest delivered', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const collectorOpts = { segment_bytes: 4096, spool_max_bytes: 1 << 20 }
  // The collector is not up yet: the spool grows segments, the oldest first in line (and first for a tmp cleaner).
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port, collectorOpts })
  t.teardown(() => s.close())
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 40; i++) t.equal(await call(agent, `${upstream.origin}/spooled/${i}`), 200)
  const segs = readdirSync(s.spoolDir).filter((n) => n.endsWith('.seg')).sort()
  t.ok(segs.length >= 3, `${segs.length} segments`)
  rmSync(join(s.spoolDir, segs[0]!))
  const second = join(s.spoolDir, segs[1]!)
  truncateSync(second, Math.floor(statSync(second).size / 2))
  // The sender rereads the spool from its start at each attempt to reach the collector; one that
  // had the deleted file open still reads it, so the collector comes up once both were found.
  const said = (what: string) => s.logs.some((l) => l.includes(`audit spool segment ${what} under the sidecar: passed over`))
  for (const stop = Date.now() + 5000; !(said('deleted') && said('cut short')) && Date.now() < stop; ) await sleep(20)
  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'sending goes on past it: everything else is acknowledged')
  const at = new Set((await c.store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1000 })).map((e) => e.event.call?.path ?? ''))
  const missing = Array.from({ length: 40 }, (_, i) => `/spooled/${i}`).filter((p) => !at.has(p))
  type Line = { level: number; lost: number; lost_from: number; lost_to: number }
  const line = (what: string) => JSON.parse(s.logs.find((l) => l.includes(`audit spool segment ${what} under the sidecar: passed over`)) ?? '{}') as Line
  // A segment is named by its first sequence; sequence n is call n - 1.
  const [first2, first3] = [Number(segs[1]!.slice(0, 16)), Number(segs[2]!.slice(0, 16))]
  const deleted = line('deleted')
  t.same([deleted.level, deleted.lost, deleted.lost_from, deleted.lost_to], [50, first2 - 1, 1, first2 - 1], 'the deleted one said at error level, naming its sequences')
  const cut = line('cut short')
  t.same([cut.level, cut.lost_to, cut.lost], [50, first3 - 1, first3 - cut.lost_from], 'the one cut short too, naming the sequences after the cut')
  t.ok(cut.lost_from > first2 && cut.lost_from < first3, `what is before the cut is kept (sequences ${first2} to ${cut.lost_from - 1})`)
  const seqs = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => `/spooled/${from + i - 1}`)
  t.same(missing, [...seqs(1, first2 - 1), ...seqs(cut.lost_from, first3 - 1)], `exactly those calls are missing (${missing.length}), every other delivered`)
  t.same((await c.store.verify()).ok, true)
})
