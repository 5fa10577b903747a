// The control stream after an outage longer than backoff_max_ms: the sidecar is back within about
// backoff_max_ms of the broker's return (grpc-js's own reconnect backoff, 1 s x1.6 up to 120 s,
// must not govern), so a revocation made then is applied promptly. Real brokers, real sockets.
import t from 'tap'
import { startApi, restartableBroker, startControlSidecar, viaProxy, revoke, until, refuser } from './rig.js'

const BACKOFF_MAX_MS = 300
const DOWN_MS = 5000

t.test(`a broker down for ${DOWN_MS} ms: the control stream is back within backoff_max_ms (${BACKOFF_MAX_MS}) plus a margin`, async (t) => {
  const broker = await restartableBroker(t, 'reconnect')
  const first = broker.first
  const api = await startApi()
  t.teardown(api.close)
  // stale_after_ms is long: the test is about the reconnect, not the watchdog.
  const s = await startControlSidecar(first, api, 'agent:summarizer:prod:reconnect', { control: { stale_after_ms: 60_000, backoff_min_ms: 50, backoff_max_ms: BACKOFF_MAX_MS } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const task = await s.openTask()
  t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200)

  await broker.stop()
  await until('the sidecar saw the stream end', () => !s.sidecar.control!.connected)
  const down = await refuser(broker.port)
  await new Promise((r) => setTimeout(r, DOWN_MS))
  await down.next()
  await down.close()
  const gaps = down.attempts.slice(1).map((at, i) => at - down.attempts[i]!)
  t.ok(Math.max(...gaps) <= BACKOFF_MAX_MS * 1.2 + 200, `attempts while down came at most ${Math.max(...gaps)} ms apart (${down.attempts.length} attempts)`)

  const second = await broker.restart()
  const back = Date.now()
  await revoke(second, 'task', task.id)
  await until('reconnected', () => s.sidecar.control!.connected, 20_000)
  const reconnectMs = Date.now() - back
  t.ok(reconnectMs <= 2 * BACKOFF_MAX_MS + 1000, `reconnected ${reconnectMs} ms after the broker came back (limit ${2 * BACKOFF_MAX_MS + 1000} ms)`)
  await until('the revocation made while reconnecting is applied', () => s.sidecar.control!.state.has('task', task.id), 2000)
  t.match(await viaProxy(s, task.handle, `${api.origin}/x`), { status: 403, body: { code: 'LK_REVOKED' } })
})
