// CLI commands of the collector: `latchkey collector -c collector.yaml`, and the operator's
// `latchkey audit --agent <id> --since 24h [--denied] [--json]` and `latchkey audit verify`.
// Queries go to a collector's HTTP API (--url), or straight to its store (-c collector.yaml), opened
// read-only: never created or migrated here, only by the collector that owns it.
import type { Command } from 'commander'
import { Action, AuditEvent } from '../protos/gen/latchkey/v1/audit.js'
import { MAX_ANSWER_BYTES, MAX_PAGE_EVENTS, boundAnswer, cursorAfter, eventToJson, parseLimit, parseSince, type EventJson } from './query.js'
import type { AuditStore, EventCursor, VerifyResult } from './store/types.js'
import type { CollectorConfig } from './config.js'
import { CliError } from './cli-error.js'
import { agentMatches } from '../lib/agent-pattern.js'

const DEFAULT_URL = 'http://127.0.0.1:15101'

/**
 * Where the operator's commands print and how they end. The process's own (CONSOLE) prints to
 * stdout and stderr and exits; a test passes its own to run `audit` in-process, and reads what
 * it printed and the code it would have exited with.
 */
export interface CliIo {
  /** A line for standard output. */
  out(line: string): void
  /** A line for standard error. */
  err(line: string): void
  /** The command ends with this exit code once it returns (verify: 1 when a chain is broken). */
  exitCode(code: number): void
  /** The command failed: its error said in one line, then exit 1 at once. */
  fail(err: unknown): void
}

/** The error as the operator reads it: a CliError or a ConfigError (LK_CONFIG_INVALID) by its message, which names each problem. */
export function failureLine(err: unknown): string {
  // LK_CONFIG_INVALID is matched by code, so that a query command does not load the config loader to recognise one.
  if (err instanceof CliError || (err as { code?: unknown } | null)?.code === 'LK_CONFIG_INVALID') return (err as Error).message
  return err instanceof Error ? err.message : String(err)
}

const CONSOLE: CliIo = {
  out: (line) => console.log(line),
  err: (line) => console.error(line),
  exitCode: (code) => void (process.exitCode = code),
  fail: (err) => {
    console.error(failureLine(err))
    process.exit(1)
  },
}

const ACTION_NAMES: Record<string, string> = { ACTION_ALLOW: 'allow', ACTION_DENY: 'deny', ACTION_REPORT: 'report', ACTION_UNSPECIFIED: '-' }

export function formatEvent(e: EventJson): string {
  const ev = AuditEvent.fromJSON(e.event)
  const c = ev.call
  const d = ev.decision
  const target = c ? `${printable(c.method)} ${printable(`${c.scheme}://${c.host}${c.port ? `:${c.port}` : ''}${c.path}`)}` : '-'
  const action = ACTION_NAMES[d ? (Object.keys(Action).find((k) => Action[k as keyof typeof Action] === d.action) ?? '') : ''] ?? '-'
  return [
    new Date(ev.timeUnixMs).toISOString(),
    action.padEnd(6),
    String(c?.status ?? '-').padEnd(3),
    target,
    c?.destination ? `destination=${printable(c.destination)}` : '',
    d?.rule ? `rule=${printable(d.rule)}` : '',
    ev.credential?.audience ? `aud=${printable(ev.credential.audience)}` : '',
    d?.error ? `error=${printable(d.error)}` : '',
    `[${printable(e.sidecar)}#${e.sequence}]`,
  ]
    .filter(Boolean)
    .join('  ')
}

/**
 * A stored field as a terminal may show it: control characters (CR, ESC, NUL, …), line and
 * paragraph separators, bidi overrides and invisible characters (zero-width, soft hyphen, word
 * joiner) escaped, so no stored event can draw a line of its own, move the text around it, or
 * pass for another (`\u200bagent:…`); spaces too, as fields are separated by them (a path must
 * not write `  rule=…` of its own), and `\` itself, so an escape cannot be forged; at most
 * MAX_FIELD characters, so one field cannot push the rest off the screen.
 */
