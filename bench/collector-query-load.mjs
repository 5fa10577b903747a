// Not a test: a measurement. /healthz latency and gRPC ingest throughput of a collector (a child
// process, SQLite store holding QUERY_EVENTS events of one agent) while 3 clients each fetch that
// agent's whole hour (paging with `next` when the API gives one), and while `audit verify` runs.
// Run: npm run build && npm run build:test && node bench/collector-query-load.mjs > out.txt
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createHash, randomUUID } from 'node:crypto'
import { credentials, Metadata, makeGenericClientConstructor } from '@grpc/grpc-js'
import { BinaryWriter } from '@bufbuild/protobuf/wire'
import { request } from 'undici'

// LK_ROOT: another checkout's build to measure (the code before a change, say); this one by default.
const root = process.env.LK_ROOT ?? new URL('..', import.meta.url).pathname
const { AuditIngestServiceService, SequencedEvent } = await import(join(root, 'dist/protos/gen/latchkey/v1/audit.js'))
const { SqliteAuditStore } = await import(join(root, 'dist/collector/store/sqlite.js'))
const { Action } = await import(join(root, 'dist/protos/gen/latchkey/v1/audit.js'))

function makeEvent({ agent, ts = Date.now(), path = '/v1/things' }) {
  return {
    id: randomUUID(),
    timeUnixMs: ts,
    delegation: { user: 'user:alice', agent, task: 'task-1' },
    call: { method: 'GET', scheme: 'https', host: 'api.example.com', port: 443, path, address: '93.184.216.34', status: 200, bytesIn: 10, bytesOut: 200, durationMs: 1.5, upstreamMs: 1.2, traceId: '', via: 'absolute' },
    decision: { action: Action.ACTION_ALLOW, rule: 'allow-api', reason: '', error: '' },
    credential: undefined,
    process: undefined,
  }
}

const N = Number(process.env.QUERY_EVENTS ?? 100_000)
const AGENT = 'agent:load:prod:1'
const dir = mkdtempSync(join(tmpdir(), 'lk-measure-'))
const db = join(dir, 'audit.db')
const store = new SqliteAuditStore(db)
const now = Date.now()
for (let from = 1; from <= N; from += 1000) {
  const batch = []
  for (let s = from; s < from + 1000 && s <= N; s++) batch.push({ sequence: s, event: makeEvent({ agent: AGENT, ts: now - 1_800_000 + Math.floor((s * 1_700_000) / N), path: `/repos/acme/widgets/issues/${s}` }) })
  await store.append('load-sidecar', batch)
}
await store.close()

const token = 'measure-token'
const grpcPort = 20000 + Math.floor(Math.random() * 20000)
const httpPort = grpcPort + 1
writeFileSync(
  join(dir, 'collector.yaml'),
  `version: 1\ncollector:\n  grpc: { host: 127.0.0.1, port: ${grpcPort} }\n  http: { host: 127.0.0.1, port: ${httpPort} }\n  store: { kind: sqlite, path: ${db} }\n  sidecars: [{ id: ingest-1, token_sha256: ${createHash('sha256').update(token).digest('hex')} }]\nlog: { level: warn }\n`,
)
const child = spawn(process.execPath, [join(root, 'dist/bin/latchkey.js'), 'collector', '-c', join(dir, 'collector.yaml')], { stdio: ['ignore', 'ignore', 'inherit'] })
const base = `http://127.0.0.1:${httpPort}`
for (;;) {
  try {
    if ((await request(`${base}/healthz`)).statusCode === 200) break
  } catch {
    await new Promise((r) => setTimeout(r, 100))
  }
}
const rss = () => Number(/VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))[1]) / 1024

// gRPC ingest: one stream, batches of 100, up to 4 in flight, until stopped.
const RawClient = makeGenericClientConstructor({ ingest: { ...AuditIngestServiceService.ingest, requestSerialize: (b) => b } }, 'latchkey.v1.AuditIngestService')
let seq = 0
function ingest(stop) {
  return new Promise((resolve, reject) => {
    const client = new RawClient(`127.0.0.1:${grpcPort}`, credentials.createInsecure())
    const md = new Metadata()
    md.set('x-latchkey-sidecar', 'ingest-1')
    md.set('authorization', `Bearer ${token}`)
    const call = client.ingest(md)
    let inflight = 0
    let acked = 0
    const started = Date.now()
    const send = () => {
      while (inflight < 4 && !stop.done) {
        const w = new BinaryWriter().uint32(10).string('ingest-1')
        for (let i = 0; i < 100; i++) w.uint32(18).bytes(SequencedEvent.encode({ sequence: ++seq, event: makeEvent({ agent: 'agent:ingest:prod:1' }) }).finish())
        call.write(Buffer.from(w.finish()))
        inflight++
      }
      if (stop.done && inflight === 0) call.end()
    }
    call.on('data', () => {
      inflight--
      acked += 100
      send()
    })
    call.on('error', (e) => reject(new Error(e.details)))
    call.on('status', () => {
      client.close()
      resolve(acked / ((Date.now() - started) / 1000))
    })
    send()
  })
}

async function healthz(stop) {
  const lat = []
  while (!stop.done) {
    const t0 = performance.now()
    // A connection of its own each time: a kept-alive one can be closed under it by a server that was stalled.
    await (await request(`${base}/healthz`, { reset: true })).body.dump()
    lat.push(performance.now() - t0)
    await new Promise((r) => setTimeout(r, 50))
  }
  lat.sort((a, b) => a - b)
  return { p50: lat[Math.floor(lat.length / 2)], max: lat[lat.length - 1], samples: lat.length }
}

/** Every event of the agent in the last hour, paging with `next` if the API offers it. */
async function fetchAll() {
  let events = 0
  let pages = 0
  let cursor = null
  for (;;) {
    const q = new URLSearchParams({ agent: AGENT, since: '1h', limit: '100000' })
    if (cursor) q.set('cursor', cursor)
    const r = await request(`${base}/v1/events?${q}`)
    if (r.statusCode === 503) {
      await r.body.dump()
      await new Promise((res) => setTimeout(res, 1000 * Number(r.headers['retry-after'] ?? 1)))
      continue
    }
    const body = await r.body.json()
    events += body.count
    pages++
    if (!body.next) return { events, pages }
    cursor = body.next
  }
}

async function phase(name, work) {
  const stop = { done: false }
  const h = healthz(stop)
  const i = ingest(stop)
  const t0 = performance.now()
  const result = await work()
  const elapsed = performance.now() - t0
  stop.done = true
  const [health, rate] = await Promise.all([h, i])
  console.log(
    `${name}: work ${(elapsed / 1000).toFixed(2)} s ${JSON.stringify(result)}; /healthz p50 ${health.p50.toFixed(1)} ms, max ${health.max.toFixed(0)} ms (${health.samples} samples); ingest ${Math.round(rate)} events/s; collector peak RSS ${rss().toFixed(0)} MB`,
  )
}

await phase('idle (3 s)', () => new Promise((r) => setTimeout(() => r('-'), 3000)))
await phase('3 concurrent fetch-all queries', () => Promise.all([fetchAll(), fetchAll(), fetchAll()]))
await phase('audit verify', async () => {
  const r = await request(`${base}/v1/verify`)
  const v = await r.body.json()
  return { status: r.statusCode, checked: v.checked }
})
child.kill('SIGTERM')
await new Promise((r) => child.on('exit', r))
rmSync(dir, { recursive: true, force: true })

