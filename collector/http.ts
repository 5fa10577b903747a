// The collector's read-only HTTP query API (loopback by default):
//   GET /v1/events?agent=<id>&since=24h[&until=<iso>][&denied=true][&limit=N][&order=oldest|newest][&cursor=<next>]
//       at most MAX_PAGE_EVENTS events an answer; `next` continues where a cut answer ended
//   GET /v1/inventory
//   GET /v1/verify[?sidecar=<id>]
//   GET /healthz   the process answers (liveness)
//   GET /readyz    the store answers too: 503 while it does not (a wrong URL, a database down)
//   GET /metrics   Prometheus (collector/metrics.ts): counts and sidecar IDs, no event; no token needed, as /readyz
import { createHash, timingSafeEqual } from 'node:crypto'
import type { IncomingHttpHeaders, Server, ServerResponse } from 'node:http'
import { createServer } from '../lib/node-http.js'
import type { AuditStore, EventCursor, StoredEvent } from './store/types.js'
import type { Logger } from '../lib/log.js'
import type { Registry } from 'prom-client'
import { MAX_ANSWER_BYTES, MAX_PAGE_EVENTS, boundAnswer, decodeCursor, encodeCursor, eventToJson, parseLimit, parseOrder, parseSince } from './query.js'
import { checkLocalCaller } from '../proxy/listen/local-caller.js'

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

class BadRequest extends Error {}

/** The queue of reads is full: 503 with Retry-After. */
class Busy extends Error {}

/** How many reads of the store (events, inventory, verify) run at once, and how many may wait. */
export interface QueryLimits {
  /** Reads running at once (default 2). */
  maxRunning?: number
  /** Reads waiting for one to finish (default 8); past that a request is answered 503 LK_COLLECTOR_BUSY. */
  maxQueued?: number
  /** The most events one answer holds (default MAX_PAGE_EVENTS). */
  maxPage?: number
}

/** Paths any caller the port admits may read without a reader token: probes and scrapers. */
const OPEN_PATHS = new Set(['/healthz', '/readyz', '/metrics'])

/**
 * Bounds the reads in progress: the store is shared with the ingest, and every reader (no token
 * is needed on loopback) could otherwise start as many as it likes. A slot passes straight to the
 * next waiter when a read ends.
 */
export class QueryGate {
  private running = 0
  private readonly waiting: Array<() => void> = []
  constructor(
    readonly maxRunning: number,
    readonly maxQueued: number,
  ) {}

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.running < this.maxRunning) this.running++
    else if (this.waiting.length < this.maxQueued) await new Promise<void>((resolve) => this.waiting.push(resolve))
    else throw new Busy()
    try {
      return await fn()
    } finally {
      const next = this.waiting.shift()
      if (next) next()
      else this.running--
    }
  }
}

/** Events serialised a slice at a time, giving way to the ingest between slices: never one string of the whole answer. */
const SLICE = 100

async function serialiseEvents(events: StoredEvent[], aborted: () => boolean): Promise<string[] | null> {
  const parts: string[] = []
  for (let i = 0; i < events.length; i += SLICE) {
    if (aborted()) return null
    parts.push((i ? ',' : '') + events.slice(i, i + SLICE).map((e) => JSON.stringify(eventToJson(e))).join(','))
    await new Promise<void>((resolve) => setImmediate(resolve))
  }
  return parts
}

function sendEvents(res: ServerResponse, head: Record<string, unknown>, parts: string[]): void {
  res.writeHead(200, { 'content-type': 'application/json' })
  res.write(`${JSON.stringify(head).slice(0, -1)},"events":[`)
  for (const p of parts) res.write(p)
  res.end(']}')
}

/**
 * No stored ID holds U+0000 (the ingest refuses it), and PostgreSQL cannot even be asked for one:
 * it fails the query, which would read as "store unavailable".
 */
function noNul(name: string, value: string): void {
  if (value.includes('\u0000')) throw new BadRequest(`query parameter "${name}" contains a NUL character, which no stored ${name} holds`)
}

