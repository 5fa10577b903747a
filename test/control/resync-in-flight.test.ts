// A revocation made while a sidecar's control stream is down reaches it only in the next
// snapshot (resync, not replay): the work it had in flight then is cut as a delta's revocation
// cuts it, and only that task's. All real: a broker stopped and started again on the same store
// and port, a sidecar reconnecting to it, an upstream API.
import t from 'tap'
import { once } from 'node:events'
import { startApi, startControlSidecar, viaProxy, openStream, openWebSocket, revoke, until, restartableBroker } from './rig.js'

t.test('a revocation made while the control stream is down cuts the work in flight once the snapshot brings it; the other task streams on', async (t) => {
  const broker = await restartableBroker(t, 'in-flight-resync')
  const api = await startApi()
  t.teardown(api.close)
  // stale_after_ms is long: the outage is short, and tokens are not the point.
  const s = await startControlSidecar(broker.first, api, 'agent:summarizer:prod:resync', { control: { stale_after_ms: 60_000, backoff_min_ms: 50, backoff_max_ms: 300 } })
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  const revoked = await s.openTask()
  const other = await s.openTask()
  const stream = await openStream(s, revoked.handle, `${api.origin}/stream`)
  const ws = await openWebSocket(s, revoked.handle, api)
  const wsClosed = once(ws, 'close')
  const otherStream = await openStream(s, other.handle, `${api.origin}/stream/other`)
  let otherEnded = false
  void otherStream.ended.then(() => (otherEnded = true))
  await until('streams flowing', () => stream.chunks() > 0 && otherStream.chunks() > 0)

  await broker.stop()
  await until('the sidecar saw the stream end', () => !s.sidecar.control!.connected)
  // Made while the sidecar is away: no delta reaches it, only the next snapshot.
  const back = await broker.restart()
  t.equal((await revoke(back, 'task', revoked.id)).status, 201)
  await until('reconnected and applied', () => s.sidecar.control!.state.has('task', revoked.id), 10_000)
  const applied = performance.now()
  const cut = await Promise.race([Promise.all([stream.ended, wsClosed]).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))])
  t.ok(cut, `the stream and the WebSocket were cut ${(performance.now() - applied).toFixed(0)} ms after the snapshot applied it`)
  const before = otherStream.chunks()
  await until('the other stream still flowing', () => otherStream.chunks() > before + 2)
  t.notOk(otherEnded, "the other task's stream is untouched")
  await until('the cuts recorded', async () => (await s.audit()).filter((e) => e.task === revoked.id && e.error === 'LK_REVOKED').length === 2)
  t.same((await s.audit()).filter((e) => e.task === revoked.id && e.error === 'LK_REVOKED').map((e) => e.via).sort(), ['absolute', 'upgrade'], 'each recorded as revoked')
  t.match(await viaProxy(s, revoked.handle, `${api.origin}/after`), { status: 403, body: { code: 'LK_REVOKED', rule: 'revocation:task' } })
  t.notOk(api.paths.includes('/after'))
})
