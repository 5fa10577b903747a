// The collector's probes: /healthz says the process answers, /readyz that its store does too.
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { connect, createServer, type AddressInfo } from 'node:net'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pgDriver from 'pg'
import { stringify } from 'yaml'
import { request } from 'undici'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { PG_URL, uniqueSchema } from './events.js'
import { sha256hex, sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { CLI } from '../helpers/cli.js'

/** Waits for a condition the collector reaches by itself (a log line), for at most 5 s. */
async function until(ok: () => boolean): Promise<void> {
  for (const stop = Date.now() + 5_000; !ok(); ) {
    if (Date.now() > stop) throw new Error('not reached within 5 s')
    await new Promise((r) => setTimeout(r, 20))
  }
}

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
  // Said at start, before anyone asks /readyz: at 2 am the log is where one looks first.
  await until(() => c.logs.some((l) => l.includes('the store does not answer: audit batches are refused')))
  t.match(c.logs.join(''), /"level":50,.*"reason":"postgres schema setup failed: connect ECONNREFUSED 127.0.0.1:1".*"msg":"the store does not answer: audit batches are refused/, 'the start says so, and why')
  t.same(await get(`${c.httpUrl}/healthz`), { status: 200, body: { ok: true, store: 'postgres' } }, 'alive')
  t.same(await get(`${c.httpUrl}/readyz`), { status: 503, body: { ready: false, store: 'postgres', code: 'LK_STORE_UNAVAILABLE', reason: 'the store does not answer; the collector log says why' } }, 'not ready, without a reader token')
  const logs = c.logs.join('')
  t.match(logs, /"reason":"postgres schema setup failed: connect ECONNREFUSED 127.0.0.1:1","msg":"not ready: the store does not answer"/, 'the log says why')
  t.notMatch(logs, /LKCANARYPW/, 'and not the password in the URL')
})

t.test('a store that comes up after the collector: asked again until it answers, and said once when it does', async (t) => {
  // A port where PostgreSQL is not yet, then is: a relay to the real one opens there later.
  const port = await new Promise<number>((resolve) => {
    const probe = createServer().listen(0, '127.0.0.1', () => {
      const p = (probe.address() as AddressInfo).port
      probe.close(() => resolve(p))
    })
  })
  const late = new PostgresAuditStore({ url: `postgres://postgres@127.0.0.1:${port}/test`, schema: uniqueSchema() })
  const c = await startTestCollector([sidecarIdentity()], { store: late, storeRetryMs: 100 })
  const relay = createServer((client) => {
    const db = connect(5432, '127.0.0.1')
    client.pipe(db).pipe(client)
    client.on('error', () => db.destroy())
    db.on('error', () => client.destroy())
  })
  t.teardown(async () => {
    await c.close()
    await late.dropSchema().catch(() => {})
    await late.close()
    relay.close()
  })
  await until(() => c.logs.some((l) => l.includes('the store does not answer')))
  await new Promise<void>((resolve) => relay.listen(port, '127.0.0.1', resolve))
  await until(() => c.logs.some((l) => l.includes('the store answers: audit batches are stored again')))
  t.equal(c.logs.filter((l) => l.includes('the store does not answer')).length, 1, 'the outage is said once, not at every retry')
  t.same(await get(`${c.httpUrl}/readyz`), { status: 200, body: { ready: true, store: 'postgres' } }, 'and it is ready')
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

t.test('an audit table it could not append to: the collector does not start (it would be ready and refuse every batch)', async (t) => {
  const schema = uniqueSchema()
  const admin = new pgDriver.Client({ connectionString: PG_URL })
  await admin.connect()
  t.teardown(async () => {
    await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)
    await admin.end()
  })
  // An older version's table: no audience column, and neither key.
  await admin.query(`CREATE SCHEMA ${schema}`)
  await admin.query(`CREATE TABLE ${schema}.audit_events (sidecar text NOT NULL, seq bigint NOT NULL, pos bigint NOT NULL, id text NOT NULL, ts bigint NOT NULL,
    agent text NOT NULL, agent_type text NOT NULL, host text NOT NULL, port integer NOT NULL, action smallint NOT NULL, received bigint NOT NULL,
    payload bytea NOT NULL, prev bytea NOT NULL, hash bytea NOT NULL)`)
  const message = `collector.store: table "${schema}".audit_events exists but is not the shape this version needs: no column audience; no primary key or unique constraint on (sidecar, seq); no primary key or unique constraint on (sidecar, pos). Move it aside (or migrate it) and start again; nothing was changed.`
  for (const migrate of [true, false]) {
    const started = await startTestCollector([sidecarIdentity()], { raw: { store: { kind: 'postgres', url: PG_URL, schema, migrate } } }).then(
      async (c) => {
        await c.close()
        return null
      },
      (e: unknown) => e as Error & { code?: string },
    )
    t.equal(started?.message, message, `refused, naming the table and what it lacks (migrate: ${migrate})`)
    t.equal(started?.code, 'LK_STARTUP')
  }
  const file = join(mkdtempSync(join(tmpdir(), 'lk-collector-cli-')), 'collector.yaml')
  writeFileSync(file, stringify({ version: 1, collector: { grpc: { host: '127.0.0.1', port: 0 }, store: { kind: 'postgres', url: PG_URL, schema }, sidecars: [{ id: 's1', token_sha256: sha256hex('t') }] } }))
  const r = spawnSync(process.execPath, [CLI, 'collector', '-c', file], { encoding: 'utf8', timeout: 20_000 })
  t.equal(r.status, 1, '`latchkey collector` exits 1')
  t.equal(r.stderr, `${message}\n`, 'with that one line')
})
