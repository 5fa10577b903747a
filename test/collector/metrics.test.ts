// The collector's /metrics, read the way Prometheus reads it, while real sinks (the sidecar's own
// CollectorAuditSink) deliver to it, one of them with a wrong token, and one configured sidecar
// never connects: what an on-call engineer alerts on (who is connected, who last delivered, who
// is refused, whether the store answers), and no token in it.
import t from 'tap'
import { request } from 'undici'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { uniqueSchema } from './events.js'
import { sha256hex, sidecarEvent, sidecarIdentity, startTestCollector, testSink } from './collector-helpers.js'

async function get(url: string, headers: Record<string, string> = {}): Promise<{ status: number; type: string; text: string }> {
  const r = await request(url, { headers })
  return { status: r.statusCode, type: String(r.headers['content-type']), text: await r.body.text() }
}

/** The sample of `name{labels}` in a Prometheus text answer; undefined when absent. */
function sample(text: string, name: string, labels = ''): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `))
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1))
}

async function until(what: string, ok: () => boolean | Promise<boolean>): Promise<void> {
  for (const stop = Date.now() + 10_000; !(await ok()); ) {
    if (Date.now() > stop) throw new Error(`not reached within 10 s: ${what}`)
    await new Promise((r) => setTimeout(r, 25))
  }
}

t.test('who is connected, what each delivered and when, who was refused, and the store', async (t) => {
  const delivering = sidecarIdentity('sidecar-delivering')
  const absent = sidecarIdentity('sidecar-absent')
  const mistyped = sidecarIdentity('sidecar-mistyped')
  const c = await startTestCollector([delivering, absent, mistyped], { raw: { http: { host: '127.0.0.1', port: 0, reader_tokens_sha256: [sha256hex('reader')] } } })
  t.teardown(() => c.close())
  const metrics = () => get(`${c.httpUrl}/metrics`)

  const before = await metrics()
  t.equal(before.status, 200, 'no reader token needed, as for /readyz')
  t.match(before.type, /^text\/plain; version=0\.0\.4/, "Prometheus's text format")
  t.equal((await get(`${c.httpUrl}/v1/events?agent=a`)).status, 401, 'while the events still need one')
  for (const s of [delivering, absent, mistyped]) t.equal(sample(before.text, 'latchkey_collector_sidecar_streams', `{sidecar="${s.id}"}`), 0, `${s.id}: listed before it connects, at 0`)
  t.equal(sample(before.text, 'latchkey_collector_store_up'), 1, 'the store answers')
  t.equal(sample(before.text, 'latchkey_collector_events_stored_total'), 0)

  const t0 = Date.now()
  const sink = testSink(delivering, c.grpcAddress)
  t.teardown(() => sink.close())
  for (let i = 1; i <= 5; i++) sink.write(sidecarEvent(i))
  t.ok(await sink.waitForAck(5, 10_000), 'the collector acked all five')
  // The wrong token is one a sidecar had before a rotation: the collector refuses the stream.
  const stale = testSink({ id: mistyped.id, token: sidecarIdentity().token }, c.grpcAddress)
  t.teardown(() => stale.close())
  stale.write(sidecarEvent(1))
  await until('the stale token refused', async () => (sample((await metrics()).text, 'latchkey_collector_refusals_total', '{reason="unauthenticated"}') ?? 0) >= 1)

  const during = await metrics()
  t.equal(sample(during.text, 'latchkey_collector_sidecar_streams', `{sidecar="${delivering.id}"}`), 1, 'the delivering sidecar is connected')
  t.equal(sample(during.text, 'latchkey_collector_sidecar_streams', `{sidecar="${absent.id}"}`), 0, 'the absent one is not')
  t.equal(sample(during.text, 'latchkey_collector_sidecar_streams', `{sidecar="${mistyped.id}"}`), 0, 'nor is the refused one')
  t.equal(sample(during.text, 'latchkey_collector_events_stored_total'), 5)
  t.equal(sample(during.text, 'latchkey_collector_sidecar_events_stored_total', `{sidecar="${delivering.id}"}`), 5)
  t.equal(sample(during.text, 'latchkey_collector_sidecar_events_stored_total', `{sidecar="${mistyped.id}"}`), 0, 'nothing stored for the refused one')
  const last = sample(during.text, 'latchkey_collector_sidecar_last_batch_timestamp_seconds', `{sidecar="${delivering.id}"}`)!
  t.ok(last >= Math.floor(t0 / 1000) && last <= Date.now() / 1000, `its last batch is dated now (${last})`)
  t.equal(sample(during.text, 'latchkey_collector_sidecar_last_batch_timestamp_seconds', `{sidecar="${absent.id}"}`), 0, 'never, for the absent one')
  t.ok((sample(during.text, 'latchkey_collector_batches_total') ?? 0) >= 1)
  t.notMatch(during.text, /LKCANARY/, 'no token in the metrics')
  t.notMatch(during.text, /agent:summarizer/, 'nor any agent the events named')

  await sink.close()
  await until('the stream closed', async () => sample((await metrics()).text, 'latchkey_collector_sidecar_streams', `{sidecar="${delivering.id}"}`) === 0)
  t.pass('a sink that closes is counted out')
})

t.test('latchkey_collector_store_up is 0 while the store does not answer', async (t) => {
  const down = new PostgresAuditStore({ url: 'postgres://postgres@127.0.0.1:1/test', schema: uniqueSchema() })
  const c = await startTestCollector([sidecarIdentity()], { store: down })
  t.teardown(async () => {
    await c.close()
    await down.close()
  })
  const m = await get(`${c.httpUrl}/metrics`)
  t.equal(m.status, 200, 'metrics are served while the store is down')
  t.equal(sample(m.text, 'latchkey_collector_store_up'), 0)
})
