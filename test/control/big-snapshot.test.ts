// A revocation snapshot past grpc's default 4 MB receive limit: a sidecar that (re)connects still
// synchronises, instead of failing on the first message and staying stale for ever. Real broker,
// real store, real sockets.
import t from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { startApi, startControlBroker, startControlSidecar, viaProxy, until } from './rig.js'

const COUNT = 6000

t.test(`a snapshot of ${COUNT} revocations (over 4 MB) reaches a connecting sidecar`, async (t) => {
  const dbFile = join(mkdtempSync(join(tmpdir(), 'lk-big-snapshot-')), 'broker.db')
  const store = new SqliteRevocationStore(dbFile)
  await store.init()
  const now = Date.now()
  const reason = 'r'.repeat(200)
  let bytes = 0
  for (let i = 0; i < COUNT; i++) {
    const value = `jti-${String(i).padStart(6, '0')}-${'x'.repeat(600)}`
    bytes += value.length + reason.length
    await store.add({ kind: 'jti', value, reason, created_at: now })
  }
  await store.close()
  t.ok(bytes > 4 * 1024 * 1024, `the snapshot carries ${bytes} bytes of revocations`)

  const broker = await startControlBroker({ store: { sqlite: { path: dbFile } } })
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:big-snapshot')
  t.teardown(s.close)
  await until('synchronised from the big snapshot', () => s.sidecar.control!.connected, 10_000).catch((err: Error) => {
    t.fail(`${err.message}; last error: ${s.sidecar.control!.lastError ?? 'none'}`)
  })
  t.equal(s.sidecar.control!.state.size, COUNT, 'every revocation is known')
  t.equal(s.sidecar.control!.lastError, null)
  const task = await s.openTask()
  t.equal((await viaProxy(s, task.handle, `${api.origin}/x`)).status, 200, 'the sidecar serves')
})
