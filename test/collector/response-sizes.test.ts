// With the collector sink, a Content-Length response's last byte waits for the call's record: held
// back, the rest corked. A body of 16 KiB or more arriving in one read then paused the upstream on
// a corked response, waiting for a 'drain' only the uncork brings: 17-64 KB responses hung until
// the upstream's keep-alive timer cut them, larger ones were cut at their last read. Every size
// arrives whole, credentialed or not, and is recorded.
import t from 'tap'
import { createServer } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { request } from 'undici'
import { startCollectedSidecar, proxyAgent } from './sidecar-helpers.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'

t.test('responses of every size arrive whole through a sidecar auditing to a collector', async (t) => {
  const upstream = createServer((req, res) => res.end('a'.repeat(Number(new URL(req.url ?? '/', 'http://x').searchParams.get('n')))))
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const id = sidecarIdentity()
  const collector = await startTestCollector([id])
  const s = await startCollectedSidecar({ id, collector: collector.grpcAddress, upstreamPort: port })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(async () => {
    await agent.close()
    await s.close()
    await collector.close()
    upstream.closeAllConnections()
    upstream.close()
  })
  // 127.0.0.1 carries the bound credential (its body scrubbed); localhost none.
  for (const host of ['127.0.0.1', 'localhost']) {
    for (const n of [1, 16383, 16384, 16385, 17000, 30000, 65535, 65536, 65537, 100000, 1_000_000]) {
      const r = await request(`http://${host}:${port}/?n=${n}`, { dispatcher: agent, headersTimeout: 3000, bodyTimeout: 3000 }).then(
        async (res) => `${res.statusCode} ${(await res.body.text()).length}`,
        (err: { code?: string }) => `error ${err.code}`,
      )
      t.equal(r, `200 ${n}`, `${host}: ${n} bytes`)
    }
  }
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'every call recorded at the collector')
})
