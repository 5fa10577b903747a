// Collector ingest rate, SQLite and PostgreSQL: events/s stored and acked, end to end over real
// gRPC (4 sidecar streams, batches of 1000, 4 batches in flight each, acks only after commit),
// plus the store alone (append() in a loop) to show where the time goes.
// Run: npm run build && node bench/collector-ingest.mjs   (BENCH_EVENTS=200000 by default)
// Targets (issue 5): SQLite >= 50,000 events/s, Postgres >= 20,000 events/s.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir, cpus } from 'node:os'
import { join } from 'node:path'
import { createHash, randomUUID } from 'node:crypto'
import { credentials, Metadata, makeGenericClientConstructor } from '@grpc/grpc-js'
import { BinaryWriter } from '@bufbuild/protobuf/wire'
import { AuditIngestServiceService, SequencedEvent, Action } from '../dist/protos/gen/latchkey/v1/audit.js'
import { startCollector } from '../dist/collector/collector.js'
import { validateCollectorConfig } from '../dist/collector/config.js'
import { SqliteAuditStore } from '../dist/collector/store/sqlite.js'
import { PostgresAuditStore } from '../dist/collector/store/postgres.js'

const EVENTS = Number(process.env.BENCH_EVENTS ?? 200_000)
const SIDECARS = 4
const BATCH = 1000
const WINDOW = 4
const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'

function event(i, agent) {
  return {
    id: randomUUID(),
    timeUnixMs: Date.now(),
    delegation: { user: 'user:alice', agent, task: 'task-1' },
    call: { method: 'GET', scheme: 'https', host: 'api.github.com', port: 443, path: `/repos/acme/widgets/issues/${i}`, address: '140.82.112.6', status: 200, bytesIn: 0, bytesOut: 1834, durationMs: 12.3, upstreamMs: 11.9, traceId: '', via: 'absolute' },
    decision: { action: Action.ACTION_ALLOW, rule: 'github-read', reason: '', error: '' },
    credential: { provider: 'broker', audience: 'https://api.github.com', scopes: ['repo:read'], jti: randomUUID(), tokenSha256: createHash('sha256').update(String(i)).digest() },
    process: undefined,
  }
}

/** Pre-encoded IngestRequest bytes per sidecar, as the sidecar's sink sends them. */
function batchesFor(sidecar, n) {
  const out = []
  for (let from = 1; from <= n; from += BATCH) {
    const w = new BinaryWriter().uint32(10).string(sidecar)
    for (let s = from; s < from + BATCH && s <= n; s++) w.uint32(18).bytes(SequencedEvent.encode({ sequence: s, event: event(s, `agent:bench:prod:${sidecar}`) }).finish())
    out.push({ bytes: Buffer.from(w.finish()), last: Math.min(from + BATCH - 1, n) })
  }
  return out
}

const RawClient = makeGenericClientConstructor({ ingest: { ...AuditIngestServiceService.ingest, requestSerialize: (b) => b } }, 'latchkey.v1.AuditIngestService')

function stream(address, sidecar, token, batches) {
  return new Promise((resolve, reject) => {
    const client = new RawClient(address, credentials.createInsecure())
    const md = new Metadata()
    md.set('x-latchkey-sidecar', sidecar)
    md.set('authorization', `Bearer ${token}`)
    const call = client.ingest(md)
    let next = 0
    let inflight = 0
    const send = () => {
      while (inflight < WINDOW && next < batches.length) {
        call.write(batches[next++].bytes)
        inflight++
      }
      if (next === batches.length && inflight === 0) call.end()
    }
    call.on('data', (ack) => {
      inflight--
      if (ack.ackedSequence === batches[batches.length - 1].last && next === batches.length && inflight === 0) call.end()
      else send()
    })
    call.on('error', (e) => reject(new Error(`${sidecar}: ${e.details}`)))
    call.on('status', () => {
      client.close()
      resolve()
    })
    send()
  })
}

async function grpcRun(storeConfig, store) {
  const ids = Array.from({ length: SIDECARS }, (_, i) => ({ id: `bench-sc-${i}-${randomUUID().slice(0, 6)}`, token: randomUUID() }))
  const config = validateCollectorConfig({
    version: 1,
    collector: { grpc: { host: '127.0.0.1', port: 0 }, http: null, store: storeConfig, sidecars: ids.map((s) => ({ id: s.id, token_sha256: createHash('sha256').update(s.token).digest('hex') })) },
    log: { level: 'warn' },
  })
  const per = Math.ceil(EVENTS / SIDECARS)
  const prepared = ids.map((s) => batchesFor(s.id, per))
  const c = await startCollector(config, { store })
  const t0 = performance.now()
  await Promise.all(ids.map((s, i) => stream(c.grpcAddress, s.id, s.token, prepared[i])))
  const secs = (performance.now() - t0) / 1000
  const stored = c.ingest.stats.stored
  await c.close()
  return { stored, secs, rate: Math.round(stored / secs) }
}

async function storeRun(store) {
  const sidecar = `bench-direct-${randomUUID().slice(0, 6)}`
  const batches = []
  for (let from = 1; from <= EVENTS; from += BATCH) {
    const b = []
    for (let s = from; s < from + BATCH && s <= EVENTS; s++) b.push({ sequence: s, event: event(s, 'agent:bench:prod:direct') })
    batches.push(b)
  }
  const t0 = performance.now()
  for (const b of batches) await store.append(sidecar, b)
  const secs = (performance.now() - t0) / 1000
  return { stored: EVENTS, secs, rate: Math.round(EVENTS / secs) }
}

const fmt = (r) => `${r.rate.toLocaleString('en-US').padStart(8)} events/s  (${r.stored} events in ${r.secs.toFixed(2)} s)`
console.log(`collector ingest: ${EVENTS} events, ${cpus().length} CPUs (${cpus()[0]?.model ?? '?'}), Node ${process.version}`)

const dir = mkdtempSync(join(tmpdir(), 'lk-bench-collector-'))
try {
  const sqlitePath = join(dir, 'grpc.db')
  const sqliteStore = new SqliteAuditStore(sqlitePath)
  const sg = await grpcRun({ kind: 'sqlite', path: sqlitePath }, sqliteStore)
  const sv = await sqliteStore.verify()
  await sqliteStore.close()
  console.log(`sqlite   gRPC ingest  ${fmt(sg)}  target >= 50,000  ${sg.rate >= 50_000 ? 'MET' : 'NOT MET'}  chain ${sv.ok ? 'verified' : 'BROKEN'}`)
  const direct = new SqliteAuditStore(join(dir, 'direct.db'))
  console.log(`sqlite   store only   ${fmt(await storeRun(direct))}`)
  await direct.close()

  const schema = `lk_bench_${process.pid}`
  const pgStore = new PostgresAuditStore({ url: PG_URL, schema, poolSize: SIDECARS })
  await pgStore.ensureReady()
  try {
    const pgRes = await grpcRun({ kind: 'postgres', url: PG_URL, schema }, pgStore)
    const pv = await pgStore.verify()
    console.log(`postgres gRPC ingest  ${fmt(pgRes)}  target >= 20,000  ${pgRes.rate >= 20_000 ? 'MET' : 'NOT MET'}  chain ${pv.ok ? 'verified' : 'BROKEN'}`)
    console.log(`postgres store only   ${fmt(await storeRun(pgStore))}`)
  } finally {
    await pgStore.dropSchema()
    await pgStore.close()
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
}
