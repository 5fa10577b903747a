// The query surface: the collector's HTTP API and `latchkey audit` / `latchkey audit verify`.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { openDatabase } from '../../lib/sqlite.js'
import { request } from 'undici'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'
import { makeEvent } from './events.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { createQueryServer } from '../../collector/http.js'
import { createLogger } from '../../lib/log.js'
import { boundAnswer } from '../../collector/query.js'
import type { AddressInfo } from 'node:net'
import { CLI } from '../helpers/cli.js'
import { auditInProcess } from '../helpers/audit-cli.js'

const run = promisify(execFile)
/** `latchkey …` as a process: kept for a few cases, which prove the wiring (exit codes, streams, the environment). */
const cliProcess = (args: string[]) =>
  run(process.execPath, [CLI, ...args], { encoding: 'utf8' }).then(
    (r) => ({ code: 0, stdout: r.stdout, stderr: r.stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  )
/** The same commands in-process (helpers/audit-cli.ts): most cases here, ~0.25 s of CPU less each. */
const cli = auditInProcess

const X = 'agent:x:prod:1'
const hour = 3_600_000

t.test('HTTP API and CLI answer what an agent did', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const now = Date.now()
  await c.store.append(id.id, [
    { sequence: 1, event: makeEvent({ agent: X, ts: now - 48 * hour, path: '/old' }) },
    { sequence: 2, event: makeEvent({ agent: X, ts: now - 2 * hour, path: '/repos', audience: 'https://api.github.com' }) },
    { sequence: 3, event: makeEvent({ agent: X, ts: now - hour, path: '/admin', action: Action.ACTION_DENY, status: 403 }) },
    { sequence: 4, event: makeEvent({ agent: 'agent:y:prod:1', ts: now - hour, path: '/other' }) },
  ])
  const get = async (path: string) => {
    const r = await request(c.httpUrl + path)
    return { status: r.statusCode, body: (await r.body.json()) as Record<string, unknown> }
  }
  const day = await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h`)
  t.equal(day.status, 200)
  t.same((day.body.events as { event: { call: { path: string } } }[]).map((e) => e.event.call.path), ['/repos', '/admin'])
  const denied = await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&denied=true`)
  t.same((denied.body.events as { sequence: number }[]).map((e) => e.sequence), [3])
  t.same(await get('/v1/events?since=24h'), { status: 400, body: { error: 'query parameter "agent" is required' } })
  t.same(await get(`/v1/events?agent=${X}&since=lastweek`), { status: 400, body: { error: 'since "lastweek" is neither a duration (like 24h, 30m, 7d), today, yesterday, nor an ISO-8601 time within range' } })
  t.same((await get(`/v1/events?agent=${X}&limit=0`)).status, 400)
  // Only decimal digits: Number() read each of these as some count, silently.
  for (const bad of ['0x10', '1e3', '5.0', '+5', ' 5', '5 ', '0b11', '1_000', '']) {
    t.same(await get(`/v1/events?agent=${X}&limit=${encodeURIComponent(bad)}`), { status: 400, body: { error: `limit "${bad}" must be a whole number from 1 to 100000, in decimal digits` } }, `limit=${JSON.stringify(bad)} is refused`)
  }
  t.equal((await get(`/v1/events?agent=${X}&limit=0005`)).status, 200, 'leading zeros are still decimal')
  // An empty or backwards window is refused: an empty 200 reads as an agent that did nothing.
  t.same(await get(`/v1/events?agent=${X}&since=2026-11-30T10:00:00Z&until=2026-11-30T09:00:00Z`), { status: 400, body: { error: 'until (2026-11-30T09:00:00.000Z) must be after since (2026-11-30T10:00:00.000Z)' } })
  t.equal((await get(`/v1/events?agent=${X}&since=2026-11-30T10:00:00Z&until=2026-11-30T10:00:00Z`)).status, 400, 'until equal to since is empty too')
  t.equal((await get(`/v1/events?agent=${X}&since=2h&until=3h`)).status, 400, 'until 3h ago is before since 2h ago')
  t.same(((await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&until=90m`)).body.events as { sequence: number }[]).map((e) => e.sequence), [2], 'a window the right way round answers what lies in it')
  t.same(await get(`/v1/events?agent=${X}&since=99999999999999d`), { status: 400, body: { error: 'since "99999999999999d" is neither a duration (like 24h, 30m, 7d), today, yesterday, nor an ISO-8601 time within range' } })
  t.same(await get(`/v1/events?agent=${X}&until=99999999999999d`), { status: 400, body: { error: 'until "99999999999999d" is neither a duration (like 24h, 30m, 7d), today, yesterday, nor an ISO-8601 time within range' } })
  t.match(await get(`/v1/events?agent=${X}&until=nope`), { status: 400, body: { error: /^until "nope"/ } }, 'the error names the parameter that was wrong')
  // Dates that do not exist, and spellings Date.parse would guess at, are refused, not rolled over.
  for (const bad of ['2024-02-30', '2023-02-29T00:00:00Z', '2026-13-01', '2026-11-30T24:00:00Z', '2026-11-30T10:60Z', 'March 7, 2026', '2026/11/30', '1']) {
    t.match(await get(`/v1/events?agent=${X}&since=${encodeURIComponent(bad)}`), { status: 400, body: { error: /^since ".*" is neither/ } }, `since=${bad} is refused`)
  }
  t.match(await get(`/v1/events?agent=${X}&until=`), { status: 400, body: { error: /^until "" is neither/ } }, 'an empty until is refused, not ignored')
  for (const good of ['2024-02-29', '2026-11-30T10:00:00Z', '2026-11-30T10:00:00.123+02:00', '2026-11-30T10:00']) {
    t.equal((await get(`/v1/events?agent=${X}&since=${encodeURIComponent(good)}`)).status, 200, `since=${good} is accepted`)
  }
  // A request line that is valid HTTP but no valid URL: a 400 before authentication, never a crash.
  const { connect } = await import('node:net')
  for (const target of ['//[', 'http://[::1/x']) {
    const sock = connect(Number(new URL(c.httpUrl!).port), '127.0.0.1')
    sock.write(`GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    let raw = ''
    for await (const chunk of sock) raw += String(chunk)
    t.match(raw, /^HTTP\/1\.1 400 /, `GET ${target}: 400`)
  }
  t.equal((await get('/healthz')).status, 200, 'the collector is still up')
  const inv = await get('/v1/inventory')
  t.same((inv.body.agents as { agent: string; audiences: string[] }[]).map((a) => [a.agent, a.audiences]), [[X, ['https://api.github.com']], ['agent:y:prod:1', []]])
  t.same(((await get('/v1/verify')).body as { ok: boolean; checked: number }).checked, 4)
  t.same((await get('/nope')).status, 404)
  t.same((await request(c.httpUrl + '/v1/events', { method: 'POST' })).statusCode, 405)

  const text = await cliProcess(['audit', '--agent', X, '--since', '24h', '--url', c.httpUrl!])
  t.equal(text.code, 0, text.stderr)
  const lines = text.stdout.trim().split('\n')
  t.equal(lines.length, 2)
  t.match(lines[0], /allow\s+200\s+GET https:\/\/api\.example\.com:443\/repos\s+rule=allow-api\s+aud=https:\/\/api\.github\.com/)
  t.match(lines[1], /deny\s+403\s+GET https:\/\/api\.example\.com:443\/admin\s+rule=deny-admin/)
  t.match(text.stderr, `2 call(s) by ${X} since 24h`)
  const json = await cli(['audit', '--agent', X, '--since', '24h', '--denied', '--json', '--url', c.httpUrl!])
  const parsed = json.stdout.trim().split('\n').map((l) => JSON.parse(l) as { sequence: number; event: { decision: { action: string } } })
  t.same(parsed.map((p) => [p.sequence, p.event.decision.action]), [[3, 'ACTION_DENY']])
  const verify = await cliProcess(['audit', 'verify', '--url', c.httpUrl!])
  t.same([verify.code, verify.stdout.trim()], [0, 'chain verified: 4 events across 1 sidecars'])
  const missing = await cliProcess(['audit', '--since', '24h', '--url', c.httpUrl!])
  t.same([missing.code, missing.stderr.trim()], [1, '--agent <id> is required (e.g. --agent agent:summarizer:prod:7a2c91)'])
  const down = await cli(['audit', '--agent', X, '--url', 'http://127.0.0.1:1'])
  t.same([down.code, down.stderr.trim()], [1, 'collector at http://127.0.0.1:1 unreachable: ECONNREFUSED'])

  // A limited answer says so, in the API and the CLI, rather than passing for the whole day.
  const cut = await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&limit=1`)
  t.match(cut.body, { count: 1, truncated: true })
  t.match((await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&limit=2`)).body, { count: 2, truncated: false }, 'exactly the limit is not cut')
  const cutCli = await cli(['audit', '--agent', X, '--since', '24h', '--limit', '1', '--url', c.httpUrl!])
  t.match(cutCli.stderr, /1 call\(s\) by .*\nmore calls match: these are the oldest 1; narrow --since or raise --limit/)

  // Newest first: what an operator asking about today usually wants, when more match than --limit.
  const seqs = (body: Record<string, unknown>) => (body.events as { sequence: number }[]).map((e) => e.sequence)
  const oldestFirst = seqs((await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h`)).body)
  const newestPage = await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&order=newest&limit=1`)
  t.match(newestPage.body, { count: 1, truncated: true, order: 'newest' })
  t.same(seqs(newestPage.body), oldestFirst.slice(-1), 'order=newest&limit=1 is the latest call')
  const rest = await get(`/v1/events?agent=${encodeURIComponent(X)}&since=24h&order=newest&cursor=${newestPage.body.next as string}`)
  t.same([...seqs(newestPage.body), ...seqs(rest.body)], [...oldestFirst].reverse(), 'its next page goes on to older calls, each once')
  t.same(await get(`/v1/events?agent=${X}&order=latest`), { status: 400, body: { error: 'order "latest" must be oldest or newest' } })
  t.same((await get(`/v1/events?agent=${X}&cursor=${newestPage.body.next as string}`)).body, { error: 'cursor continues an answer newest first: ask with order=newest, as that answer was asked' }, 'a cursor read in the other order would skip or repeat')
  const newestCli = await cli(['audit', '--agent', X, '--since', '24h', '--limit', '1', '--newest', '--json', '--url', c.httpUrl!])
  t.same(newestCli.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { sequence: number }).sequence), oldestFirst.slice(-1), 'latchkey audit --newest prints the latest')
  const newestText = await cli(['audit', '--agent', X, '--since', '24h', '--limit', '1', '--newest', '--url', c.httpUrl!])
  t.match(newestText.stderr, /more calls match: these are the newest 1; narrow --since or raise --limit\n/)
})

