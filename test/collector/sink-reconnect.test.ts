// The audit stream after a collector outage longer than backoff_max_ms: the sink is back within
// about backoff_max_ms of the collector's return, not on grpc-js's own backoff (1 s x1.6 up to
// 120 s). Real collector, real sidecar, real sockets.
import t from 'tap'
import { startUpstream } from '../helpers/harness.js'
import { refuser } from '../control/rig.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { call, freePort, proxyAgent, startCollectedSidecar } from './sidecar-helpers.js'

const BACKOFF_MAX_MS = 300
const DOWN_MS = 5000

t.test(`a collector down for ${DOWN_MS} ms: the sink delivers within backoff_max_ms (${BACKOFF_MAX_MS}) plus a margin of its return`, async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const port = await freePort()
  const down = await refuser(port)
  const s = await startCollectedSidecar({ id, collector: `127.0.0.1:${port}`, upstreamPort: upstream.port, collectorOpts: { backoff_min_ms: 50, backoff_max_ms: BACKOFF_MAX_MS } })
  t.teardown(() => s.close())
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  for (let i = 0; i < 10; i++) t.equal(await call(agent, `${upstream.origin}/outage/${i}`), 200)
  await new Promise((r) => setTimeout(r, DOWN_MS))
  await down.next()
  await down.close()
  const gaps = down.attempts.slice(1).map((at, i) => at - down.attempts[i]!)
  t.ok(Math.max(...gaps) <= BACKOFF_MAX_MS * 1.2 + 200, `attempts while down came at most ${Math.max(...gaps)} ms apart (${down.attempts.length} attempts)`)

  const c = await startTestCollector([id], { grpcPort: port })
  t.teardown(() => c.close())
  const back = Date.now()
  t.ok(await s.sink.waitForAck(10, 20_000), 'acked after the collector came up')
  const ms = Date.now() - back
  t.ok(ms <= 2 * BACKOFF_MAX_MS + 1000, `delivered ${ms} ms after the collector came back (limit ${2 * BACKOFF_MAX_MS + 1000} ms)`)
})