function printable(s: string): string {
  const escaped = s.slice(0, MAX_FIELD).replace(/[\\\p{Cc}\p{Cf}\p{Z}\p{Default_Ignorable_Code_Point}]/gu, (ch) => (ch === '\\' ? '\\\\' : `\\u${ch.codePointAt(0)!.toString(16).padStart(4, '0')}`))
  return s.length > MAX_FIELD ? `${escaped}…(${s.length - MAX_FIELD} more characters)` : escaped
}
const MAX_FIELD = 512

/** At most this many agent IDs are named when an answer is explained. */
const MAX_NAMED_AGENTS = 10

function named(agents: string[]): string {
  const shown = agents.slice(0, MAX_NAMED_AGENTS).map(printable).join(', ')
  return agents.length > MAX_NAMED_AGENTS ? `${shown} and ${agents.length - MAX_NAMED_AGENTS} more` : shown
}

/**
 * `--agent agent:demo:*:*`, revoke's pattern syntax: the store is asked for one instance ID, and
 * answered "0 call(s)" for the pattern, read as "these agents did nothing". Refused, naming the
 * agents it matches.
 */
function notAPattern(pattern: string, agents: string[]): string {
  const matching = agents.filter((a) => agentMatches(pattern, a))
  return (
    `--agent takes one agent instance ID, not a pattern (${printable(pattern)}): ` +
    (matching.length ? `the store holds calls by ${matching.length} agent(s) it matches: ${named(matching)}` : 'the store holds no call by any agent it matches')
  )
}

/**
 * No call in the window: say so when the store holds none by this agent at any time (a mistyped ID
 * reads exactly as an idle agent), naming the agents it does hold. On stderr; a store that cannot
 * say (a busy collector) adds nothing.
 */
/**
 * Why an answer is empty, when the question says: a --since in the future (a mistyped year, an
 * ISO time read in the wrong zone) matches nothing by any agent, and "0 call(s)" read as an idle one.
 */
async function nothingShown(agent: string, since: Date, asked: string, knownAgents: () => Promise<string[]>, io: CliIo): Promise<void> {
  if (since.getTime() > Date.now()) io.err(`--since ${printable(asked)} is ${since.toISOString()}, in the future: no call is recorded after now`)
  else await unseen(agent, knownAgents, io)
}

async function unseen(agent: string, knownAgents: () => Promise<string[]>, io: CliIo): Promise<void> {
  let agents: string[]
  try {
    agents = await knownAgents()
  } catch {
    return
  }
  if (agents.includes(agent)) return
  io.err(`no call by ${printable(agent)} is in the store at any time: check the ID; ${agents.length ? `the store holds calls by ${named(agents)}` : 'the store holds no call yet'}`)
}

function printVerify(v: VerifyResult, io: CliIo): void {
  // Gaps first: the chain holds, but what the sidecar numbered under them is not on record.
  for (const g of v.gaps ?? []) {
    io.out(
      g.sequence > g.previous
        ? `GAP: sidecar ${printable(g.sidecar)} at position ${g.position}: sequence ${g.sequence} follows ${g.previous}; ${g.sequence - g.previous - 1} sequence(s) never received`
        : `GAP: sidecar ${printable(g.sidecar)} at position ${g.position}: sequence ${g.sequence} follows ${g.previous}, stored below its chain's head`,
    )
  }
  if (v.gapCount && v.gapCount > (v.gaps?.length ?? 0)) io.out(`… ${v.gapCount - (v.gaps?.length ?? 0)} more gap(s)`)
  if (v.ok) io.out(`chain verified: ${v.checked} events across ${v.sidecars} sidecars${v.gapCount ? `; ${v.gapCount} sequence gap(s), listed above` : ''}`)
  else {
    for (const b of v.breaks) io.out(`BROKEN: sidecar ${b.sidecar} at position ${b.position} (sequence ${b.sequence}): ${b.reason}`)
    io.out(`${v.breaks.length} chain(s) broken; ${v.checked} events checked across ${v.sidecars} sidecars`)
  }
}

