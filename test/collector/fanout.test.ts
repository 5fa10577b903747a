// Fan-out to the real NATS JetStream server: every stored event once, subject per agent type.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { connect, type JetStreamManager } from 'nats'
import type { IngestResponse } from '../../protos/gen/latchkey/v1/audit.js'
import { JetStreamFanOut } from '../../collector/fanout.js'
import { makeEvent } from './events.js'
import { authMetadata, ingestClient, sidecarIdentity, startTestCollector } from './collector-helpers.js'

const NATS = process.env.LATCHKEY_TEST_NATS_URL ?? 'nats://127.0.0.1:4222'

t.test('stored events are published once each to <prefix>.<agent type>', async (t) => {
  const tag = randomBytes(4).toString('hex')
  const stream = `LK_TEST_${tag}`
  const prefix = `lktest.${tag}`
  const nc = await connect({ servers: NATS })
  const jsm: JetStreamManager = await nc.jetstreamManager()
  t.teardown(async () => {
    await jsm.streams.delete(stream).catch(() => {})
    await nc.close()
  })
  const id = sidecarIdentity()
  const c = await startTestCollector([id], { raw: { nats: { servers: [NATS], stream, subject_prefix: prefix } } })
  t.teardown(() => c.close())
  const batch = [
    { sequence: 1, event: makeEvent({ agent: 'agent:summarizer:prod:1', path: '/a' }) },
    { sequence: 2, event: makeEvent({ agent: 'agent:triage:prod:7', path: '/b' }) },
    { sequence: 3, event: makeEvent({ agent: 'agent:summarizer:prod:2', path: '/c' }) },
  ]
  const client = ingestClient(c.grpcAddress)
  t.teardown(() => client.close())
  const call = client.ingest(authMetadata(id))
  const acks: IngestResponse[] = []
  call.on('data', (a: IngestResponse) => acks.push(a))
  call.write({ sidecarId: id.id, events: batch })
  call.write({ sidecarId: id.id, events: batch }) // a replay: stored zero times more, published zero times more
  call.end()
  await once(call, 'status')
  t.same(acks.map((a) => [a.stored, a.duplicates]), [[3, 0], [0, 3]])
  // Wait for the fan-out to drain (published asynchronously after the commit).
  for (let i = 0; i < 100 && (await jsm.streams.info(stream)).state.messages < 3; i++) await new Promise((r) => setTimeout(r, 50))
  const info = await jsm.streams.info(stream)
  t.equal(info.state.messages, 3)
  t.equal(info.config.storage, 'file', 'a durable (file-backed) stream')
  const summarizer = await jsm.streams.getMessage(stream, { last_by_subj: `${prefix}.summarizer` })
  const triage = await jsm.streams.getMessage(stream, { last_by_subj: `${prefix}.triage` })
  const s = summarizer.json<{ sidecar: string; sequence: number; event: { call: { path: string } } }>()
  t.same([s.sidecar, s.sequence, s.event.call.path], [id.id, 3, '/c'])
  t.same(triage.json<{ sequence: number }>().sequence, 2)
  t.equal(summarizer.header.get('Nats-Msg-Id'), `${id.id}:3`)

  // Publishing the same stored events again (a retry after a lost publish ack) is deduplicated by JetStream.
  const fan = await JetStreamFanOut.open({ servers: [NATS], stream, subject_prefix: prefix }, c.log)
  const stored = await c.store.eventsByAgent({ agent: 'agent:triage:prod:7', since: new Date(0) })
  fan.publish(stored)
  await fan.settled()
  t.equal(fan.stats.published, 1)
  t.equal((await jsm.streams.info(stream)).state.messages, 3, 'still 3: the msgID dedupe held')
  await fan.close()
})

t.test('an unreachable NATS fails collector start-up, naming the server, never its password', async (t) => {
  const id = sidecarIdentity()
  const err = (await startTestCollector([id], { raw: { nats: { servers: ['nats://probe:NATS-PASSWORD-CANARY@127.0.0.1:1', '127.0.0.1:2'], stream: 'X', subject_prefix: 'x' } } }).then(
    () => null,
    (e: unknown) => e,
  )) as { message: string; code?: string } | null
  t.match(err, { code: 'LK_STARTUP', message: /^collector\.nats nats:\/\/\*\*\*@127\.0\.0\.1:1,127\.0\.0\.1:2: cannot connect/ }, 'one line for the operator, the servers named')
  t.notMatch(err?.message ?? '', /NATS-PASSWORD-CANARY|probe:/, 'the userinfo is not')
})

t.test('events stored but never published (a collector died in between) go out on the next start, once', async (t) => {
  const tag = randomBytes(4).toString('hex')
  const stream = `LK_TEST_${tag}`
  const prefix = `lktest.${tag}`
  const nc = await connect({ servers: NATS })
  const jsm = await nc.jetstreamManager()
  t.teardown(async () => {
    await jsm.streams.delete(stream).catch(() => {})
    await nc.close()
  })
  const { mkdtempSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const { join } = await import('node:path')
  const { SqliteAuditStore } = await import('../../collector/store/sqlite.js')
  const dbPath = join(mkdtempSync(join(tmpdir(), 'lk-fan-')), 'audit.db')
  const nats = { nats: { servers: [NATS], stream, subject_prefix: prefix } }
  const id = sidecarIdentity()
  const c1 = await startTestCollector([id], { dbPath, raw: nats })
  const client = ingestClient(c1.grpcAddress)
  const call = client.ingest(authMetadata(id))
  call.on('data', () => {}) // acks must be read for the stream to end
  call.write({ sidecarId: id.id, events: [1, 2, 3].map((sequence) => ({ sequence, event: makeEvent({ path: `/live/${sequence}` }) })) })
  call.end()
  await once(call, 'status')
  client.close()
  await c1.close()
  t.equal((await jsm.streams.info(stream)).state.messages, 3)
  // Committed with no collector publishing: what a crash between commit and publish leaves.
  const direct = new SqliteAuditStore(dbPath)
  await direct.append(id.id, [4, 5, 6, 7].map((sequence) => ({ sequence, event: makeEvent({ path: `/unpublished/${sequence}` }) })))
  await direct.close()
  const c2 = await startTestCollector([id], { dbPath, raw: nats })
  t.teardown(() => c2.close())
  const info = await jsm.streams.info(stream)
  t.equal(info.state.messages, 7, 'the four unpublished events, and nothing twice')
  const last = (await jsm.streams.getMessage(stream, { last_by_subj: `${prefix}.summarizer` })).json<{ sequence: number; event: { call: { path: string } } }>()
  t.same([last.sequence, last.event.call.path], [7, '/unpublished/7'])
  t.match(c2.logs.join(''), /"published":4.*nats fan-out caught up/)
})
