// The operator CLI's client of a collector's query API (`latchkey audit --url`). Imported by
// collector/cli.ts only for --url: `audit -c` reads the store and never needs an HTTP client
// (undici was a fifth of its start). A module of its own, not `await import('undici')`: in the
// bundled CLI (scripts/bundle.mjs) a dynamically imported CommonJS package has only a default export.
import { request } from 'undici'
import { withoutUserinfo } from '../lib/without-userinfo.js'
import { readJsonObject } from '../lib/json-answer.js'
import { CliError } from './cli-error.js'

/** The query API's reader token, if the collector requires one: from the environment, never argv. */
const TOKEN_ENV = 'LATCHKEY_COLLECTOR_READER_TOKEN'

/** How long the CLI waits, in all, for a collector busy with other queries (503 LK_COLLECTOR_BUSY). */
const BUSY_WAIT_MS = 60_000

/**
 * The most of an answer the CLI reads. A collector's largest (a page of events, MAX_ANSWER_BYTES
 * of payloads as JSON) is some tens of MiB; another service at a mistyped --url can send without
 * end, and the whole body was read into memory (1.4 GB in 30 s) before it was found not to be JSON.
 */
export const MAX_ANSWER_READ_BYTES = 256 * 1024 * 1024

/**
 * How long the CLI waits for a collector to say anything at all, asked first for /healthz (which
 * reads no store and waits on no other query): a --url that took the connection and never
 * answered held the command five minutes (undici's headers timeout) on every subcommand.
 */
export const SILENT_PEER_MS = 10_000

/**
 * How long a query's answer may wait for its head once /healthz answered: a verify of a large
 * store is legitimately slow, and the collector sends its head only with the verdict.
 */
const QUERY_HEAD_MS = 300_000

/** How long an answer may stall once its head came: the collector writes a body it has already serialised. */
export const BODY_STALL_MS = 30_000

/** Bases whose /healthz answered in this process: asked once, not for every page. */
const answered = new Set<string>()

/** What is said when the answer at `shown` is not one a collector's query API gives: never the body, which is another service's. */
export function notACollector(shown: string, status: number, why = 'is not JSON'): CliError {
  return new CliError(`collector at ${shown}: the answer (HTTP ${status}) ${why}: not a Latchkey collector's query API; check --url`)
}

/** What went wrong with a request, in one line naming the URL; a timeout says which wait ran out. */
function failure(shown: string, err: unknown, path: string, headMs: number, bodyMs: number): CliError {
  const code = (err as NodeJS.ErrnoException).code
  if (code === 'UND_ERR_HEADERS_TIMEOUT') return new CliError(`collector at ${shown}: no answer to GET ${path} within ${headMs / 1000} s (headers timeout; the connection was taken, nothing was said); check --url`)
  if (code === 'UND_ERR_BODY_TIMEOUT') return new CliError(`collector at ${shown}: the answer to GET ${path} stopped for ${bodyMs / 1000} s part-way (body timeout); check --url`)
  return new CliError(`collector at ${shown} unreachable: ${code ?? 'error'}`)
}

/**
 * Whether anything answers at `base`, asked of /healthz with a short wait: a peer that takes the
 * connection and says nothing fails here in seconds, while a slow query to a collector that
 * answered may take minutes. Its answer is not judged: the query's own answer is.
 */
async function answers(base: string, shown: string, waitMs: number): Promise<void> {
  if (answered.has(base)) return
  try {
    const res = await request(new URL('/healthz', base), { headersTimeout: waitMs, bodyTimeout: waitMs })
    // Read at most a little of it: a collector's is a line; another service's may have no end.
    await readJsonObject(res.body, 64 * 1024)
  } catch (err) {
    throw failure(shown, err, '/healthz', waitMs, waitMs)
  }
  answered.add(base)
}

export async function getJson<T>(base: string, path: string, o: { maxBytes?: number; silentPeerMs?: number; stallMs?: number } = {}): Promise<{ status: number; body: T; shown: string }> {
  const maxBytes = o.maxBytes ?? MAX_ANSWER_READ_BYTES
  const stallMs = o.stallMs ?? BODY_STALL_MS
  let res
  let body: T
  const token = process.env[TOKEN_ENV]
  // Named in errors without its userinfo (`--url http://user:password@host`); its code, not the client's message, which can quote it.
  const shown = withoutUserinfo(base)
  await answers(base, shown, o.silentPeerMs ?? SILENT_PEER_MS)
  for (let waited = 0; ; ) {
    try {
      res = await request(new URL(path, base), { headersTimeout: QUERY_HEAD_MS, bodyTimeout: stallMs, ...(token ? { headers: { authorization: `Bearer ${token}` } } : {}) })
    } catch (err) {
      throw failure(shown, err, path.split('?')[0]!, QUERY_HEAD_MS, stallMs)
    }
    let read
    try {
      read = await readJsonObject(res.body, maxBytes)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'UND_ERR_BODY_TIMEOUT') throw failure(shown, err, path.split('?')[0]!, QUERY_HEAD_MS, stallMs)
      throw new CliError(`collector at ${shown}: the answer was cut short: ${(err as NodeJS.ErrnoException).code ?? 'error'}`)
    }
    if (read === 'too large') throw notACollector(shown, res.statusCode, `is larger than ${maxBytes} bytes`)
    if (read === undefined) throw notACollector(shown, res.statusCode)
    body = read as T
    // Busy with other queries: wait as it asks, then ask again.
    if (res.statusCode !== 503 || (body as { code?: string }).code !== 'LK_COLLECTOR_BUSY' || waited >= BUSY_WAIT_MS) break
    const ms = Math.min(Math.max(Number(res.headers['retry-after']) || 1, 1), 10) * 1000
    await new Promise((resolve) => setTimeout(resolve, ms))
    waited += ms
  }
  if (res.statusCode === 401) throw new CliError(`collector at ${shown}: ${token ? `the token in ${TOKEN_ENV} was refused` : `requires a reader token: set ${TOKEN_ENV}`}`)
  if (res.statusCode >= 400 && res.statusCode !== 409) throw new CliError(`collector at ${shown}: ${(body as { error?: string }).error ?? `HTTP ${res.statusCode}`}`)
  return { status: res.statusCode, body, shown }
}
