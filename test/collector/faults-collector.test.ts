// Faults on the collector side, with a real sidecar under load: the collector SIGKILLed and
// restarted, the database unreachable for a while, duplicate and out-of-order batches. After each:
// the set of events at the store equals the set of calls made, and every chain verifies.
import t, { type Test } from 'tap'
import { join } from 'node:path'
import { once } from 'node:events'
import { createServer, connect, type Socket, type Server, type AddressInfo } from 'node:net'
import { startUpstream } from '../helpers/harness.js'
import { SqliteAuditStore } from '../../collector/store/sqlite.js'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import type { IngestResponse } from '../../protos/gen/latchkey/v1/audit.js'
import { authMetadata, ingestClient, sha256hex, sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { freePort, startCollectedSidecar } from './sidecar-helpers.js'
import { loadGenerator, startChild, writeYaml } from './process-helpers.js'
import { PG_URL, seqEvents, uniqueSchema } from './events.js'
import { AuditIngestServiceService } from '../../protos/gen/latchkey/v1/audit.js'
import { SPELLINGS, holds } from '../helpers/spellings.js'
import { startBearerEcho } from '../helpers/bearer-echo.js'
import { until } from '../helpers/until.js'

const AGENT = 'agent:summarizer:test:a1'
// Child processes, kills and restarts: slower than the 60 s default allows on a loaded 2-core CI.
t.setTimeout(180_000)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function pathsIn(store: { eventsByAgent: SqliteAuditStore['eventsByAgent'] }): Promise<string[]> {
  return (await store.eventsByAgent({ agent: AGENT, since: new Date(0), limit: 1_000_000 })).map((e) => e.event.call?.path ?? '')
}

function sameSet(t: Test, at: string[], made: string[], what: string): void {
  const dupes = at.filter((p, i) => at.indexOf(p) !== i)
  t.same(dupes, [], `${what}: no event stored twice`)
  const atSet = new Set(at)
  t.same(made.filter((p) => !atSet.has(p)), [], `${what}: every completed call is at the store`)
  t.same(at.length, made.length, `${what}: nothing at the store that was not a call (${at.length} vs ${made.length})`)
}

t.test('collector SIGKILLed and restarted during load: nothing lost, nothing doubled', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const dir = (await import('node:fs')).mkdtempSync(join((await import('node:os')).tmpdir(), 'lk-fault-'))
  const port = await freePort()
  const db = join(dir, 'audit.db')
  const cfg = writeYaml(join(dir, 'collector.yaml'), {
    version: 1,
    collector: { grpc: { host: '127.0.0.1', port }, http: null, store: { kind: 'sqlite', path: db }, sidecars: [{ id: id.id, token_sha256: sha256hex(id.token) }] },
  })
  let collector = await startChild(['collector', '-c', cfg], /collector listening/)
  t.teardown(() => collector.kill())
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port })
  const load = loadGenerator(() => s.sidecar.proxyUrl, upstream.origin, '/kill')
  // Each phase lasts until its calls are made, not for a fixed time: the load runs flat out, so
  // fixed sleeps made ~1,400 calls here (CPU in proportion to the time, none of it needed) and
  // proved no call was made in a phase at all.
  await until('acks before the kill', () => s.sink.stats.acked >= 100, 20_000)
  await collector.kill('SIGKILL')
  const atKill = s.sink.stats.acked
  const okAtKill = load.ok.length
  await until('calls while the collector is down', () => load.ok.length >= okAtKill + 150, 20_000)
  // Paced while the collector starts again (~0.5 s; flat out, ~600 calls more than any check needs).
  load.pace(10)
  const headAtRestart = s.sink.spool.lastSeq
  collector = await startChild(['collector', '-c', cfg], /collector listening/)
  load.pace(0)
  const okAtRestart = load.ok.length
  // The load goes on until what was spooled during the outage is acked, and past it.
  await until('the outage replayed under load', () => s.sink.stats.acked >= headAtRestart && load.ok.length >= okAtRestart + 100, 20_000)
  await load.stop()
  t.ok(load.ok.length > 50, `${load.ok.length} calls made`)
  t.ok(atKill > 0, `acked ${atKill} before the kill`)
  t.ok(headAtRestart > atKill, `spooled up to ${headAtRestart} while the collector was down (acked ${atKill})`)
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 15_000), 'everything acked after the restart')
  await s.close()
  await collector.kill('SIGTERM')
  const store = new SqliteAuditStore(db)
  t.teardown(() => store.close())
  sameSet(t, await pathsIn(store), load.ok, 'after collector SIGKILL')
  const v = await store.verify()
  t.same([v.ok, v.breaks], [true, []])
})

/** A TCP relay in front of Postgres that can be cut (the real server is shared; this is the only way to take it away). */
async function cuttableRelay(target: number): Promise<{ port: number; cut(): void; restore(): Promise<void>; close(): Promise<void> }> {
  const sockets = new Set<Socket>()
  let server: Server
  let port = 0
  const listen = async () => {
    server = createServer((client) => {
      const up = connect(target, '127.0.0.1')
      sockets.add(client).add(up)
      client.pipe(up).pipe(client)
      const end = () => {
        client.destroy()
        up.destroy()
        sockets.delete(client)
        sockets.delete(up)
      }
      client.on('error', end).on('close', end)
      up.on('error', end).on('close', end)
    })
    server.listen(port, '127.0.0.1')
    await once(server, 'listening')
    port = (server.address() as AddressInfo).port
  }
  await listen()
  const cut = () => {
    server.close()
    for (const s of sockets) s.destroy()
  }
  return { port, cut, restore: listen, close: async () => cut() }
}