// A query over --url needs none of the collector's server, stores or config loader (gRPC, NATS,
// PostgreSQL, SQLite, Ajv: most of a CLI start's 0.5 s); they load when a command uses them.
async function loadConfig(file: string): Promise<CollectorConfig> {
  return (await import('./config.js')).loadCollectorConfig(file)
}

/**
 * The store named in a collector config, opened read-only: one that is not there (a typo in the
 * path or schema, a volume not mounted) is an error naming the setting, never an empty store
 * created on the spot and reported on as "0 calls", "chain verified".
 */
async function openConfiguredStore(file: string): Promise<AuditStore> {
  const [{ openStoreReadOnly }, config] = await Promise.all([import('./collector.js'), loadConfig(file)])
  return openStoreReadOnly(config.collector.store)
}

export function registerCollectorCommands(program: Command, onShutdown: (close: () => Promise<void>) => void, io: CliIo = CONSOLE): void {
  program
    .command('collector')
    .description('run the audit collector: gRPC ingest from sidecars, the store, the query API')
    .requiredOption('-c, --config <file>', 'collector config file (YAML, version: 1)')
    .action(async (opts: { config: string }) => {
      try {
        const [{ startCollector }, config] = await Promise.all([import('./collector.js'), loadConfig(opts.config)])
        const running = await startCollector(config)
        onShutdown(running.close)
      } catch (err) {
        io.fail(err)
      }
    })

  const audit = program
    .command('audit')
    .description("what an agent did: its calls since a time, from the collector")
    .option('--agent <id>', 'agent instance ID, e.g. agent:summarizer:prod:7a2c91')
    .option('--since <when>', 'duration back from now (24h, 30m, 7d), today or yesterday (from local midnight), or an ISO-8601 time', '24h')
    .option('--denied', 'only calls policy denied (enforced or report-only)')
    .option('--json', 'one JSON object per line')
    .option('--limit <n>', 'at most this many events', '10000')
    .option('--newest', 'newest first (the latest calls, when more than --limit match); default oldest first')
    .option('--url <url>', "the collector's HTTP query API", DEFAULT_URL)
    .option('-c, --config <file>', 'read the store named in this collector config directly (read-only; it must exist) instead of --url')
    .action(async (opts: { agent?: string; since: string; denied?: boolean; json?: boolean; limit: string; newest?: boolean; url: string; config?: string }) => {
      try {
        if (!opts.agent) throw new CliError('--agent <id> is required (e.g. --agent agent:summarizer:prod:7a2c91)')
        let limit: number
        try {
          limit = parseLimit(opts.limit, '--limit')
        } catch (err) {
          throw new CliError((err as Error).message)
        }
        // Page by page (an answer holds at most MAX_PAGE_EVENTS), each printed as it comes, until
        // the limit or the last page.
        let shown = 0
        let truncated = false
        const print = (events: EventJson[]) => {
          for (const e of events) io.out(opts.json ? JSON.stringify(e) : formatEvent(e))
          shown += events.length
        }
        const since = parseSince(opts.since, Date.now(), '--since')
        const agent = opts.agent
        // The agents the store holds any call by: asked only to explain an empty or impossible answer.
        let knownAgents: () => Promise<string[]>
        if (opts.config) {
          const store = await openConfiguredStore(opts.config)
          knownAgents = async () => (await store.inventory()).agents.map((a) => a.agent)
          try {
            if (agent.includes('*')) throw new CliError(notAPattern(agent, await knownAgents()))
            let after: EventCursor | undefined
            do {
              const page = Math.min(limit - shown, MAX_PAGE_EVENTS)
              const answer = boundAnswer(await store.eventsByAgent({ agent: opts.agent, since, deniedOnly: !!opts.denied, limit: page + 1, maxBytes: MAX_ANSWER_BYTES, after, newest: !!opts.newest }), page, MAX_ANSWER_BYTES)
              print(answer.events.map(eventToJson))
              truncated = answer.truncated
              const last = answer.events[answer.events.length - 1]
              after = last && cursorAfter(last)
            } while (truncated && after && shown < limit)
            if (shown === 0) await nothingShown(agent, since, opts.since, knownAgents, io)
          } finally {
            await store.close()
          }
        } else {
          // Resolved here, as with -c: a time without a zone is the operator's local time, not
          // the collector host's (which the API would read it in).
          const { getJson, notACollector } = await import('./query-client.js')
          // Each answer's shape checked before use: another service's JSON at a mistyped --url was a TypeError ("not iterable").
          knownAgents = async () => {
            const { status, body, shown: at } = await getJson<{ agents?: unknown }>(opts.url, '/v1/inventory')
            if (!Array.isArray(body.agents)) throw notACollector(at, status, 'holds no agents list')
            return (body.agents as { agent: string }[]).map((a) => a.agent)
          }
          if (agent.includes('*')) throw new CliError(notAPattern(agent, await knownAgents()))
          let cursor: string | undefined
          do {
            const q = new URLSearchParams({ agent: opts.agent, since: since.toISOString(), limit: String(limit - shown) })
            if (opts.denied) q.set('denied', 'true')
            if (opts.newest) q.set('order', 'newest')
            if (cursor) q.set('cursor', cursor)
            const { status, body, shown: at } = await getJson<{ events?: unknown; truncated?: boolean; next?: string }>(opts.url, `/v1/events?${q}`)
            if (!Array.isArray(body.events)) throw notACollector(at, status, 'holds no events list')
            print(body.events as EventJson[])
            truncated = body.truncated === true
            cursor = body.next
          } while (truncated && cursor && shown < limit)
          if (shown === 0) await nothingShown(agent, since, opts.since, knownAgents, io)
        }
        if (!opts.json) {
          io.err(`${shown} call(s) by ${opts.agent} since ${opts.since}${opts.denied ? ' (denied only)' : ''}`)
          if (truncated) io.err(`more calls match: these are the ${opts.newest ? 'newest' : 'oldest'} ${shown}; narrow --since or raise --limit${opts.newest ? '' : ', or ask for the newest (--newest)'}`)
        }
      } catch (err) {
        io.fail(err)
      }
    })

  audit
    .command('verify')
    .description('recompute every hash chain in the store; exit 1 naming the first break of each broken chain')
    .option('--sidecar <id>', 'only this sidecar')
    .action(async (own: { sidecar?: string }) => {
      // --url and -c belong to `audit` (commander parses parent options anywhere on the line).
      const opts = { ...(audit.opts() as { url: string; config?: string }), ...own }
      try {
        let v: VerifyResult
        if (opts.config) {
          const store = await openConfiguredStore(opts.config)
          try {
            v = await store.verify(opts.sidecar)
          } finally {
            await store.close()
          }
          if (opts.sidecar !== undefined && v.sidecars === 0 && v.ok) throw new CliError(`no sidecar "${printable(opts.sidecar)}" in the store`)
        } else {
          const { getJson, notACollector } = await import('./query-client.js')
          // `--sidecar ''` is asked about as given (the API answers 404, as the store's path does): never dropped into "every sidecar".
          const { status, body, shown } = await getJson<VerifyResult>(opts.url, `/v1/verify${opts.sidecar !== undefined ? `?${new URLSearchParams({ sidecar: opts.sidecar })}` : ''}`)
          // Not a verdict: "chain verified" or "broken" printed from another service's JSON would be believed.
          if (typeof body.ok !== 'boolean' || !Array.isArray(body.breaks) || typeof body.checked !== 'number') throw notACollector(shown, status, 'is no verification result')
          v = body
        }
        printVerify(v, io)
        io.exitCode(v.ok ? 0 : 1)
      } catch (err) {
        io.fail(err)
      }
    })
}
