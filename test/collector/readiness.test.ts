// The collector's probes: /healthz says the process answers, /readyz that its store does too.
import t from 'tap'
import { request } from 'undici'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { PG_URL, uniqueSchema } from './events.js'
import { sha256hex, sidecarIdentity, startTestCollector } from './collector-helpers.js'

const get = async (url: string) => {
  const r = await request(url)
  return { status: r.statusCode, body: (await r.body.json()) as Record<string, unknown> }
}

t.test('/readyz is 503 while the store does not answer, and /healthz still 200', async (t) => {
  // A careless operator's URL: nothing listens there. The collector starts (the database may come later).
  const down = new PostgresAuditStore({ url: 'postgres://postgres:LKCANARYPW@127.0.0.1:1/test', schema: uniqueSchema() })
  const c = await startTestCollector([sidecarIdentity()], { store: down, raw: { http: { host: '127.0.0.1', port: 0, reader_tokens_sha256: [sha256hex('reader')] } } })
  t.teardown(async () => {
    await c.close()
    await down.close()
  })
  t.same(await get(`${c.httpUrl}/healthz`), { status: 200, body: { ok: true, store: 'postgres' } }, 'alive')
  t.same(await get(`${c.httpUrl}/readyz`), { status: 503, body: { ready: false, store: 'postgres', code: 'LK_STORE_UNAVAILABLE', reason: 'the store does not answer; the collector log says why' } }, 'not ready, without a reader token')
  const logs = c.logs.join('')
  t.match(logs, /"reason":"postgres schema setup failed: connect ECONNREFUSED 127.0.0.1:1","msg":"not ready: the store does not answer"/, 'the log says why')
  t.notMatch(logs, /LKCANARYPW/, 'and not the password in the URL')
})

t.test('/readyz is 200 when the store answers: PostgreSQL and SQLite', async (t) => {
  const pg = new PostgresAuditStore({ url: PG_URL, schema: uniqueSchema() })
  t.teardown(async () => {
    await pg.dropSchema()
    await pg.close()
  })
  for (const store of [pg, undefined]) {
    const c = await startTestCollector([sidecarIdentity()], { store })
    t.teardown(() => c.close())
    t.same(await get(`${c.httpUrl}/readyz`), { status: 200, body: { ready: true, store: c.store.kind } }, c.store.kind)
  }
})
