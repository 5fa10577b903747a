// The broker's HTTP surface. OAuth endpoints answer as RFC 6749 §5.1/§5.2 say (JSON, no-store);
// the admin API needs the admin bearer token; nothing here ever echoes a token it was sent.
//
//   POST /oauth2/token                          RFC 8693 token exchange
//   POST /oauth2/introspect                     RFC 7662 (client_secret_basic)
//   GET  /.well-known/jwks.json                 signing keys, current and still-needed
//   GET  /.well-known/oauth-authorization-server RFC 8414 metadata
//   GET|POST /v1/revocations, DELETE /v1/revocations/<kind>/<value>   admin (Bearer)
//   GET  /healthz /readyz /metrics
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import { createServer, parserReason, STATUS_CODES } from '../../lib/node-http.js'
import type { Socket } from 'node:net'
import { createServer as createHttpsServer } from 'node:https'
import { timingSafeEqual, createHash } from 'node:crypto'
import { Counter, Histogram, Registry as MetricsRegistry } from 'prom-client'
import { OAuthError } from '../oauth-error.js'
import { BodyTooLarge, parseForm, readBody } from './form.js'
import type { TokenExchange } from '../exchange.js'
import type { Introspection } from '../introspect.js'
import { JWKS_MAX_AGE_S, type KeyRing } from '../keys.js'
import type { RevocationList } from '../revocations/list.js'
import { REVOCATION_KINDS, type RevocationKind } from '../revocations/store.js'
import { GRANT_TYPE, TASK_ID } from '../exchange.js'
import { MAX_AGENT_ID } from '../attest/attestor.js'
import { TASK_HANDLE } from '../../lib/task-handle.js'
import type { Logger } from '../../lib/log.js'
import { storeCause } from '../../lib/store-schema.js'
import { parseJsonBody } from '../../lib/json-members.js'

/** What a 404 lists, so a client that misspelled a path sees the right one. */
const ENDPOINTS = 'POST /oauth2/token, POST /oauth2/introspect, GET /.well-known/jwks.json, GET /.well-known/oauth-authorization-server, GET /healthz, GET /readyz, GET /metrics, and the admin API under /v1/revocations'
const ADMIN_ENDPOINTS = 'GET /v1/revocations, POST /v1/revocations, DELETE /v1/revocations/<agent|task|jti>/<value>'

/** What a revocation is posted with. */
const REVOCATION_FIELDS: ReadonlySet<string> = new Set(['kind', 'value', 'reason'])

/** A task ID or jti to revoke: at most this long. */
const MAX_REVOCATION_VALUE = 256

export interface BrokerHttpDeps {
  issuer: string
  exchange: TokenExchange
  introspection: Introspection
  keys: KeyRing
  revocations: RevocationList
  maxBodyBytes: number
  /** Admin bearer token; undefined disables the admin API. */
  adminToken: string | undefined
  /** Introspection client id → secret. */
  introspectionClients: Map<string, string>
  ready: () => boolean
  /** broker.listen.tls, files read: serve HTTPS. */
  tls: { cert: Buffer; key: Buffer } | null
  /** Where a request that fails unexpectedly is said, with its cause (never the request's credentials). */
  log: Logger
  /**
   * What the broker knows of an agent value just revoked: whether any registry type could have
   * such an instance, and how many sidecars of it have a control stream open here (null: no
   * control stream). Told to the operator, so a mistyped ID is not taken for a stopped agent.
   */
  agentReach?: (value: string) => { registered: boolean; connected: number | null }
}

const NO_STORE = { 'cache-control': 'no-store', pragma: 'no-cache' }

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest()
}

/** Constant-time comparison that does not leak the length either. */
function sameSecret(given: string, expected: string): boolean {
  return timingSafeEqual(digest(given), digest(expected))
}

