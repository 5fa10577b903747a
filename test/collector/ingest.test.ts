// The gRPC ingest server against real gRPC clients: acks after the commit, dedupe, and refusals.
import t from 'tap'
import { once } from 'node:events'
import { Metadata, status, type ServiceError } from '@grpc/grpc-js'
import type { IngestResponse, IngestRequest } from '../../protos/gen/latchkey/v1/audit.js'
import type { ClientDuplexStream } from '@grpc/grpc-js'
import { seqEvents, type EventOpts } from './events.js'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'
import type { SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import { authMetadata, ingestClient, sha256hex, sidecarIdentity, startTestCollector } from './collector-helpers.js'

const AGENT = 'agent:summarizer:test:a1'

/** Opens a stream, sends the batches one by one (each after the previous ack), returns the acks or the error. */
async function exchange(address: string, md: Metadata, batches: IngestRequest[]): Promise<{ acks: IngestResponse[]; error: ServiceError | null }> {
  const client = ingestClient(address)
  const call: ClientDuplexStream<IngestRequest, IngestResponse> = client.ingest(md)
  const acks: IngestResponse[] = []
  let error: ServiceError | null = null
  call.on('error', (e: ServiceError) => (error = e))
  const ended = new Promise<void>((resolve) => {
    call.on('status', () => resolve())
  })
  call.on('data', (a: IngestResponse) => acks.push(a))
  for (const b of batches) {
    const before = acks.length
    call.write(b)
    while (acks.length === before && !error) await Promise.race([once(call, 'data'), ended])
    if (error) break
  }
  call.end()
  await ended
  client.close()
  return { acks, error }
}

t.test('an unseen sequence below the chain head is refused as INVALID_ARGUMENT, never stored', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  // A forged event 20 hours old, written into a gap of the chain with the sidecar's own token.
  const r = await exchange(c.grpcAddress, authMetadata(s), [
    { sidecarId: s.id, events: seqEvents(1, 10) },
    { sidecarId: s.id, events: seqEvents(551, 560) },
    { sidecarId: s.id, events: seqEvents(300, 300, () => ({ ts: Date.now() - 20 * 3_600_000 })) },
  ])
  t.same(r.acks.map((a) => a.ackedSequence), [10, 560])
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.match(r.error?.details, /sequence 300 was never stored but the chain already holds sequence 560/)
  const seqs = (await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })).map((e) => e.sequence)
  t.notOk(seqs.includes(300), 'the backdated event is not on record')
})

t.test('an event dated past the allowed clock skew is refused, naming the time and the knob; past times are taken', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s], { raw: { grpc: { host: '127.0.0.1', port: 0, max_clock_skew_ms: 60_000 } } })
  t.teardown(() => c.close())
  const in2076 = Date.parse('2076-01-01T00:00:00Z')
  const r = await exchange(c.grpcAddress, authMetadata(s), [
    { sidecarId: s.id, events: seqEvents(1, 2, (n) => ({ ts: Date.now() - n * 86_400_000 })) },
    { sidecarId: s.id, events: [...seqEvents(3, 3), ...seqEvents(4, 4, () => ({ ts: in2076 }))] },
  ])
  t.same(r.acks.map((a) => a.ackedSequence), [2], 'days-old events from a late spool are stored')
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.match(r.error?.details, /^sequence 4 is dated 2076-01-01T00:00:00\.000Z, \d+ s ahead of the collector's clock \(collector\.grpc\.max_clock_skew_ms is 60000\)/)
  t.equal((await c.store.verify()).checked, 2, 'nothing of the refused batch was stored')
  const near = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: seqEvents(3, 3, () => ({ ts: Date.now() + 30_000 })) }])
  t.same([near.error, near.acks.map((a) => a.ackedSequence)], [null, [3]], 'within the skew: stored')
  const def = await startTestCollector([s])
  t.teardown(() => def.close())
  t.equal(def.config.collector.grpc.max_clock_skew_ms, 300_000, 'five minutes by default')
  const soon = await exchange(def.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: seqEvents(1, 1, () => ({ ts: Date.now() + 10 * 60_000 })) }])
  t.equal(soon.error?.code, status.INVALID_ARGUMENT)
})

t.test('a megabyte field is refused as INVALID_ARGUMENT naming the field', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  const r = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: seqEvents(1, 3, (n) => ({ path: n === 2 ? '/' + 'a'.repeat(1024 * 1024) : '/ok' })) }])
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.equal(r.error?.details, `sidecar ${s.id}: sequence 2: call.path is ${1024 * 1024 + 1} bytes, more than 65536`)
  t.equal((await c.store.verify()).checked, 0)
})

