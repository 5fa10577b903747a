// `latchkey audit --since <time>` as the operator typed it: one meaning, whichever way the CLI asks.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { makeEvent } from './events.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { CLI } from '../helpers/cli.js'
import { parseSince } from '../../collector/query.js'

const run = promisify(execFile)
const X = 'agent:x:prod:1'

/**
 * A collector holding three calls by X, at 08:00Z and 12:00Z on 2026-11-29 and 01:00Z on 11-30
 * (paths as given), and a config file that reads its store directly (-c).
 */
async function collectorWithCalls(t: { teardown(fn: () => unknown): void }, paths: [string, string, string]) {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const at = ['2026-11-29T08:00:00Z', '2026-11-29T12:00:00Z', '2026-11-30T01:00:00Z']
  await c.store.append(id.id, at.map((ts, i) => ({ sequence: i + 1, event: makeEvent({ agent: X, ts: Date.parse(ts), path: paths[i] }) })))
  const configFile = join(c.dir, 'collector.yaml')
  writeFileSync(configFile, JSON.stringify({ version: 1, collector: { store: c.config.collector.store, sidecars: [] } }))
  return { c, configFile }
}

/** `latchkey audit …` run by an operator in time zone `tz`. */
const auditIn = (tz: string, args: string[]) =>
  run(process.execPath, [CLI, 'audit', ...args], { encoding: 'utf8', env: { ...process.env, TZ: tz } })
// The operator is at UTC+14 (the collector, in this process, is not): "today" starts at 10:00 UTC the day before.
const KIRITIMATI = 'Etc/GMT-14'
/** The path of each call `audit` printed, in order. */
const paths = (stdout: string) => stdout.trim().split('\n').filter(Boolean).map((l) => /https:\/\/[^/]+(\/[a-z-]+)/.exec(l)?.[1])

t.test("`audit --since` without a zone is the operator's local time, through --url as with -c", async (t) => {
  const { c, configFile } = await collectorWithCalls(t, ['/before-midnight-in-kiritimati', '/after-midnight-in-kiritimati', '/after-midnight-utc'])
  const viaUrl = await auditIn(KIRITIMATI, ['--agent', X, '--since', '2026-11-30T00:00', '--url', c.httpUrl!])
  const viaStore = await auditIn(KIRITIMATI, ['--agent', X, '--since', '2026-11-30T00:00', '-c', configFile])
  t.same(paths(viaStore.stdout), ['/after-midnight-in-kiritimati', '/after-midnight-utc'], 'read from the store: the CLI reads the time in its own zone')
  t.same(paths(viaUrl.stdout), paths(viaStore.stdout), 'asked through the API: the same answer, not one in the collector host\'s zone')
  t.match(viaUrl.stderr, `2 call(s) by ${X} since 2026-11-30T00:00`)
})

t.test('`audit --since <date>` is that day from the operator\'s midnight ("today"), through --url as with -c', async (t) => {
  const { c, configFile } = await collectorWithCalls(t, ['/yesterday-in-kiritimati', '/today-in-kiritimati', '/after-midnight-utc'])
  // At UTC+14, 2026-11-30 begins at 2026-11-29T10:00Z: read as UTC midnight it would drop the
  // morning's calls; at UTC-10 it would add the afternoon before.
  const viaStore = await auditIn(KIRITIMATI, ['--agent', X, '--since', '2026-11-30', '-c', configFile])
  const viaUrl = await auditIn(KIRITIMATI, ['--agent', X, '--since', '2026-11-30', '--url', c.httpUrl!])
  t.same(paths(viaStore.stdout), ['/today-in-kiritimati', '/after-midnight-utc'], 'a date alone starts at the operator\'s midnight, as 2026-11-30T00:00 does')
  t.same(paths(viaUrl.stdout), paths(viaStore.stdout), 'the same answer through the API')
  const inHonolulu = await auditIn('Etc/GMT+10', ['--agent', X, '--since', '2026-11-29', '-c', configFile])
  t.same(paths(inHonolulu.stdout), ['/today-in-kiritimati', '/after-midnight-utc'], 'at UTC-10, 2026-11-29 starts at 10:00Z: the event at 08:00Z was the day before')
})

t.test('`--since today` and `yesterday` start at the local midnight, across a daylight-saving change too', async (t) => {
  // In this process, as the CLI resolves --since in its own (the API is sent the instant).
  const was = process.env.TZ
  t.teardown(() => {
    if (was === undefined) delete process.env.TZ
    else process.env.TZ = was
  })
  process.env.TZ = KIRITIMATI
  const evening = Date.parse('2026-11-30T05:00:00Z') // 19:00 on 11-30 at UTC+14
  t.equal(parseSince('today', evening).toISOString(), '2026-11-29T10:00:00.000Z', "today: since this day's midnight there, not the last 24 hours")
  t.equal(parseSince(' Yesterday ', evening).toISOString(), '2026-11-28T10:00:00.000Z', 'yesterday: the midnight before')
  // New York leaves daylight saving at 02:00 on 2026-11-01: that day is 25 hours long.
  process.env.TZ = 'America/New_York'
  const afternoon = Date.parse('2026-11-01T18:00:00Z') // 13:00 EST
  t.equal(parseSince('today', afternoon).toISOString(), '2026-11-01T04:00:00.000Z', 'midnight was still EDT (UTC-4)')
  t.equal(parseSince('yesterday', afternoon).toISOString(), '2026-10-31T04:00:00.000Z', 'a day back by the calendar, not 24 hours')
  t.throws(() => parseSince('tomorrow', afternoon), /since "tomorrow" is neither a duration \(like 24h, 30m, 7d\), today, yesterday, nor an ISO-8601 time/)
})
