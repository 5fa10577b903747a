// GET /v1/tasks, a page at a time: 10,000 open tasks in one answer were 12 MB, written in one
// JSON.stringify that held the event loop (every proxied call) for half a second.
//   ?limit=N     tasks per page, 1..MAX_LIST_LIMIT (default DEFAULT_LIST_LIMIT)
//   ?cursor=C    the `next_cursor` of the previous page, as it is
// An answer's `next` is the request for the next page (null on the last), `next_cursor` its cursor.
import type { TaskRegistry } from './registry.js'

export const DEFAULT_LIST_LIMIT = 100
/** About 1.2 MB and a few tens of milliseconds at the longest purposes. */
export const MAX_LIST_LIMIT = 1000

/** A query the listing refuses, saying which parameter and why (never repeating its value, which may be anything pasted). */
export class ListQueryError extends Error {}

const PARAMS: ReadonlySet<string> = new Set(['limit', 'cursor'])

/** Where a page starts and how long it is, from the request target's query. */
export function readListQuery(target: string, tasks: TaskRegistry): { after: number; limit: number } {
  const q = target.indexOf('?')
  const params = new URLSearchParams(q < 0 ? '' : target.slice(q + 1))
  const seen = new Set<string>()
  for (const name of params.keys()) {
    if (!PARAMS.has(name)) throw new ListQueryError(`unknown query parameter ${/^[a-z][a-z0-9_]{0,31}$/.test(name) ? JSON.stringify(name) : '(not repeated)'}; the parameters are limit, cursor`)
    if (seen.has(name)) throw new ListQueryError(`query parameter "${name}" is given twice (which one counts is ambiguous)`)
    seen.add(name)
  }
  const limitText = params.get('limit')
  const limit = limitText === null ? DEFAULT_LIST_LIMIT : /^[0-9]{1,4}$/.test(limitText) ? Number(limitText) : NaN
  if (!(limit >= 1 && limit <= MAX_LIST_LIMIT)) throw new ListQueryError(`limit must be a whole number from 1 to ${MAX_LIST_LIMIT}, in decimal digits`)
  const cursor = params.get('cursor')
  return { after: cursor === null ? 0 : readCursor(cursor, tasks), limit }
}

/** The cursor after the task listed as `listedAs`: opaque to callers. */
export function cursorAfter(tasks: TaskRegistry, listedAs: number): string {
  return Buffer.from(`t1:${tasks.run}:${listedAs}`).toString('base64url')
}

function readCursor(text: string, tasks: TaskRegistry): number {
  const m = /^t1:([A-Za-z0-9_-]{8}):([1-9][0-9]{0,14})$/.exec(/^[A-Za-z0-9_-]{1,64}$/.test(text) ? Buffer.from(text, 'base64url').toString('latin1') : '')
  if (!m) throw new ListQueryError('cursor is not one this API gave: pass the next_cursor of the previous answer as it is')
  if (m[1] !== tasks.run) throw new ListQueryError('cursor is from before the sidecar restarted (tasks live in its memory, and those are gone): list again without cursor')
  return Number(m[2])
}