t.test('acks the highest sequence once stored; resends are deduplicated', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  const seen: number[] = []
  // When each ack arrives, the events it covers must already be queryable.
  const client = ingestClient(c.grpcAddress)
  t.teardown(() => client.close())
  const call = client.ingest(authMetadata(s))
  // Asked for when each ack arrives (SQLite answers from a reader thread, so an answer may come later).
  const queried: Promise<number>[] = []
  call.on('data', (a: IngestResponse) => {
    seen.push(a.ackedSequence)
    queried.push(c.store.eventsByAgent({ agent: AGENT, since: new Date(0) }).then((e) => e.length))
  })
  call.write({ sidecarId: s.id, events: seqEvents(1, 100) })
  call.write({ sidecarId: s.id, events: seqEvents(50, 150) })
  call.end()
  await once(call, 'status')
  const counts = await Promise.all(queried)
  t.same(seen, [100, 150])
  t.same(counts[0]! >= 100 && counts[1] === 150, true, `stored count at each ack: ${counts.join(',')}`)
  t.same(c.ingest.stats, { batches: 2, stored: 150, duplicates: 51, refused: 0 })
  t.ok((await c.store.verify()).ok)
})

t.test('an unknown sidecar is refused and nothing it sent is stored', async (t) => {
  const known = sidecarIdentity()
  const c = await startTestCollector([known])
  t.teardown(() => c.close())
  const stranger = sidecarIdentity('sidecar-stranger')
  const r = await exchange(c.grpcAddress, authMetadata(stranger), [{ sidecarId: stranger.id, events: seqEvents(1, 5) }])
  t.equal(r.error?.code, status.UNAUTHENTICATED)
  t.equal(r.error?.details, 'sidecar "sidecar-stranger" is not known to this collector')
  t.same(r.acks, [])
  t.equal((await c.store.verify()).checked, 0)
  t.equal(c.ingest.stats.refused, 1)
})

t.test('a wrong token is refused, and no token appears in the error or the log', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  const impostor = { id: s.id, token: sidecarIdentity().token }
  const r = await exchange(c.grpcAddress, authMetadata(impostor), [{ sidecarId: s.id, events: seqEvents(1, 5) }])
  t.equal(r.error?.code, status.UNAUTHENTICATED)
  t.equal(r.error?.details, `sidecar "${s.id}": token does not match`)
  const noToken = new Metadata()
  noToken.set('x-latchkey-sidecar', s.id)
  const r2 = await exchange(c.grpcAddress, noToken, [{ sidecarId: s.id, events: seqEvents(1, 5) }])
  t.equal(r2.error?.details, `sidecar "${s.id}": missing bearer token`)
  t.equal((await c.store.verify()).checked, 0)
  const logs = c.logs.join('')
  t.match(logs, /ingest stream refused/)
  t.notMatch(logs, impostor.token)
  t.notMatch(logs, s.token)
  t.notMatch(logs, /LKCANARY/)
})

t.test("a batch naming another sidecar is refused on the authenticated stream", async (t) => {
  const a = sidecarIdentity()
  const b = sidecarIdentity()
  const c = await startTestCollector([a, b])
  t.teardown(() => c.close())
  const r = await exchange(c.grpcAddress, authMetadata(a), [
    { sidecarId: a.id, events: seqEvents(1, 3) },
    { sidecarId: b.id, events: seqEvents(1, 3, undefined, b.id) },
  ])
  t.same(r.acks.map((x) => x.ackedSequence), [3])
  t.equal(r.error?.code, status.PERMISSION_DENIED)
  t.equal(r.error?.details, `batch names sidecar "${b.id}" but the stream authenticated as "${a.id}"`)
  const inv = await c.store.inventory()
  t.same(inv.sidecars.map((x) => [x.sidecar, x.events]), [[a.id, 3]])
})

t.test('a batch naming a megabyte-long sidecar is refused with a bounded status and log line', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  const long = 'x'.repeat(1_000_000)
  const r = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: long, events: seqEvents(1, 1) }])
  t.equal(r.error?.code, status.PERMISSION_DENIED, 'the client sees the refusal (a megabyte status never reached it)')
  t.equal(r.error?.details, `batch names sidecar "${'x'.repeat(200)}… (1000000 characters)" but the stream authenticated as "${s.id}"`)
  const longest = Math.max(...c.logs.join('').split('\n').map((l) => l.length))
  t.ok(longest < 2000, `every log line is short (longest ${longest} characters)`)
  t.equal((await c.store.verify()).checked, 0)
})

