// `latchkey audit --agent` with an ID the store has never seen, or with revoke's pattern syntax:
// both answered "0 call(s) by … since 24h", exit 0, which reads exactly as "this agent did
// nothing" to an operator who mistyped the ID or copied it from a revoke. Over the query API and
// straight from the store (-c), as an operator runs the CLI.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { makeEvent } from './events.js'
import { sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { CLI } from '../helpers/cli.js'
import { auditInProcess } from '../helpers/audit-cli.js'

const run = promisify(execFile)
/** `latchkey …` as a process: the first question (over --url), proving the wiring; the rest in-process (helpers/audit-cli.ts). */
const cliProcess = (args: string[]) =>
  run(process.execPath, [CLI, ...args], { encoding: 'utf8' }).then(
    (r) => ({ code: 0, stdout: r.stdout, stderr: r.stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  )

const ONE = 'agent:demo:dev:one'
const TWO = 'agent:demo:dev:two'
const OTHER = 'agent:coder:prod:1'
const hour = 3_600_000

t.test('an unseen agent ID or a pattern is said to be one, over the API and from the store', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  const now = Date.now()
  await c.store.append(id.id, [
    { sequence: 1, event: makeEvent({ agent: ONE, ts: now - 48 * hour, path: '/old' }) },
    { sequence: 2, event: makeEvent({ agent: TWO, ts: now - hour, path: '/a' }) },
    { sequence: 3, event: makeEvent({ agent: OTHER, ts: now - hour, path: '/b' }) },
  ])
  const cfg = join(c.dir, 'collector.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: sqlite, path: ${join(c.dir, 'audit.db')} }\n  sidecars: []\n`)
  t.teardown(() => c.close())

  for (const [how, where] of [
    ['--url', c.httpUrl!],
    ['-c', cfg],
  ] as const) {
    const typo = await (how === '--url' ? cliProcess : auditInProcess)(['audit', '--agent', 'agent:demo:dev:oen', how, where])
    t.equal(typo.code, 0, `${how}: a query that ran`)
    t.equal(typo.stdout, '')
    t.match(typo.stderr, `no call by agent:demo:dev:oen is in the store at any time: check the ID; the store holds calls by ${OTHER}, ${ONE}, ${TWO}`, `${how}: a mistyped ID is said to be unseen`)
    t.match(typo.stderr, '0 call(s) by agent:demo:dev:oen since 24h')

    const pattern = await auditInProcess(['audit', '--agent', 'agent:demo:*:*', how, where])
    t.equal(pattern.code, 1, `${how}: a pattern is refused`)
    t.match(pattern.stderr, `--agent takes one agent instance ID, not a pattern (agent:demo:*:*): the store holds calls by 2 agent(s) it matches: ${ONE}, ${TWO}`)
    t.notMatch(pattern.stderr, '0 call(s)')

    // What is new is said the same both ways; an answer that was right before, over the API only.
    if (how === '-c') continue
    const idle = await auditInProcess(['audit', '--agent', ONE, how, where])
    t.same([idle.code, idle.stderr.trim()], [0, `0 call(s) by ${ONE} since 24h`], `${how}: an agent seen before, idle today, is just 0 calls`)

    // A year mistyped: no call can be that recent, whoever the agent.
    const future = await auditInProcess(['audit', '--agent', TWO, '--since', '2206-12-04', how, where])
    t.same([future.code, future.stdout], [0, ''], `${how}: a --since in the future is a query that ran`)
    t.match(future.stderr, /^--since 2206-12-04 is 2206-12-0[34]T\d\d:00:00\.000Z, in the future: no call is recorded after now\n0 call\(s\) by agent:demo:dev:two since 2206-12-04\n$/, `${how}: and says so, not that the agent is unseen`)

    const found = await auditInProcess(['audit', '--agent', TWO, how, where])
    t.same([found.code, found.stdout.split('\n').length, found.stderr.trim()], [0, 2, `1 call(s) by ${TWO} since 24h`], `${how}: a query with calls is as it was`)
  }
})
