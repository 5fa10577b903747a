// A collector that stops answering without closing: a half-open connection (a NAT or firewall
// that forgot it, a black-holed route). No FIN or RST ever comes, so only the sink's own
// liveness checks (HTTP/2 pings, an ack deadline) can tell; it must reconnect and deliver,
// not wait for ever with its spool filling. Real collector; the black hole is a real TCP relay.
import t from 'tap'
import { createServer, connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { sidecarEvent, sidecarIdentity, startTestCollector, testSink } from './collector-helpers.js'

/** Relays to `target`; freeze() stops every connection open now, in both directions, without closing it. */
async function blackHoleRelay(target: number) {
  const open: Socket[] = []
  let connections = 0
  const server = createServer((client) => {
    connections++
    const upstream = connect(target, '127.0.0.1')
    open.push(client, upstream)
    client.on('error', () => {})
    upstream.on('error', () => {})
    client.on('data', (d) => void (!frozen.has(client) && upstream.write(d)))
    upstream.on('data', (d) => void (!frozen.has(client) && client.write(d)))
  })
  const frozen = new Set<Socket>()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return {
    port: (server.address() as { port: number }).port,
    connections: () => connections,
    freeze: () => open.forEach((s) => frozen.add(s)),
    close: () => {
      open.forEach((s) => s.destroy())
      server.close()
    },
  }
}

const event = (n: number, o: Parameters<typeof sidecarEvent>[1] = {}) => sidecarEvent(n, o)

t.test('a collector connection gone silent (no FIN, no RST): the sink notices, reconnects and delivers', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const relay = await blackHoleRelay(c.grpcPort)
  t.teardown(relay.close)
  const logs: string[] = []
  const sink = testSink(id, `127.0.0.1:${relay.port}`, {
    closeTimeoutMs: 500,
    liveness: { keepaliveMs: 300, keepaliveTimeoutMs: 300, ackTimeoutMs: 1500 },
    onLog: (_level, fields, msg) => logs.push(`${msg} ${JSON.stringify(fields)}`),
  })
  t.teardown(() => sink.close())
  for (let i = 1; i <= 5; i++) sink.write(event(i))
  t.ok(await sink.waitForAck(5, 5000), 'the first five acked through the relay')
  t.equal(relay.connections(), 1)
  relay.freeze()
  for (let i = 6; i <= 10; i++) sink.write(event(i))
  const started = Date.now()
  t.ok(await sink.waitForAck(10, 8000), `the next five acked after the connection went silent (${Date.now() - started} ms)`)
  t.ok(relay.connections() >= 2, 'over a new connection')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 100 })
  t.same(stored.map((e) => e.event.call?.path).sort(), Array.from({ length: 10 }, (_, i) => `/call/${i + 1}`).sort(), 'all ten stored, once each')
})

t.test('only records already on disk are sent: the collector never holds a sequence a power loss could take back', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const sink = testSink(id, c.grpcAddress, { segmentBytes: 16 * 1024 })
  t.teardown(() => sink.close())
  // A power loss cannot be caused here; what it would take back is what was not yet synced, so
  // the spool says how far it has synced, and every ack is held against that.
  t.type(sink.spool.syncedSeq, 'number', 'the spool knows how far it has synced')
  let samples = 0
  let ahead = 0
  // Events every millisecond for a second and a half, across segment rotations; the ack is
  // compared with what was synced each time.
  const until = Date.now() + 1500
  let n = 0
  while (Date.now() < until) {
    sink.write(event(++n))
    await new Promise((r) => setTimeout(r, 1))
    samples++
    if (sink.stats.acked > sink.spool.syncedSeq) ahead++
  }
  t.ok(await sink.waitForAck(n, 5000), `all ${n} acked in the end`)
  t.ok(sink.stats.acked > 0 && samples > 100)
  t.equal(ahead, 0, `in ${samples} samples the collector never had a sequence the spool had not synced`)
})

