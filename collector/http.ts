// The collector's read-only HTTP query API (loopback by default):
//   GET /v1/events?agent=<id>&since=24h[&until=<iso>][&denied=true][&limit=N]
//   GET /v1/inventory
//   GET /v1/verify[?sidecar=<id>]
//   GET /healthz   the process answers (liveness)
//   GET /readyz    the store answers too: 503 while it does not (a wrong URL, a database down)
import { createHash, timingSafeEqual } from 'node:crypto'
import { createServer, type Server, type ServerResponse } from 'node:http'
import type { AuditStore } from './store/types.js'
import type { Logger } from '../lib/log.js'
import { MAX_ANSWER_BYTES, boundAnswer, eventToJson, parseSince } from './query.js'

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

class BadRequest extends Error {}

/**
 * No stored ID holds U+0000 (the ingest refuses it), and PostgreSQL cannot even be asked for one:
 * it fails the query, which would read as "store unavailable".
 */
function noNul(name: string, value: string): void {
  if (value.includes('\u0000')) throw new BadRequest(`query parameter "${name}" contains a NUL character, which no stored ${name} holds`)
}

export function createQueryServer(store: AuditStore, log: Logger, readerTokensSha256: string[] = [], maxAnswerBytes = MAX_ANSWER_BYTES): Server {
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
    if (url.pathname !== '/healthz' && url.pathname !== '/readyz' && !authorized(req.headers.authorization)) {
      res.setHeader('www-authenticate', 'Bearer realm="latchkey-collector"')
      return send(res, 401, { error: 'a reader token is required (Authorization: Bearer <token>)' })
    }
    if (req.method !== 'GET') return send(res, 405, { error: `method ${req.method} not allowed: the query API is read-only` })
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
        case '/v1/events': {
          const agent = url.searchParams.get('agent')
          if (!agent) throw new BadRequest('query parameter "agent" is required')
          noNul('agent', agent)
          let since: Date
          let until: Date | undefined
          try {
            since = parseSince(url.searchParams.get('since') ?? '24h')
            const u = url.searchParams.get('until')
            until = u === null ? undefined : parseSince(u, Date.now(), 'until')
          } catch (err) {
            throw new BadRequest((err as Error).message)
          }
          const limitText = url.searchParams.get('limit')
          const limit = limitText === null ? 10_000 : Number(limitText)
          if (!Number.isInteger(limit) || limit < 1 || limit > 100_000) throw new BadRequest(`limit "${limitText}" must be an integer from 1 to 100000`)
          const denied = url.searchParams.get('denied')
          if (denied !== null && denied !== 'true' && denied !== 'false') throw new BadRequest(`denied "${denied}" must be true or false`)
          // One more than asked: whether the answer was cut short is then known, not guessed.
          // And bounded in bytes: a few huge events must not make the answer a string no process can hold.
          const { events, truncated } = boundAnswer(
            await store.eventsByAgent({ agent, since, until, deniedOnly: denied === 'true', limit: limit + 1, maxBytes: maxAnswerBytes }),
            limit,
            maxAnswerBytes,
          )
          return send(res, 200, { agent, since: since.toISOString(), count: events.length, truncated, events: events.map(eventToJson) })
        }
        case '/v1/inventory':
          return send(res, 200, await store.inventory())
        case '/v1/verify': {
          const sidecar = url.searchParams.get('sidecar') ?? undefined
          if (sidecar !== undefined) noNul('sidecar', sidecar)
          const v = await store.verify(sidecar)
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
      log.error({ err: { type: (err as Error)?.name, message: (err as Error)?.message } }, 'query failed')
      send(res, 503, { error: 'store unavailable' })
    })
  })
}
