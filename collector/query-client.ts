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

/** What is said when the answer at `shown` is not one a collector's query API gives: never the body, which is another service's. */
export function notACollector(shown: string, status: number, why = 'is not JSON'): CliError {
  return new CliError(`collector at ${shown}: the answer (HTTP ${status}) ${why}: not a Latchkey collector's query API; check --url`)
}

export async function getJson<T>(base: string, path: string, maxBytes = MAX_ANSWER_READ_BYTES): Promise<{ status: number; body: T; shown: string }> {
  let res
  let body: T
  const token = process.env[TOKEN_ENV]
  // Named in errors without its userinfo (`--url http://user:password@host`); its code, not the client's message, which can quote it.
  const shown = withoutUserinfo(base)
  for (let waited = 0; ; ) {
    try {
      res = await request(new URL(path, base), token ? { headers: { authorization: `Bearer ${token}` } } : {})
    } catch (err) {
      throw new CliError(`collector at ${shown} unreachable: ${(err as NodeJS.ErrnoException).code ?? 'error'}`)
    }
    let read
    try {
      read = await readJsonObject(res.body, maxBytes)
    } catch (err) {
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
