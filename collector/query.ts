// Shared by the HTTP API and the CLI: parsing "since", and the JSON shape of a stored event.
import { AuditEvent } from '../protos/gen/latchkey/v1/audit.js'
import type { EventCursor, StoredEvent } from './store/types.js'
import { MAX_DATE_MS } from '../lib/max-date.js'


const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** ISO-8601 as the API documents it: a date, optionally a time, optionally a zone. */
const ISO = /^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})?)?$/

/** Date.parse takes other spellings too, and rolls 2024-02-30 over to March 1st: neither is asked for. */
function parseIso(value: string): number {
  const m = ISO.exec(value)
  if (!m) return NaN
  const [y, mo, d, h = '0', mi = '0', sec = '0'] = m.slice(1) as string[]
  const day = new Date(Date.UTC(Number(y), Number(mo) - 1, Number(d)))
  if (day.getUTCMonth() !== Number(mo) - 1 || day.getUTCDate() !== Number(d) || Number(h) > 23 || Number(mi) > 59 || Number(sec) > 59) return NaN
  // A time without a zone is local time, as ECMAScript reads it. A date alone is that day's local
  // midnight too (ISO 8601's reading; ECMAScript's is UTC midnight), so `--since 2026-11-30` means
  // the operator's today, as `--since 2026-11-30T00:00` does, wherever the operator is.
  return Date.parse(m[4] === undefined ? `${value}T00:00` : value)
}

/**
 * A time bound: a duration before now (24h, 30m, 7d), `today` or `yesterday` (local midnight, as a
 * date alone is: "what did agent X do today" is since this midnight, not the last 24 hours), or an
 * ISO-8601 time; `name` is the parameter, for the error.
 */
export function parseSince(value: string, now = Date.now(), name = 'since'): Date {
  const v = value.trim()
  const day = DAYS_BACK[v.toLowerCase()]
  if (day !== undefined) {
    const midnight = new Date(now)
    // setDate, not 24 h: a day across a daylight-saving change is 23 or 25 hours.
    midnight.setHours(0, 0, 0, 0)
    midnight.setDate(midnight.getDate() - day)
    return midnight
  }
  const m = /^(\d+)([smhd])$/.exec(v)
  const t = m ? now - Number(m[1]) * UNITS[m[2]!]! : parseIso(v)
  // A Date holds ±8.64e15 ms; a duration reaching past that is a mistake, not "all of time".
  if (Number.isNaN(t) || Math.abs(t) > MAX_DATE_MS) {
    throw new Error(`${name} "${value.slice(0, 64)}" is neither a duration (like 24h, 30m, 7d), today, yesterday, nor an ISO-8601 time within range`)
  }
  return new Date(t)
}

const DAYS_BACK: Record<string, number> = Object.assign(Object.create(null) as Record<string, number>, { today: 0, yesterday: 1 })

export interface EventJson {
  sidecar: string
  sequence: number
  position: number
  hash: string
  event: unknown
}

export function eventToJson(e: StoredEvent): EventJson {
  return { sidecar: e.sidecar, sequence: e.sequence, position: e.position, hash: e.hash, event: AuditEvent.toJSON(e.event) }
}

/**
 * What one answer to "events of an agent" may hold, in stored payload bytes (its JSON is a few
 * times that at most): the store is asked for at most this much (EventQuery.maxBytes).
 */
export const MAX_ANSWER_BYTES = 16 * 1024 * 1024

/**
 * Cuts a store's answer, asked for `limit + 1` rows and `maxBytes`, to `limit` rows and the byte
 * budget. `truncated` says more may match: more rows than the limit, or the bytes reached the
 * budget (the row that reached it is dropped unless it is the only one, so one oversized event is
 * still shown).
 */
export function boundAnswer(events: StoredEvent[], limit: number, maxBytes: number): { events: StoredEvent[]; truncated: boolean } {
  let truncated = false
  if (events.length > limit) {
    events = events.slice(0, limit)
    truncated = true
  }
  let total = 0
  for (let i = 0; i < events.length; i++) {
    total += events[i]!.bytes ?? 0
    if (total >= maxBytes) {
      return { events: events.slice(0, Math.max(i, 1)), truncated: true }
    }
  }
  return { events, truncated }
}

/**
 * The most events one answer of the HTTP API holds, whatever `limit` asks: the rest is a next
 * page (`next`), so no single request makes the collector decode and serialise 100,000 events.
 */
export const MAX_PAGE_EVENTS = 1000

/** `limit` as the API and the CLI take it: a total of at most this many. */
export const MAX_LIMIT = 100_000

/**
 * A `limit` as typed: decimal digits only. Number() alone also took `0x10`, `1e3`, `5.0` and
 * ` 5`, so a typo'd or script-built value was read as some other count without a word.
 */
export function parseLimit(text: string, name = 'limit'): number {
  const n = /^[0-9]{1,7}$/.test(text) ? Number(text) : NaN
  if (!(n >= 1 && n <= MAX_LIMIT)) throw new Error(`${name} "${text.slice(0, 40)}" must be a whole number from 1 to ${MAX_LIMIT}, in decimal digits`)
  return n
}

/** Where a page that goes on after `e` starts (the stores' `after`). */
export function cursorAfter(e: StoredEvent): EventCursor {
  return { ts: e.event.timeUnixMs, sidecar: e.sidecar, position: e.position }
}

/** The cursor after an event, as an answer's `next` gives it: opaque to clients. A newest-first answer's says so. */
export function encodeCursor(e: StoredEvent, newest = false): string {
  const c = cursorAfter(e)
  return Buffer.from(JSON.stringify(newest ? [c.ts, c.sidecar, c.position, 'newest'] : [c.ts, c.sidecar, c.position])).toString('base64url')
}

/** `order` as the API takes it: oldest first (the default) or newest first. */
export function parseOrder(text: string | null): boolean {
  if (text === null || text === 'oldest') return false
  if (text === 'newest') return true
  throw new Error(`order "${text.slice(0, 40)}" must be oldest or newest`)
}

/** Throws (a message naming the parameter) when `text` is not a cursor this API gave. */
export function decodeCursor(text: string): EventCursor {
  let v: unknown
  try {
    v = JSON.parse(Buffer.from(text, 'base64url').toString('utf8'))
  } catch {
    v = null
  }
  if (
    !Array.isArray(v) ||
    !(v.length === 3 || (v.length === 4 && v[3] === 'newest')) ||
    !Number.isSafeInteger(v[0]) ||
    // A time no Date holds: SQLite answered it an empty page, PostgreSQL "store unavailable".
    Math.abs(v[0] as number) > MAX_DATE_MS ||
    typeof v[1] !== 'string' ||
    v[1].includes('\u0000') ||
    !Number.isSafeInteger(v[2]) ||
    (v[2] as number) < 0
  ) {
    throw new Error(`cursor "${text.slice(0, 64)}" is not one this API gave: pass the "next" of the previous answer as it is`)
  }
  return { ts: v[0] as number, sidecar: v[1], position: v[2] as number, ...(v.length === 4 ? { newest: true } : {}) }
}