t.test('an event with fields past the collector limits is cut to them, not resent for ever', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const sink = testSink(id, c.grpcAddress)
  t.teardown(() => sink.close())
  // What an agent can make the sidecar record: a 4,879-character host name (as curl sends one),
  // a path at node:http's limit and beyond, a caller's executable path, a thousand scopes.
  const host = Array.from({ length: 80 }, () => 'a'.repeat(60)).join('.')
  const long = { ...event(1), host, path: '/' + 'p'.repeat(70_000), destination: '/' + 'd'.repeat(70_000), caller: { pid: 1, uid: 0, exe: '/' + 'x'.repeat(5000), sha256: null }, credential: { binding: 'b', id: 'static:b', audience: 'http://x', scopes: Array.from({ length: 1000 }, (_, i) => `scope-${i}-${'s'.repeat(40)}`) } }
  sink.write(long)
  sink.write(event(2))
  t.ok(await sink.waitForAck(2, 5000), 'both acked: the long one did not hold back the next')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 10 })
  const cut = stored.find((e) => e.sequence === 1)!.event
  t.ok(cut.call!.host.startsWith('a'.repeat(60) + '.') && cut.call!.host.endsWith('…(cut)'), 'the host kept its start, marked as cut')
  t.ok(Buffer.byteLength(cut.call!.host) <= 4096 && Buffer.byteLength(cut.call!.path) <= 65_536)
  t.ok(cut.call!.destination.startsWith('/ddd') && cut.call!.destination.endsWith('…(cut)') && Buffer.byteLength(cut.call!.destination) <= 65_536, 'a WebDAV destination is cut to its limit too')
  t.ok(cut.credential!.scopes.length > 0 && cut.credential!.scopes.length <= 256)
  t.equal(stored.find((e) => e.sequence === 2)?.event.call?.path, '/call/2')
  t.equal(stored.find((e) => e.sequence === 2)?.event.call?.destination, '', 'and none where there was none')
})

t.test('a scope past the field limit is cut too when every scope fits the count: not resent for ever', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const sink = testSink(id, c.grpcAddress)
  t.teardown(() => sink.close())
  // One scope of 5,000 characters: within the count and the total, so the list was sent as it was,
  // uncut, and the collector refused the batch (INVALID_ARGUMENT) at every resend.
  sink.write({ ...event(1), credential: { binding: 'b', id: 'static:b', audience: 'http://x', scopes: ['read', 's'.repeat(5000)] } })
  sink.write(event(2))
  t.ok(await sink.waitForAck(2, 5000), 'both acked: the long scope did not hold back the next event')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 10 })
  const scopes = stored.find((e) => e.sequence === 1)!.event.credential!.scopes
  t.equal(scopes[0], 'read')
  t.ok(scopes[1]!.startsWith('sss') && scopes[1]!.endsWith('…(cut)') && Buffer.byteLength(scopes[1]!) <= 4096, 'the long scope kept its start, marked as cut')
})

t.test('a collector that takes smaller batches than the sidecar sends (max_batch_bytes) gets smaller ones, not the same one for ever', async (t) => {
  const id = sidecarIdentity()
  // 1 MiB: what a sidecar's batch holds in records, and a little less than its message.
  const c = await startTestCollector([id], { raw: { grpc: { host: '127.0.0.1', port: 0, max_batch_bytes: 1 << 20 } } })
  t.teardown(() => c.close())
  const logs: string[] = []
  const sink = testSink(id, c.grpcAddress, { onLog: (_level, _fields, msg) => void logs.push(msg) })
  t.teardown(() => sink.close())
  // An agent's burst of calls with paths near node:http's 16 KiB limit: spooled before the first sync, sent as one batch.
  for (let n = 1; n <= 100; n++) sink.write(event(n, { path: `/${'p'.repeat(15_000)}/${n}` }))
  t.ok(await sink.waitForAck(100, 8000), 'every event acked')
  t.equal(c.ingest.stats.stored, 100)
  t.ok(logs.some((m) => m.includes('refused as too large')), 'the refusal is said, at error level')
  t.equal(sink.refusedCode, null, 'and no longer refused once a batch is acked')
})