t.test('the database unreachable for a while (Postgres): sidecars back off and replay', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const relay = await cuttableRelay(5432)
  t.teardown(() => relay.close())
  const schema = uniqueSchema('lk_fault')
  const store = new PostgresAuditStore({ url: PG_URL.replace(':5432', `:${relay.port}`), schema })
  await store.ensureReady()
  const id = sidecarIdentity()
  const c = await startTestCollector([id], { store })
  t.teardown(async () => {
    await c.close()
    const direct = new PostgresAuditStore({ url: PG_URL, schema })
    await direct.dropSchema()
    await direct.close()
    await store.close()
  })
  const s = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port })
  const load = loadGenerator(() => s.sidecar.proxyUrl, upstream.origin, '/db')
  await until('acks before the cut', () => s.sink.stats.acked >= 100, 20_000)
  relay.cut()
  // Spooled after the cut, an event reaches the database only through the relay: none may be acked
  // while it is away. (The bound was "fewer than 2,000 acked", more calls than the load makes in
  // the 1.2 s: it could not fail.)
  const headAtCut = s.sink.spool.lastSeq
  const okAtCut = load.ok.length
  // Paced while the database is away: calls throughout the 1.2 s, each spooled and retried, but
  // not the ~1,900 a flat-out load made (CPU no check needed); flat out again for the replay.
  load.pace(10)
  await sleep(1200)
  load.pace(0)
  t.ok(load.ok.length > okAtCut, `calls made while the database was away (${load.ok.length - okAtCut})`)
  t.ok(s.sink.stats.acked <= headAtCut, `nothing spooled after the cut was acked while the database was away (acked ${s.sink.stats.acked}, ${headAtCut} spooled at the cut)`)
  const headAtRestore = s.sink.spool.lastSeq
  await relay.restore()
  const okAtRestore = load.ok.length
  await until('the outage replayed under load', () => s.sink.stats.acked >= headAtRestore && load.ok.length >= okAtRestore + 100, 20_000)
  await load.stop()
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 20_000), 'everything acked once the database was back')
  t.match(s.logs.join(''), /audit stream to collector lost/)
  t.match(c.logs.join(''), /ingest batch not stored/)
  sameSet(t, await pathsIn(store), load.ok, 'after the database outage')
  const v = await store.verify()
  t.same([v.ok, v.breaks], [true, []])
  await s.close()
})

t.test('duplicate and overlapping batches: each event stored once, chain intact', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const client = ingestClient(c.grpcAddress)
  t.teardown(() => client.close())
  const all = seqEvents(1, 30)
  const pick = (from: number, to: number) => all.slice(from - 1, to)
  const call = client.ingest(authMetadata(id))
  const acks: IngestResponse[] = []
  call.on('data', (a: IngestResponse) => acks.push(a))
  // A sidecar sends in order and resends from its last ack: overlaps and repeats, never an
  // unseen sequence below what it already delivered (the collector refuses that: ingest.test.ts).
  for (const b of [pick(1, 10), pick(5, 15), pick(11, 20), pick(21, 30), pick(21, 30), [...pick(30, 30), ...pick(1, 1)]]) call.write({ sidecarId: id.id, events: b })
  call.end()
  await once(call, 'status')
  t.same(acks.map((a) => [a.ackedSequence, a.stored, a.duplicates]), [[10, 10, 0], [15, 5, 6], [20, 5, 5], [30, 10, 0], [30, 0, 10], [30, 0, 2]])
  const ids = (await c.store.eventsByAgent({ agent: AGENT, since: new Date(0) })).map((e) => e.event.id).sort()
  t.same(ids, all.map((e) => e.event!.id).sort())
  t.same(await c.store.verify(), { ok: true, checked: 30, sidecars: 1, breaks: [] })
})

t.test('a collector that echoes the bearer token in its error: the log quotes none of it, in any spelling', async (t) => {
  // The sidecar sends its collector token as a bearer; whatever answers logs its gRPC error text.
  let spell: (s: string) => string = (s) => s
  const { port, close } = await startBearerEcho(AuditIngestServiceService, 'ingest', () => spell)
  t.teardown(close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  for (const [name, spelling] of Object.entries(SPELLINGS)) {
    spell = spelling
    const id = sidecarIdentity()
    const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port })
    const lost = () => s.logs.filter((l) => l.includes('audit stream to collector lost'))
    const deadline = Date.now() + 3000
    while (lost().length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    await s.close()
    t.ok(lost().length > 0, `${name}: the lost stream was logged`)
    t.ok(lost().every((l) => l.includes('its error text quoted a credential the sidecar sent and is not repeated')), `${name}: the log says the text is withheld`)
    const quoted = spelling(id.token)
    t.notOk(s.logs.some((l) => holds(l, quoted) || l.includes(id.token)), `${name}: not in the log`)
  }
})