t.test('`audit` prints stored fields so no event can draw a line of its own', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const forged = '/x\r\u001b[2K2026-11-30T09:00:00.000Z  allow  200  GET https://fake/innocent  [other#1]\n\u001b[31m\u202e'
  await c.store.append(id.id, [{ sequence: 1, event: makeEvent({ agent: X, path: forged }) }])
  const text = await cli(['audit', '--agent', X, '--url', c.httpUrl!])
  t.equal(text.stdout.trim().split('\n').length, 1, 'one event, one line')
  // eslint-disable-next-line no-control-regex -- looking for control characters is the point
  t.notMatch(text.stdout, /[\u0000-\u0009\u000b-\u001f\u007f\u202e]/, 'no control character or bidi override reaches the terminal')
  t.match(text.stdout, /\/x\\u000d\\u001b\[2K2026/, 'they are shown escaped')
  // Invisible characters, by which one agent or path passes for another, are shown too.
  await c.store.append(id.id, [{ sequence: 2, event: makeEvent({ agent: X, path: '/a\u200bdmin/\u00adx\u2060' }) }])
  const invisible = await cli(['audit', '--agent', X, '--url', c.httpUrl!])
  t.match(invisible.stdout, /\/a\\u200bdmin\/\\u00adx\\u2060/, 'zero-width space, soft hyphen and word joiner escaped')
  // A path that writes fields of its own (two spaces, then rule=…), forges an escape, or is long.
  await c.store.append(id.id, [{ sequence: 3, event: makeEvent({ agent: X, path: '/x  rule=readonly  [sc-b#7]\\u001b' + 'y'.repeat(2000) }) }])
  const forgedFields = (await cli(['audit', '--agent', X, '--url', c.httpUrl!])).stdout.trim().split('\n').at(-1)!
  t.notMatch(forgedFields, /x {2}rule=readonly/, 'spaces in a field cannot separate fields')
  t.match(forgedFields, /\/x\\u0020\\u0020rule=readonly\\u0020\\u0020\[sc-b#7\]\\\\u001b/, 'shown escaped, the backslash too')
  t.match(forgedFields, /…\(\d+ more characters\)/, 'a long field is cut')
  t.ok(forgedFields.length < 1200, 'so the fields after it stay on the screen')
  const hexLimit = await cli(['audit', '--agent', X, '--limit', '0x10', '--url', c.httpUrl!])
  t.same([hexLimit.code, hexLimit.stderr.trim()], [1, '--limit "0x10" must be a whole number from 1 to 100000, in decimal digits'], 'the CLI refuses a limit that is not decimal digits')
  const badSince = await cli(['audit', '--agent', X, '--since', 'lastweek', '--url', c.httpUrl!])
  t.same([badSince.code, badSince.stderr.trim()], [1, '--since "lastweek" is neither a duration (like 24h, 30m, 7d), today, yesterday, nor an ISO-8601 time within range'], 'the CLI names its flag, as for --limit')
  const badLimit = await cli(['audit', '--agent', X, '--limit', '0', '-c', '/nonexistent.yaml'])
  t.same([badLimit.code, badLimit.stderr.trim()], [1, '--limit "0" must be a whole number from 1 to 100000, in decimal digits'], 'the limit is checked the same way against a store')
})

t.test('`audit verify -c` reads the store directly and names the first break', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  await c.store.append(id.id, Array.from({ length: 5 }, (_, i) => ({ sequence: i + 1, event: makeEvent({ agent: X }) })))
  await c.close()
  const dbPath = join(c.dir, 'audit.db')
  const cfg = join(c.dir, 'collector.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: sqlite, path: ${dbPath} }\n  sidecars: []\n`)
  const ok = await cli(['audit', 'verify', '-c', cfg])
  t.same([ok.code, ok.stdout.trim()], [0, 'chain verified: 5 events across 1 sidecars'])
  const db = openDatabase(dbPath)
  db.exec(`DROP TRIGGER audit_events_no_update; UPDATE audit_events SET payload = (SELECT payload FROM audit_events WHERE seq = 1) WHERE seq = 4`)
  db.close()
  const bad = await cliProcess(['audit', 'verify', '-c', cfg])
  t.equal(bad.code, 1)
  t.match(bad.stdout, `BROKEN: sidecar ${id.id} at position 4 (sequence 4): hash does not match the stored payload`)
  const rows = await cli(['audit', '--agent', X, '-c', cfg, '--json'])
  t.equal(rows.stdout.trim().split('\n').length, 5, 'queries work straight from the store too')
  const none = await cli(['audit', 'verify', '-c', cfg, '--sidecar', 'no-such-id'])
  t.same([none.code, none.stdout, none.stderr.trim()], [1, '', 'no sidecar "no-such-id" in the store'])
})

t.test('`audit verify --sidecar` for a sidecar the store never heard of fails, over the API too; gaps are listed', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  await c.store.append(id.id, [1, 2, 9].map((sequence) => ({ sequence, event: makeEvent({ agent: X }) })))
  const none = await cli(['audit', 'verify', '--url', c.httpUrl!, '--sidecar', 'no-such-id'])
  t.same([none.code, none.stdout, none.stderr.trim()], [1, '', `collector at ${c.httpUrl!}: no sidecar "no-such-id" in the store`])
  const gaps = await cli(['audit', 'verify', '--url', c.httpUrl!, '--sidecar', id.id])
  t.same([gaps.code, gaps.stdout.trim().split('\n')], [0, [`GAP: sidecar ${id.id} at position 3: sequence 9 follows 2; 6 sequence(s) never received`, 'chain verified: 3 events across 1 sidecars; 1 sequence gap(s), listed above']])
})

t.test('an empty --sidecar names a sidecar, none the store holds: 404 over the API, exit 1 from the CLI, both ways', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  await c.store.append(id.id, [1, 2, 3].map((sequence) => ({ sequence, event: makeEvent({ agent: X }) })))
  // Given and empty is a filter that matches nothing, never "every sidecar".
  const api = await request(`${c.httpUrl!}/v1/verify?sidecar=`)
  t.same([api.statusCode, await api.body.json()], [404, { error: 'no sidecar "" in the store' }], 'the API: ?sidecar= is a sidecar named ""')
  const all = await request(`${c.httpUrl!}/v1/verify`)
  t.match([all.statusCode, await all.body.json()], [200, { ok: true, checked: 3, sidecars: 1 }], 'without the parameter: every sidecar')
  const overApi = await cliProcess(['audit', 'verify', '--url', c.httpUrl!, '--sidecar', ''])
  t.same([overApi.code, overApi.stdout, overApi.stderr.trim()], [1, '', `collector at ${c.httpUrl!}: no sidecar "" in the store`], 'the CLI over the API')
  await c.close()
  const cfg = join(c.dir, 'collector.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: sqlite, path: ${join(c.dir, 'audit.db')} }\n  sidecars: []\n`)
  const fromStore = await cliProcess(['audit', 'verify', '-c', cfg, '--sidecar', ''])
  t.same([fromStore.code, fromStore.stdout, fromStore.stderr.trim()], [1, '', 'no sidecar "" in the store'], 'the CLI from the store says the same')
})

t.test('with reader tokens, the query API and the CLI need one', async (t) => {
  const id = sidecarIdentity()
  const reader = 'LKCANARY' + 'reader'.repeat(4)
  const { sha256hex } = await import('./collector-helpers.js')
  const c = await startTestCollector([id], { raw: { http: { host: '127.0.0.1', port: 0, reader_tokens_sha256: [sha256hex(reader)] } } })
  t.teardown(() => c.close())
  await c.store.append(id.id, [{ sequence: 1, event: makeEvent({ agent: X }) }])
  const none = await request(`${c.httpUrl}/v1/inventory`)
  t.equal(none.statusCode, 401)
  t.same(await none.body.json(), { error: 'a reader token is required (Authorization: Bearer <token>)' })
  const wrong = await request(`${c.httpUrl}/v1/inventory`, { headers: { authorization: 'Bearer nope' } })
  t.equal(wrong.statusCode, 401)
  await wrong.body.dump()
  const ok = await request(`${c.httpUrl}/v1/events?agent=${encodeURIComponent(X)}`, { headers: { authorization: `Bearer ${reader}` } })
  t.equal(ok.statusCode, 200)
  t.equal(((await ok.body.json()) as { count: number }).count, 1)
  t.equal((await request(`${c.httpUrl}/healthz`)).statusCode, 200, 'health stays open')
  const denied = await cli(['audit', '--agent', X, '--url', c.httpUrl!])
  t.same([denied.code, denied.stderr.trim()], [1, `collector at ${c.httpUrl}: requires a reader token: set LATCHKEY_COLLECTOR_READER_TOKEN`])
  const allowed = await run(process.execPath, [CLI, 'audit', '--agent', X, '--json', '--url', c.httpUrl!], {
    encoding: 'utf8',
    env: { ...process.env, LATCHKEY_COLLECTOR_READER_TOKEN: reader },
  })
  t.equal(allowed.stdout.trim().split('\n').length, 1)
  t.notMatch(c.logs.join(''), reader, 'the reader token is never logged')
})

t.test('without reader tokens, the query API answers local programs only: not a web page, by DNS rebinding or a cross-site request', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  await c.store.append(id.id, [{ sequence: 1, event: makeEvent({ agent: X }) }])
  const port = new URL(c.httpUrl!).port
  const refused: [string, Record<string, string>][] = [
    ['a rebound name', { host: `rebind.attacker.example:${port}` }],
    ['a rebound name with a trailing dot', { host: `rebind.attacker.example.:${port}` }],
    ['an Origin', { host: `127.0.0.1:${port}`, origin: 'http://attacker.example' }],
    ['a cross-site fetch', { host: `localhost:${port}`, 'sec-fetch-site': 'cross-site' }],
  ]
  for (const [what, headers] of refused) {
    for (const path of ['/v1/inventory', `/v1/events?agent=${encodeURIComponent(X)}`, '/healthz']) {
      const r = await request(`${c.httpUrl}${path}`, { headers })
      const body = (await r.body.json()) as { code?: string; events?: unknown }
      t.equal(r.statusCode, 403, `${what} ${path}: 403`)
      t.equal(body.code, 'LK_FOREIGN_ORIGIN', `${what} ${path}: coded`)
      t.notOk(body.events, `${what} ${path}: no events`)
    }
  }
  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`]) {
    const r = await request(`${c.httpUrl}/v1/events?agent=${encodeURIComponent(X)}`, { headers: { host } })
    t.equal(r.statusCode, 200, `${host}: a local program is answered`)
    t.equal(((await r.body.json()) as { count: number }).count, 1)
  }
  // The CLI, as an operator runs it.
  const listed = await cli(['audit', '--agent', X, '--url', c.httpUrl!])
  t.equal(listed.code, 0, 'latchkey audit still reads it')
})

t.test('a NUL in agent or sidecar is a 400 on both stores, not "store unavailable"', async (t) => {
  const { PostgresAuditStore } = await import('../../collector/store/postgres.js')
  const { PG_URL, uniqueSchema } = await import('./events.js')
  const pg = new PostgresAuditStore({ url: PG_URL, schema: uniqueSchema() })
  t.teardown(async () => {
    await pg.dropSchema()
    await pg.close()
  })
  for (const store of [undefined, pg]) {
    const id = sidecarIdentity()
    const c = await startTestCollector([id], { store })
    t.teardown(() => c.close())
    await c.store.append(id.id, [{ sequence: 1, event: makeEvent({ agent: X }) }])
    const get = async (path: string) => {
      const r = await request(c.httpUrl + path)
      return { status: r.statusCode, body: (await r.body.json()) as Record<string, unknown> }
    }
    t.same(await get(`/v1/events?agent=${encodeURIComponent(X)}%00`), { status: 400, body: { error: 'query parameter "agent" contains a NUL character, which no stored agent holds' } }, c.store.kind)
    t.same(await get(`/v1/verify?sidecar=${id.id}%00`), { status: 400, body: { error: 'query parameter "sidecar" contains a NUL character, which no stored sidecar holds' } }, c.store.kind)
    t.equal((await get(`/v1/events?agent=${encodeURIComponent(X)}`)).body.count, 1, `${c.store.kind}: the agent without the NUL is found`)
    t.notMatch(c.logs.join(''), /query failed/, `${c.store.kind}: nothing was sent to the store to fail`)
  }
})

t.test('a cursor whose time no Date holds is a 400 on both stores, never sent to the store', async (t) => {
  const { PostgresAuditStore } = await import('../../collector/store/postgres.js')
  const { PG_URL, uniqueSchema } = await import('./events.js')
  const pg = new PostgresAuditStore({ url: PG_URL, schema: uniqueSchema() })
  t.teardown(async () => {
    await pg.dropSchema()
    await pg.close()
  })
  for (const store of [undefined, pg]) {
    const id = sidecarIdentity()
    const c = await startTestCollector([id], { store })
    t.teardown(() => c.close())
    await c.store.append(id.id, [{ sequence: 1, event: makeEvent({ agent: X, ts: Date.now() - hour }) }])
    const get = async (path: string) => {
      const r = await request(c.httpUrl + path)
      return { status: r.statusCode, body: (await r.body.json()) as Record<string, unknown> }
    }
    // Cursors as the API encodes them (base64url of [time, sidecar, position]), with times a
    // Date cannot hold (±8.64e15 ms is its range) though they are safe integers, or not finite.
    const forged = (ts: string) => Buffer.from(`[${ts},${JSON.stringify(id.id)},1]`).toString('base64url')
    const events = (cursor: string) => get(`/v1/events?agent=${encodeURIComponent(X)}&since=7d&cursor=${cursor}`)
    for (const ts of ['8640000000000001', '9000000000000000', '-9000000000000000', '9007199254740991', '1e999']) {
      const cursor = forged(ts)
      t.same(await events(cursor), { status: 400, body: { error: `cursor "${cursor}" is not one this API gave: pass the "next" of the previous answer as it is` } }, `${c.store.kind}: time ${ts}`)
    }
    // The last instants a Date holds are still cursors (nothing lies after the one, all after the other).
    t.match(await events(forged('8640000000000000')), { status: 200, body: { count: 0 } }, `${c.store.kind}: the last instant a Date holds`)
    t.match(await events(forged('-8640000000000000')), { status: 200, body: { count: 1 } }, `${c.store.kind}: the first`)
    t.notMatch(c.logs.join(''), /query failed/, `${c.store.kind}: nothing was sent to the store to fail`)
  }
})

t.test('the events answer is bounded in bytes as well as rows, and says truncated when cut', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const now = Date.now()
  await c.store.append(id.id, Array.from({ length: 10 }, (_, i) => ({ sequence: i + 1, event: makeEvent({ agent: X, ts: now - 1000 + i, path: '/' + 'x'.repeat(60_000) }) })))
  const server = createQueryServer(c.store, createLogger('silent', 'test'), [], 200_000)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/events?agent=${encodeURIComponent(X)}&since=1h`
  const res = await request(url)
  const body = (await res.body.json()) as { count: number; truncated: boolean; events: Array<{ sequence: number }> }
  t.equal(res.statusCode, 200)
  t.same([body.count, body.truncated, body.events.map((e) => e.sequence)], [3, true, [1, 2, 3]], 'the rows within 200,000 bytes, and truncated')
  // The unit: a single oversized row is still shown; an answer under both bounds is whole.
  const big = { sidecar: 's', sequence: 1, position: 1, hash: '', event: makeEvent(), bytes: 500 }
  t.same(boundAnswer([big], 10, 100).events.length, 1)
  t.same(boundAnswer([big, { ...big, sequence: 2 }], 10, 100), { events: [big], truncated: true })
  t.same(boundAnswer([big, { ...big, sequence: 2 }], 10, 10_000).truncated, false)
  t.same(boundAnswer([big, { ...big, sequence: 2 }], 1, 10_000), { events: [big], truncated: true })
})
