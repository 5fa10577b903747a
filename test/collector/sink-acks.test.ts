// What the sink believes of an acknowledgement. Something other than the collector can answer at
// its address (a plaintext loopback port, bound by anything while the collector is down): an ack
// past what was sent would have the spool delete events never delivered and the sink stop
// sending. A gRPC server speaking the real protocol plays it (the fault cannot be caused with a
// real collector); then the real collector takes the address back.
import t from 'tap'
import { Server, ServerCredentials, type ServerDuplexStream } from '@grpc/grpc-js'
import { AuditIngestServiceService, type IngestRequest, type IngestResponse } from '../../protos/gen/latchkey/v1/audit.js'
import { sidecarEvent, sidecarIdentity, startTestCollector, testSink } from './collector-helpers.js'
import { freePort } from './sidecar-helpers.js'

/** Acks every batch 1,000 sequences past its last. */
async function overAcker(port: number): Promise<{ batches: () => number; close: () => Promise<void> }> {
  let batches = 0
  const server = new Server()
  server.addService(AuditIngestServiceService, {
    ingest: (call: ServerDuplexStream<IngestRequest, IngestResponse>) => {
      call.on('data', (req: IngestRequest) => {
        batches++
        const last = Math.max(...req.events.map((e) => e.sequence))
        call.write({ sidecarId: req.sidecarId, ackedSequence: last + 1000, stored: req.events.length, duplicates: 0 })
      })
      call.on('error', () => {})
    },
  })
  await new Promise<void>((resolve, reject) => server.bindAsync(`127.0.0.1:${port}`, ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())))
  return { batches: () => batches, close: () => new Promise<void>((resolve) => server.tryShutdown(() => resolve())) }
}

t.test('an ack for sequences never sent is refused: nothing is deleted unsent, and the real collector later gets every event', async (t) => {
  const id = sidecarIdentity()
  const port = await freePort()
  const impostor = await overAcker(port)
  const logs: string[] = []
  const sink = testSink(id, `127.0.0.1:${port}`, { closeTimeoutMs: 500, onLog: (level, fields, msg) => logs.push(`${level} ${msg} ${JSON.stringify(fields)}`) })
  t.teardown(() => sink.close())
  for (let i = 1; i <= 3; i++) sink.write(sidecarEvent(i))
  for (let i = 0; i < 100 && impostor.batches() < 2; i++) await new Promise((r) => setTimeout(r, 50))
  t.ok(impostor.batches() >= 2, 'the sink sent, was over-acked, reconnected and sent again')
  t.equal(sink.stats.acked, 0, 'no ack past what was sent was taken')
  t.ok(sink.spool.lastSeq - sink.stats.acked >= 3, 'so the events stay owed')
  t.match(logs.find((l) => l.includes('never sent')), /^error audit stream to collector: acknowledgement of events never sent; ignored, reconnecting .*"acked":100[0-9],"sent":[1-3]/, 'and the operator is told')
  await impostor.close()

  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  sink.write(sidecarEvent(4))
  t.ok(await sink.waitForAck(4, 10_000), 'the real collector acks all four')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 100 })
  t.same(stored.map((e) => e.sequence).sort((a, b) => a - b), [1, 2, 3, 4], 'every event delivered, none skipped')
})