function isLocalCaller(headers: IncomingHttpHeaders): boolean {
  try {
    checkLocalCaller(headers)
    return true
  } catch {
    return false
  }
}

export function createQueryServer(
  store: AuditStore,
  log: Logger,
  readerTokensSha256: string[] = [],
  maxAnswerBytes = MAX_ANSWER_BYTES,
  limits: QueryLimits = {},
  metrics?: Registry,
): Server {
  const gate = new QueryGate(limits.maxRunning ?? 2, limits.maxQueued ?? 8)
  const maxPage = limits.maxPage ?? MAX_PAGE_EVENTS
  const readers = readerTokensSha256.map((h) => Buffer.from(h, 'hex'))
  const authorized = (header: string | undefined): boolean => {
    if (readers.length === 0) return true
    const m = header ? /^Bearer (\S+)$/.exec(header) : null
    if (!m) return false
    const got = createHash('sha256').update(m[1]!).digest()
    let ok = false
    for (const r of readers) ok = timingSafeEqual(got, r) || ok
    return ok
  }
  return createServer((req, res) => {
    let url: URL
    try {
      url = new URL(req.url ?? '/', 'http://collector')
    } catch {
      // `GET //[` is a valid request line and an invalid URL: a 400, never a crash.
      return send(res, 400, { error: 'the request target is not a valid path' })
    }
    // Without reader tokens the API is open on loopback (config.ts refuses it elsewhere), so a web
    // page must not reach it: by DNS rebinding (its own name re-pointed at 127.0.0.1) it read every
    // agent's trail. Local programs address it by a loopback address or localhost, and send no Origin.
    if (readers.length === 0 && !isLocalCaller(req.headers)) {
      return send(res, 403, {
        error: 'the query API without reader tokens serves local programs only: address it by a loopback address or localhost, without an Origin header (a web page, or DNS rebinding, is what else looks like this)',
        code: 'LK_FOREIGN_ORIGIN',
      })
    }
    if (!OPEN_PATHS.has(url.pathname) && !authorized(req.headers.authorization)) {
      res.setHeader('www-authenticate', 'Bearer realm="latchkey-collector"')
      return send(res, 401, { error: 'a reader token is required (Authorization: Bearer <token>)' })
    }
    if (req.method !== 'GET') return send(res, 405, { error: `method ${req.method} not allowed: the query API is read-only` })
    // The client went away (while its read waited, or ran): the work left is not done.
    let gone = false
    res.on('close', () => (gone = true))
    const handle = async () => {
      switch (url.pathname) {
        case '/healthz':
          return send(res, 200, { ok: true, store: store.kind })
        case '/readyz':
          try {
            await store.ping()
            return send(res, 200, { ready: true, store: store.kind })
          } catch (err) {
            // The cause (an address, a role) is for the log; probes need no token and get the code.
            log.warn({ reason: (err as Error)?.message }, 'not ready: the store does not answer')
            return send(res, 503, { ready: false, store: store.kind, code: 'LK_STORE_UNAVAILABLE', reason: 'the store does not answer; the collector log says why' })
          }
        case '/metrics': {
          if (!metrics) return send(res, 404, { error: `no such endpoint: ${url.pathname}` })
          const text = await metrics.metrics()
          res.writeHead(200, { 'content-type': metrics.contentType })
          return res.end(text)
        }
        case '/v1/events': {
          const agent = url.searchParams.get('agent')
          if (!agent) throw new BadRequest('query parameter "agent" is required')
          noNul('agent', agent)
          let since: Date
          let until: Date | undefined
          let asked: number
          let newest: boolean
          try {
            newest = parseOrder(url.searchParams.get('order'))
            since = parseSince(url.searchParams.get('since') ?? '24h')
            const u = url.searchParams.get('until')
            until = u === null ? undefined : parseSince(u, Date.now(), 'until')
            const limitText = url.searchParams.get('limit')
            asked = limitText === null ? maxPage : parseLimit(limitText)
          } catch (err) {
            throw new BadRequest((err as Error).message)
          }
          // An empty window is a mistake (the two swapped, a wrong day), not "no calls": an empty
          // 200 would read as an agent that did nothing.
          if (until && until.getTime() <= since.getTime()) {
            throw new BadRequest(`until (${until.toISOString()}) must be after since (${since.toISOString()})`)
          }
          // One answer holds at most maxPage events; a larger limit is cut to it, and the answer says so.
          const limit = Math.min(asked, maxPage)
          const denied = url.searchParams.get('denied')
          if (denied !== null && denied !== 'true' && denied !== 'false') throw new BadRequest(`denied "${denied}" must be true or false`)
          const cursorText = url.searchParams.get('cursor')
          let after: EventCursor | undefined
          if (cursorText !== null) {
            try {
              after = decodeCursor(cursorText)
            } catch (err) {
              throw new BadRequest((err as Error).message)
            }
            // Read in the other order, it would skip or repeat: the order is the cursor's to say.
            if (!!after.newest !== newest) throw new BadRequest(`cursor continues an answer ${after.newest ? 'newest' : 'oldest'} first: ask with order=${after.newest ? 'newest' : 'oldest'}, as that answer was asked`)
          }
          // A page goes on from its cursor, whatever `since` says: one given as a duration has moved
          // on since the first page, and would skip what lies between. Newest first, the cursor
          // bounds the page from above, and `since` stays the floor.
          const from = after && !newest ? new Date(after.ts) : since
          const answer = await gate.run(async () => {
            if (gone) return null
            // One more than asked: whether the answer was cut short is then known, not guessed.
            // And bounded in bytes: a few huge events must not make the answer a string no process can hold.
            const cut = boundAnswer(
              await store.eventsByAgent({ agent, since: from, until, deniedOnly: denied === 'true', limit: limit + 1, maxBytes: maxAnswerBytes, after, newest }),
              limit,
              maxAnswerBytes,
            )
            const parts = await serialiseEvents(cut.events, () => gone)
            return parts && { ...cut, parts }
          })
          if (!answer) return
          const { events, truncated, parts } = answer
          const head: Record<string, unknown> = { agent, since: since.toISOString(), count: events.length, truncated, limit }
          if (asked > limit) head.limitCapped = `limit ${asked} is more than one answer holds (${maxPage}): ask again with cursor=<next> for the rest`
          // Where the next page starts: present exactly when more may match.
          if (newest) head.order = 'newest'
          if (truncated && events.length > 0) head.next = encodeCursor(events[events.length - 1]!, newest)
          return sendEvents(res, head, parts)
        }
        case '/v1/inventory':
          return send(res, 200, await gate.run(() => store.inventory()))
        case '/v1/verify': {
          const sidecar = url.searchParams.get('sidecar') ?? undefined
          if (sidecar !== undefined) noNul('sidecar', sidecar)
          const v = await gate.run(() => store.verify(sidecar))
          // "verified: 0 events" would read as a clean chain for a sidecar the store never heard of.
          if (sidecar !== undefined && v.sidecars === 0 && v.ok) return send(res, 404, { error: `no sidecar "${sidecar.slice(0, 200)}" in the store` })
          return send(res, v.ok ? 200 : 409, v)
        }
        default:
          return send(res, 404, { error: `no such endpoint: ${url.pathname}` })
      }
    }
    handle().catch((err: unknown) => {
      if (err instanceof BadRequest) return send(res, 400, { error: err.message })
      if (err instanceof Busy) {
        res.setHeader('retry-after', '1')
        return send(res, 503, { error: 'the collector is answering as many queries as it takes at once: retry after 1 s', code: 'LK_COLLECTOR_BUSY' })
      }
      log.error({ err: { type: (err as Error)?.name, message: (err as Error)?.message } }, 'query failed')
      send(res, 503, { error: 'store unavailable' })
    })
  })
}