t.test('a batch of more events than a sidecar may send is refused before any is decoded', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  // Tiny events: 10,001 of them fit well inside max_batch_bytes.
  const tiny = (from: number, to: number) =>
    // Partial events on purpose (protobuf fields may be absent on the wire): the smallest a batch can carry.
    Array.from({ length: to - from + 1 }, (_, i) => ({ sequence: from + i, event: { id: `e${from + i}`, timeUnixMs: Date.now(), delegation: { user: '', agent: AGENT, task: '' } } })) as unknown as SequencedEvent[]
  const r = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: tiny(1, 10_001) }])
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.equal(r.error?.details, "batch of 10001 events: at most 10000 per batch (a sidecar's audit.collector.batch_events cannot be more)")
  t.equal((await c.store.verify()).checked, 0)
  const ok = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: tiny(1, 10_000) }])
  t.same([ok.error, ok.acks.map((a) => a.ackedSequence)], [null, [10_000]], 'the largest batch a sidecar sends is stored')
})

t.test("with collector.sidecars[].agents, a sidecar cannot report another agent's calls", async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s], { raw: { sidecars: [{ id: s.id, token_sha256: sha256hex(s.token), agents: ['agent:summarizer:test:*', 'agent:helper:prod:h-1'] }] } })
  t.teardown(() => c.close())
  const as = (agent: string) => () => ({ agent })
  const r = await exchange(c.grpcAddress, authMetadata(s), [
    { sidecarId: s.id, events: [...seqEvents(1, 2), ...seqEvents(3, 3, as('agent:helper:prod:h-1'))] },
    { sidecarId: s.id, events: [...seqEvents(4, 4), ...seqEvents(5, 5, as('agent:alpha:dev:1'))] },
  ])
  t.same(r.acks.map((x) => x.ackedSequence), [3], 'its own agents, by prefix and exactly, are stored')
  t.equal(r.error?.code, status.PERMISSION_DENIED)
  t.equal(r.error?.details, `sequence 5 names agent "agent:alpha:dev:1", which sidecar "${s.id}" may not report (collector.sidecars[].agents)`)
  const inv = await c.store.inventory()
  t.same(inv.sidecars.map((x) => [x.sidecar, x.events]), [[s.id, 3]], 'the batch holding a foreign agent was refused whole, so the sidecar keeps it')
  t.notOk(inv.agents.some((a) => a.agent === 'agent:alpha:dev:1'), "the forged agent has no calls in the trail")
})

t.test('a malformed batch is refused as INVALID_ARGUMENT naming the event', async (t) => {
  const s = sidecarIdentity()
  const c = await startTestCollector([s])
  t.teardown(() => c.close())
  const r = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: [{ sequence: 0, event: seqEvents(1, 1)[0]!.event }] }])
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.match(r.error?.details, /sequence 0 is not a positive integer/)
  for (const ts of [0, -5]) {
    const before = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: seqEvents(1, 1, () => ({ ts })) }])
    t.equal(before.error?.code, status.INVALID_ARGUMENT, `time ${ts}: refused`)
    t.match(before.error?.details, /sequence 1 has no time \(time_unix_ms must be a positive epoch time\)/)
  }
  t.same((await c.store.inventory()).agents, [], 'nothing the inventory would count and a query never return')
})

t.test('a port outside 0..65535 or an action the protocol does not define is refused as a bad batch, on both stores', async (t) => {
  const { request } = await import('undici')
  const { PostgresAuditStore } = await import('../../collector/store/postgres.js')
  const { PG_URL, uniqueSchema } = await import('./events.js')
  for (const kind of ['sqlite', 'postgres'] as const) {
    const store = kind === 'postgres' ? new PostgresAuditStore({ url: PG_URL, schema: uniqueSchema() }) : undefined
    const s = sidecarIdentity()
    const c = await startTestCollector([s], { store })
    t.teardown(async () => {
      await c.close()
      if (store) {
        await store.dropSchema()
        await store.close()
      }
    })
    // The sidecar sends 0 for a call with no port (a refusal before one was known), and one of
    // Action's four values; a uint32 port and an int32 action can carry anything else.
    const ok = await exchange(c.grpcAddress, authMetadata(s), [
      { sidecarId: s.id, events: [...seqEvents(1, 1, () => ({ port: 0, action: Action.ACTION_UNSPECIFIED })), ...seqEvents(2, 2, () => ({ port: 65535, action: Action.ACTION_REPORT }))] },
    ])
    t.same([ok.error, ok.acks.map((a) => a.ackedSequence)], [null, [2]], `${kind}: port 0 and 65535, actions 0 and 3 are stored`)
    const bad: Array<[string, EventOpts, string]> = [
      ['port 65536', { port: 65536 }, 'call.port 65536 is not a TCP port (1 to 65535, or 0 for none)'],
      ['port 2^32-1', { port: 4294967295 }, 'call.port 4294967295 is not a TCP port (1 to 65535, or 0 for none)'],
      ['action 4', { action: 4 as Action }, 'decision.action 4 is not an action the protocol defines (0 to 3)'],
      ['action -1', { action: -1 as Action }, 'decision.action -1 is not an action the protocol defines (0 to 3)'],
      ['action 40000', { action: 40000 as Action }, 'decision.action 40000 is not an action the protocol defines (0 to 3)'],
    ]
    // Each under a sequence of its own, so each is judged on its own (not as a resend of the last).
    for (const [i, [what, o, why]] of bad.entries()) {
      const seq = 4 + i
      const r = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: [...seqEvents(3, 3), ...seqEvents(seq, seq, () => o)] }])
      t.equal(r.error?.code, status.INVALID_ARGUMENT, `${kind}, ${what}: INVALID_ARGUMENT, not the UNAVAILABLE a sidecar retries for ever`)
      t.equal(r.error?.details, `sidecar ${s.id}: sequence ${seq}: ${why}`, `${kind}, ${what}: the refusal names the field`)
    }
    t.equal((await c.store.verify()).checked, 2, `${kind}: nothing of the refused batches was stored`)
    const text = await (await request(`${c.httpUrl}/metrics`)).body.text()
    t.match(text, /^latchkey_collector_refusals_total\{reason="bad_batch"\} 5$/m, `${kind}: each refusal counted as a bad batch`)
  }
})

