// Reads must not starve the ingest: an answer holds at most a page (more is a `next` cursor away),
// reads in progress are bounded (503 LK_COLLECTOR_BUSY with Retry-After past that), and SQLite's
// reads run off the collector's thread, so /healthz answers while one is in progress.
import t, { type Test } from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { request } from 'undici'
import { seqEvents } from './events.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { createQueryServer } from '../../collector/http.js'
import { MAX_PAGE_EVENTS } from '../../collector/query.js'
import { SqliteAuditStore } from '../../collector/store/sqlite.js'
import { createLogger } from '../../lib/log.js'
import type { AuditStore, EventQuery, StoredEvent, VerifyResult } from '../../collector/store/types.js'
import { CLI } from '../helpers/cli.js'
import { auditInProcess } from '../helpers/audit-cli.js'

const run = promisify(execFile)
const X = 'agent:load:prod:1'

async function get(url: string): Promise<{ status: number; headers: Record<string, unknown>; body: Record<string, unknown> }> {
  const r = await request(url)
  return { status: r.statusCode, headers: r.headers, body: (await r.body.json()) as Record<string, unknown> }
}

type Page = { count: number; truncated: boolean; next?: string; limit: number; limitCapped?: string; events: Array<{ sidecar: string; position: number }> }

t.test('a limit above the page maximum is capped and says so; paging with next gives every event once; the CLI fetches them all', async (t) => {
  const a = sidecarIdentity('sidecar-a')
  const b = sidecarIdentity('sidecar-b')
  const c = await startTestCollector([a, b])
  t.teardown(() => c.close())
  // 1,500 events in two sidecars, many at the same millisecond, so page boundaries fall inside ties.
  const base = Date.now() - 600_000
  await c.store.append(a.id, seqEvents(1, 800, (s) => ({ agent: X, ts: base + Math.floor(s / 7) }), a.id))
  await c.store.append(b.id, seqEvents(1, 700, (s) => ({ agent: X, ts: base + Math.floor(s / 5) }), b.id))
  const url = (q: string) => `${c.httpUrl}/v1/events?agent=${encodeURIComponent(X)}&since=1h${q}`

  const first = await get(url('&limit=100000'))
  t.equal(first.status, 200)
  const p1 = first.body as unknown as Page
  t.match(p1, { count: MAX_PAGE_EVENTS, truncated: true, limit: MAX_PAGE_EVENTS, limitCapped: /^limit 100000 is more than one answer holds \(1000\)/ }, 'capped, and the answer says so')
  t.type(p1.next, 'string', 'with where the next page starts')
  const second = (await get(url(`&limit=100000&cursor=${encodeURIComponent(p1.next!)}`))).body as unknown as Page
  t.match(second, { count: 500, truncated: false })
  t.equal(second.next, undefined, 'the last page has no next')
  const seen = [...p1.events, ...second.events].map((e) => `${e.sidecar}#${e.position}`)
  t.equal(new Set(seen).size, 1500, 'every event exactly once')
  t.equal(seen.length, 1500)

  // Small pages through the ties: the same events in the same order as one answer.
  const whole = ((await get(url('&limit=1000'))).body as unknown as Page).events.map((e) => `${e.sidecar}#${e.position}`)
  const paged: string[] = []
  let next: string | undefined
  do {
    const page = (await get(url(`&limit=97${next ? `&cursor=${encodeURIComponent(next)}` : ''}`))).body as unknown as Page
    t.notOk(page.limitCapped, 'a limit under the maximum is not capped')
    paged.push(...page.events.map((e) => `${e.sidecar}#${e.position}`))
    next = page.next
  } while (next && paged.length < 5000)
  t.same(paged.slice(0, 1000), whole, 'pages of 97 give what one page of 1000 gives, in order')
  t.equal(new Set(paged).size, 1500)
  t.equal(paged.length, 1500)

  t.match(await get(url('&cursor=bm90LWEtY3Vyc29y')), { status: 400, body: { error: /^cursor "bm90LWEtY3Vyc29y" is not one this API gave/ } }, 'a forged cursor is a 400')
  t.match(await get(url('&limit=100001')), { status: 400, body: { error: 'limit "100001" must be a whole number from 1 to 100000, in decimal digits' } })

  // The CLI pages until its --limit: over the API and straight from the store. The first as a
  // process (every page through its stdout); the others in-process (helpers/audit-cli.ts), the
  // same commands and argv, ~0.25 s of CPU less each.
  const all = (await run(process.execPath, [CLI, 'audit', '--agent', X, '--since', '1h', '--json', '--limit', '100000', '--url', c.httpUrl!], { encoding: 'utf8', maxBuffer: 64 << 20 })).stdout.trim().split('\n')
  t.equal(all.length, 1500, 'the CLI fetches every page')
  t.equal(new Set(all.map((l) => JSON.parse(l) as { sidecar: string; position: number }).map((e) => `${e.sidecar}#${e.position}`)).size, 1500)
  const some = await auditInProcess(['audit', '--agent', X, '--since', '1h', '--limit', '1200', '--url', c.httpUrl!])
  t.equal(some.code, 0)
  t.equal(some.stdout.trim().split('\n').length, 1200, 'and stops at its limit')
  t.match(some.stderr, /1200 call\(s\) by .*\nmore calls match: these are the oldest 1200/)
  const cfg = join(c.dir, 'direct.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: sqlite, path: ${join(c.dir, 'audit.db')} }\n  sidecars: []\n`)
  const fromStore = await auditInProcess(['audit', '--agent', X, '--since', '1h', '--json', '--limit', '100000', '-c', cfg])
  t.equal(fromStore.code, 0)
  const direct = fromStore.stdout.trim().split('\n')
  t.same(direct, all, '-c pages through the store the same way')
})

/** A store whose reads wait until released, saying when each one started. */
/**
 * A fake store, and the one fake here: its reads are held open until release(), for the fault a
 * real store gives only by chance of timing (several slow reads in progress at once), so the
 * bound on reads in progress can be checked by order, not by a clock. Every other check in this
 * file runs on the real SQLite store.
 */
function heldStore(): { store: AuditStore; started: Promise<void>[]; release(): void; calls: () => number } {
  let release!: () => void
  const released = new Promise<void>((resolve) => (release = resolve))
  const starts: Array<() => void> = []
  const started = Array.from({ length: 4 }, () => new Promise<void>((resolve) => starts.push(resolve)))
  let calls = 0
  const hold = async <T>(value: T): Promise<T> => {
    starts[calls++]?.()
    await released
    return value
  }
  const store = {
    kind: 'sqlite',
    eventsByAgent: (_q: EventQuery) => hold<StoredEvent[]>([]),
    inventory: () => hold({ agents: [], sidecars: [] }),
    verify: () => hold<VerifyResult>({ ok: true, checked: 0, sidecars: 0, breaks: [] }),
    ping: () => Promise.resolve(),
  } as unknown as AuditStore
  return { store, started, release, calls: () => calls }
}

async function listen(store: AuditStore, limits: { maxRunning: number; maxQueued: number }, t: Test): Promise<string> {
  const server = createQueryServer(store, createLogger('silent', 'test'), [], undefined, limits)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
}

t.test('reads in progress are bounded: past the queue a clear 503 with Retry-After, and /healthz answers meanwhile', async (t) => {
  const h = heldStore()
  const base = await listen(h.store, { maxRunning: 1, maxQueued: 0 }, t)
  let runningDone = false
  const running = get(`${base}/v1/events?agent=${X}`).then((r) => ((runningDone = true), r))
  await h.started[0]
  // The second read: refused at once, or (without a bound) it reaches the store.
  const second = get(`${base}/v1/verify`)
  const first = await Promise.race([second, h.started[1]!.then(() => 'reached the store' as const)])
  t.not(first, 'reached the store', 'a read past the bound never reaches the store')
  if (first !== 'reached the store') {
    t.equal(first.status, 503, 'it is refused')
    t.same(first.body, { error: 'the collector is answering as many queries as it takes at once: retry after 1 s', code: 'LK_COLLECTOR_BUSY' })
    t.equal(first.headers['retry-after'], '1', 'saying when to try again')
  }
  t.equal((await get(`${base}/healthz`)).status, 200, '/healthz answers')
  t.notOk(runningDone, 'while the first read is still in progress')
  h.release()
  t.equal((await running).status, 200)
  await second
  t.equal(h.calls(), 1, 'only one read reached the store')
})

t.test('a read over the running bound waits its turn in the queue, then runs', async (t) => {
  const h = heldStore()
  const base = await listen(h.store, { maxRunning: 1, maxQueued: 1 }, t)
  const running = get(`${base}/v1/inventory`)
  await h.started[0]
  const queued = get(`${base}/v1/events?agent=${X}`)
  t.equal((await get(`${base}/healthz`)).status, 200)
  t.equal(h.calls(), 1, 'the queued read has not reached the store while the first runs')
  h.release()
  t.same([(await running).status, (await queued).status], [200, 200], 'both answered')
  t.equal(h.calls(), 2)
})

t.test('SQLite: verify and the events query run off the collector thread; /healthz and queries answer while verify is in progress', async (t) => {
  const s = sidecarIdentity()
  let verifyStarted!: () => void
  const started = new Promise<void>((resolve) => (verifyStarted = resolve))
  // The real store, saying when verify was asked for.
  class Watched extends SqliteAuditStore {
    override verify(sidecar?: string): Promise<VerifyResult> {
      verifyStarted()
      return super.verify(sidecar)
    }
  }
  const { mkdtempSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const store = new Watched(join(mkdtempSync(join(tmpdir(), 'lk-load-')), 'audit.db'))
  t.teardown(() => store.close())
  const c = await startTestCollector([s], { store })
  t.teardown(() => c.close())
  for (let from = 1; from <= 40_000; from += 2000) await store.append(s.id, seqEvents(from, from + 1999, () => ({ agent: X }), s.id))
  const order: string[] = []
  const verify = get(`${c.httpUrl}/v1/verify`).then((v) => (order.push('verify'), v))
  await started
  const health = await get(`${c.httpUrl}/healthz`)
  order.push('healthz')
  const page = await get(`${c.httpUrl}/v1/events?agent=${X}&limit=10`)
  order.push('events')
  t.equal(health.status, 200)
  t.equal(page.body.count, 10)
  const v = await verify
  t.match(v, { status: 200, body: { ok: true, checked: 40_000 } })
  t.same(order, ['healthz', 'events', 'verify'], '/healthz and a query were answered before verify finished')
})