export function createBrokerServer(d: BrokerHttpDeps): { server: Server; metrics: MetricsRegistry } {
  const metrics = new MetricsRegistry()
  const exchanges = new Counter({ name: 'latchkey_broker_exchanges_total', help: 'Token exchanges by outcome and RFC error code', labelNames: ['outcome', 'error'], registers: [metrics] })
  const latency = new Histogram({
    name: 'latchkey_broker_exchange_seconds',
    help: 'Token exchange latency at the broker',
    buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25],
    registers: [metrics],
  })

  const metadata = JSON.stringify({
    issuer: d.issuer,
    token_endpoint: `${d.issuer}/oauth2/token`,
    introspection_endpoint: `${d.issuer}/oauth2/introspect`,
    jwks_uri: `${d.issuer}/.well-known/jwks.json`,
    grant_types_supported: [GRANT_TYPE],
    response_types_supported: [],
    token_endpoint_auth_methods_supported: ['none'],
    introspection_endpoint_auth_methods_supported: ['client_secret_basic'],
  })

  const send = (res: ServerResponse, status: number, body: string, headers: Record<string, string> = {}) => {
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers })
    res.end(body)
  }
  const oauthError = (res: ServerResponse, e: OAuthError, extra: Record<string, string> = {}) => send(res, e.status, e.body(), { ...NO_STORE, ...extra })

  async function token(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = process.hrtime.bigint()
    try {
      const form = parseForm(req, await readBody(req, d.maxBodyBytes))
      const body = await d.exchange.exchange(form)
      send(res, 200, JSON.stringify(body), NO_STORE)
      exchanges.inc({ outcome: 'granted', error: '' })
    } catch (err) {
      const e = asOAuthError(err, d.maxBodyBytes)
      exchanges.inc({ outcome: 'refused', error: e.error })
      oauthError(res, e, e.status === 413 ? { connection: 'close' } : {})
    } finally {
      latency.observe(Number(process.hrtime.bigint() - started) / 1e9)
    }
  }

  async function introspect(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const client = basicAuth(req.headers.authorization)
    const secret = client ? d.introspectionClients.get(client.id) : undefined
    // Compare even when the id is unknown, so timing does not reveal which ids exist.
    const ok = sameSecret(client?.secret ?? '', secret ?? '\0no-client') && secret !== undefined
    if (!ok) {
      req.resume()
      // The connection ends with the refusal: an unauthenticated body is not read to its end.
      oauthError(res, new OAuthError('invalid_client', 'introspection requires client authentication (client_secret_basic)', 401), {
        'www-authenticate': 'Basic realm="latchkey-broker"',
        connection: 'close',
      })
      return
    }
    try {
      const form = parseForm(req, await readBody(req, d.maxBodyBytes))
      // RFC 6749 §2.3, §5.2: one authentication method a request. A client_secret in the body too,
      // or a client_id naming another client than Basic's, leaves which client asked in doubt.
      const bodyId = form.one('client_id')
      if (form.one('client_secret') !== undefined || (bodyId !== undefined && bodyId !== client!.id)) {
        throw new OAuthError('invalid_request', 'the client authenticates one way: client_secret_basic, with no client_secret (nor another client_id) in the body')
      }
      const token = form.one('token')
      if (!token) throw new OAuthError('invalid_request', 'missing token')
      send(res, 200, JSON.stringify(await d.introspection.introspect(token)), NO_STORE)
    } catch (err) {
      const e = asOAuthError(err, d.maxBodyBytes)
      // As the token endpoint: the rest of an oversized body is not read on a kept-alive connection.
      oauthError(res, e, e.status === 413 ? { connection: 'close' } : {})
    }
  }

  async function admin(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    const auth = req.headers.authorization ?? ''
    // The scheme is case-insensitive (RFC 9110 §11.1).
    const given = auth.slice(0, 7).toLowerCase() === 'bearer ' ? auth.slice(7) : ''
    if (!d.adminToken || !sameSecret(given, d.adminToken)) {
      req.resume()
      const why = d.adminToken ? 'a valid admin bearer token is required' : 'the admin API is disabled: no admin token is configured'
      send(res, 401, JSON.stringify({ error: 'unauthorized', error_description: why }), { 'www-authenticate': 'Bearer realm="latchkey-broker-admin"', ...NO_STORE })
      return
    }
    if (path === '/v1/revocations' && req.method === 'GET') {
      send(res, 200, JSON.stringify({ revocations: d.revocations.all() }), NO_STORE)
      return
    }
    if (path === '/v1/revocations' && req.method === 'POST') {
      let parsed: ReturnType<typeof parseJsonBody>
      try {
        // Strict UTF-8 (a reason the operator never wrote was stored from other bytes as U+FFFD),
        // and no member named twice ({"kind":"task","value":A,…,"value":B}: which was meant is a guess).
        parsed = parseJsonBody(await readBody(req, d.maxBodyBytes), REVOCATION_FIELDS)
      } catch (err) {
        const tooBig = err instanceof BodyTooLarge
        send(res, tooBig ? 413 : 400, JSON.stringify({ error: 'invalid_request', error_description: tooBig ? 'body too large' : 'body is not JSON' }), NO_STORE)
        return
      }
      const input = ('value' in parsed ? parsed.value : undefined) as { kind?: unknown; value?: unknown; reason?: unknown }
      const problem = 'problem' in parsed ? parsed.problem : revocationProblem(input)
      if (problem) {
        send(res, 400, JSON.stringify({ error: 'invalid_request', error_description: problem }), NO_STORE)
        return
      }
      const { revocation, created } = await d.revocations.revoke(input.kind as RevocationKind, input.value as string, (input.reason as string | undefined) ?? 'revoked by operator')
      const reach = revocation.kind === 'agent' ? d.agentReach?.(revocation.value) : undefined
      send(res, created ? 201 : 200, JSON.stringify({ revocation, created, ...reach }), NO_STORE)
      return
    }
    const m = /^\/v1\/revocations\/(agent|task|jti)\/(.+)$/.exec(path)
    if (m && req.method === 'DELETE') {
      let value: string
      try {
        value = decodeURIComponent(m[2]!)
      } catch {
        send(res, 400, JSON.stringify({ error: 'invalid_request', error_description: 'the revocation value in the path is not valid percent-encoding' }), NO_STORE)
        return
      }
      const removed = await d.revocations.unrevoke(m[1] as RevocationKind, value)
      send(res, removed ? 200 : 404, JSON.stringify({ removed }), NO_STORE)
      return
    }
    req.resume()
    // The path is not quoted: a DELETE's holds whatever was pasted after the kind, which may be a credential.
    send(res, 404, JSON.stringify({ error: 'not_found', error_description: `no admin endpoint ${req.method} at this path (not repeated: it may hold a token); the admin endpoints are ${ADMIN_ENDPOINTS}` }), NO_STORE)
  }

  const options = { requestTimeout: 30_000, headersTimeout: 10_000, maxHeaderSize: 32_768 }
  const handler = (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '/').split('?')[0]!
    const method = req.method ?? 'GET'
    const only = (m: string, fn: () => unknown) => {
      // RFC 9110 §9.1: where GET is served, so is HEAD (node:http sends its head, not its body).
      const allowed = m === 'GET' ? ['GET', 'HEAD'] : [m]
      if (!allowed.includes(method)) {
        req.resume()
        // A refusal like any other of the OAuth endpoints: no-store (RFC 6749 §5.1, §5.2).
        send(res, 405, JSON.stringify({ error: 'invalid_request', error_description: `use ${allowed.join(' or ')}` }), { allow: allowed.join(', '), ...NO_STORE })
        return
      }
      void Promise.resolve(fn()).catch((err: unknown) => {
        d.log.error({ method, path, reason: storeCause(err) }, 'request failed')
        if (!res.headersSent) send(res, 500, JSON.stringify({ error: 'server_error', error_description: 'internal error' }), NO_STORE)
        else res.destroy()
      })
    }
    switch (path) {
      case '/oauth2/token':
        return only('POST', () => token(req, res))
      case '/oauth2/introspect':
        return only('POST', () => introspect(req, res))
      case '/.well-known/jwks.json':
        return only('GET', () => send(res, 200, JSON.stringify(d.keys.jwks()), { 'cache-control': `max-age=${JWKS_MAX_AGE_S}` }))
      case '/.well-known/oauth-authorization-server':
        return only('GET', () => send(res, 200, metadata, { 'cache-control': 'max-age=300' }))
      case '/healthz':
        return only('GET', () => send(res, 200, '{"ok":true}'))
      case '/readyz':
        return only('GET', () => send(res, d.ready() ? 200 : 503, JSON.stringify({ ready: d.ready() })))
      case '/metrics':
        return only('GET', async () => {
          const text = await metrics.metrics()
          res.writeHead(200, { 'content-type': metrics.contentType })
          res.end(text)
        })
    }
    if (path === '/v1/revocations' || path.startsWith('/v1/revocations/')) {
      void admin(req, res, path).catch((err: unknown) => {
        // The cause goes to the log, the client gets a generic 500. Not the path: a DELETE's holds
        // whatever an operator pasted, which may be a credential.
        d.log.error({ method, reason: storeCause(err) }, 'admin request failed: revocation store unavailable')
        if (!res.headersSent) send(res, 500, JSON.stringify({ error: 'server_error', error_description: 'revocation store unavailable' }))
      })
      return
    }
    req.resume()
    // The path is not quoted: a client that put a token in it (`/oauth2/token/<token>`) would have it echoed.
    send(res, 404, JSON.stringify({ error: 'not_found', error_description: `no endpoint ${method} at this path (not repeated: it may hold a token); the endpoints are ${ENDPOINTS}` }), NO_STORE)
  }
  const server: Server = d.tls ? createHttpsServer({ ...options, ...d.tls }, handler) : createServer(options, handler)
  // A request node:http's parser refuses (Content-Length and Transfer-Encoding together, a bad
  // Content-Length, headers too large, too slow) is told what was wrong as every other refusal
  // here is, not with node's bare status line. A response under way on the connection (pipelining)
  // is finished first; the connection ends after it.
  server.on('clientError', (err: NodeJS.ErrnoException & { reason?: unknown }, socket: Socket) => {
    const inFlight = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage
    if (err.code === 'ECONNRESET' || !socket.writable || inFlight) {
      if (inFlight && !inFlight.writableFinished) inFlight.once('finish', () => socket.destroy())
      else socket.destroy()
      return
    }
    const [status, description] =
      err.code === 'HPE_HEADER_OVERFLOW'
        ? [431, `the request line and headers are over ${options.maxHeaderSize} bytes`]
        : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? [408, 'the request did not all arrive in time']
          : [400, `malformed HTTP request (${err.code ?? 'parse error'})${parserReason(err)}`]
    const body = JSON.stringify({ error: 'invalid_request', error_description: description })
    socket.end(`HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\ncontent-type: application/json\r\ncache-control: no-store\r\npragma: no-cache\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
    // A refusal written to a client that does not read it does not hold the socket.
    setTimeout(() => socket.destroy(), 1_000).unref()
  })
  return { server, metrics }
}

function asOAuthError(err: unknown, limit: number): OAuthError {
  if (err instanceof OAuthError) return err
  if (err instanceof BodyTooLarge) return new OAuthError('invalid_request', `request body exceeds ${limit} bytes`, 413)
  return new OAuthError('invalid_request', 'the request could not be read', 400, String(err))
}

function basicAuth(header: string | undefined): { id: string; secret: string } | undefined {
  if (!header || !/^basic /i.test(header)) return undefined
  const decoded = Buffer.from(header.slice(6).trim(), 'base64').toString('utf8')
  const i = decoded.indexOf(':')
  if (i < 0) return undefined
  // RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
  try {
    return { id: decodeURIComponent(decoded.slice(0, i).replace(/\+/g, ' ')), secret: decodeURIComponent(decoded.slice(i + 1).replace(/\+/g, ' ')) }
  } catch {
    return undefined
  }
}

function revocationProblem(input: { kind?: unknown; value?: unknown; reason?: unknown }): string | undefined {
  if (typeof input !== 'object' || input === null) return 'body must be a JSON object {kind, value, reason?}'
  if (!REVOCATION_KINDS.includes(input.kind as RevocationKind)) return `kind must be one of ${REVOCATION_KINDS.join(', ')}`
  // Any instance ID an attestor can produce must be revocable by ID.
  const max = input.kind === 'agent' ? MAX_AGENT_ID : MAX_REVOCATION_VALUE
  if (typeof input.value !== 'string' || input.value.length === 0 || input.value.length > max) return `value must be a string of 1 to ${max} characters`
  if (input.kind === 'agent' && !/^agent:([a-z0-9][a-z0-9-]*|\*):([a-z0-9][a-z0-9-]*|\*):([A-Za-z0-9][A-Za-z0-9_.-]*|\*)$/.test(input.value)) {
    return 'an agent value must be an instance ID agent:<type>:<env>:<instance>, or a pattern with * for whole segments (agent:<type>:*:*)'
  }
  // A value no task_id or jti can take would be stored, answered 201 and match nothing: an
  // operator's paste with a trailing space or newline must not pass for a revocation.
  // A sidecar's task handle is its proxy credential, not its ID: stored, it would match nothing,
  // and the credential would sit in the store, the event log and every sidecar's control stream.
  // Anywhere in the value, of any kind (`task:lkt_…` is what an operator copies out of a proxy_url),
  // and in the reason.
  if (TASK_HANDLE.test(input.value) || (typeof input.reason === 'string' && TASK_HANDLE.test(input.reason))) {
    return `${!TASK_HANDLE.test(input.value) ? 'reason' : input.kind === 'task' ? 'task' : 'value'} must not hold a task handle (lkt_…, the proxy credential); a task is revoked by its id: GET /v1/tasks/<handle> on the sidecar shows it`
  }
  if (input.kind === 'task' && !TASK_ID.test(input.value)) return 'task must be a task ID: 1-128 characters of A-Z a-z 0-9 . _ : - (what the broker accepts as task_id)'
  if (input.kind === 'jti' && !/^[\x21-\x7e]+$/.test(input.value)) return `jti must be 1 to ${MAX_REVOCATION_VALUE} printable ASCII characters, no spaces`
  // eslint-disable-next-line no-control-regex -- refusing control characters is the point (PostgreSQL text cannot hold NUL)
  if (input.reason !== undefined && (typeof input.reason !== 'string' || input.reason.length > 512 || /[\u0000-\u0008\u000b-\u001f\u007f]/.test(input.reason))) {
    return 'reason must be a string of at most 512 characters, without control characters other than tab and newline'
  }
  return undefined
}