t.test('on PostgreSQL, a NUL in an indexed field is INVALID_ARGUMENT, not the UNAVAILABLE a sidecar retries for ever', async (t) => {
  const { PostgresAuditStore } = await import('../../collector/store/postgres.js')
  const { PG_URL, uniqueSchema } = await import('./events.js')
  const store = new PostgresAuditStore({ url: PG_URL, schema: uniqueSchema() })
  const s = sidecarIdentity()
  const c = await startTestCollector([s], { store })
  t.teardown(async () => {
    await c.close()
    await store.dropSchema()
    await store.close()
  })
  const r = await exchange(c.grpcAddress, authMetadata(s), [
    { sidecarId: s.id, events: seqEvents(1, 2) },
    { sidecarId: s.id, events: seqEvents(3, 3, () => ({ host: 'api.example.com\u0000' })) },
  ])
  t.same(r.acks.map((a) => a.ackedSequence), [2])
  t.equal(r.error?.code, status.INVALID_ARGUMENT)
  t.equal(r.error?.details, `sidecar ${s.id}: sequence 3: call.host contains a NUL character`)
  const far = await exchange(c.grpcAddress, authMetadata(s), [{ sidecarId: s.id, events: seqEvents(3, 3, () => ({ ts: 9e15 })) }])
  t.equal(far.error?.code, status.INVALID_ARGUMENT)
  t.match(far.error?.details, /sequence 3 has a time beyond year 275760/)
  t.same((await store.verify()).checked, 2, 'only the good batch was stored')
})

t.test('no ack before the commit: a slow store holds the ack back', async (t) => {
  const { SqliteAuditStore } = await import('../../collector/store/sqlite.js')
  const { mkdtempSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const { join } = await import('node:path')
  const real = new SqliteAuditStore(join(mkdtempSync(join(tmpdir(), 'lk-slow-')), 'a.db'))
  const committed: Array<[number, number]> = []
  // The real store, with each commit made to wait 150 ms (the fault: a slow disk or database).
  const slow = Object.assign(Object.create(real) as typeof real, {
    append: async (sidecar: string, events: Parameters<typeof real.append>[1]) => {
      await new Promise((r) => setTimeout(r, 150))
      const r = await real.append(sidecar, events)
      committed.push([r.highest, performance.now()])
      return r
    },
  })
  const s = sidecarIdentity()
  const c = await startTestCollector([s], { store: slow })
  t.teardown(async () => {
    await c.close()
    await real.close()
  })
  const client = ingestClient(c.grpcAddress)
  t.teardown(() => client.close())
  const call = client.ingest(authMetadata(s))
  const acked: Array<[number, number]> = []
  call.on('data', (a: IngestResponse) => acked.push([a.ackedSequence, performance.now()]))
  const sent = performance.now()
  call.write({ sidecarId: s.id, events: seqEvents(1, 10) })
  call.write({ sidecarId: s.id, events: seqEvents(11, 20) })
  call.end()
  await once(call, 'status')
  t.same(acked.map((a) => a[0]), [10, 20])
  t.same(committed.map((c) => c[0]), [10, 20])
  for (let i = 0; i < 2; i++) t.ok(acked[i]![1] >= committed[i]![1], `ack ${acked[i]![0]} arrived after its commit`)
  t.ok(acked[1]![1] - sent >= 300, 'the second batch waited for the first: one batch at a time per stream')
})
