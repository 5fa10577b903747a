// The catalogue of coded errors the sidecar answers with. Every refusal an agent can see has a
// stable code, an HTTP status and a JSON body of one shape, whichever way the request arrived.
import { STATUS_CODES } from '../lib/node-http.js'

export const ERRORS = {
  LK_POLICY_DENIED: { status: 403, error: 'denied', retryable: false },
  LK_NETWORK_DENIED: { status: 403, error: 'denied', retryable: false },
  /**
   * A TLS tunnel whose ClientHello names another server than the CONNECT's host (or any, for a
   * CONNECT to an address): domain fronting past the host the policy decided (listen/tunnel.ts).
   */
  LK_TLS_NAME_MISMATCH: { status: 403, error: 'tls_name_mismatch', retryable: false },
  LK_BAD_REQUEST: { status: 400, error: 'bad_request', retryable: false },
  LK_EXPECTATION_FAILED: { status: 417, error: 'expectation_failed', retryable: false },
  /** Request line and headers past MAX_HEADER_BYTES (listen/server.ts): RFC 6585's 431, as node:http and nginx answer it. */
  LK_HEADERS_TOO_LARGE: { status: 431, error: 'headers_too_large', retryable: false },
  LK_NO_ROUTE: { status: 404, error: 'no_route', retryable: false },
  LK_PROXY_AUTH: { status: 407, error: 'proxy_auth_required', retryable: false },
  LK_CALLER_DENIED: { status: 403, error: 'caller_denied', retryable: false },
  LK_FOREIGN_ORIGIN: { status: 403, error: 'foreign_origin', retryable: false },
  LK_REVOKED: { status: 403, error: 'revoked', retryable: false },
  LK_TASK_ENDED: { status: 407, error: 'task_ended', retryable: false },
  LK_CREDENTIAL_UNAVAILABLE: { status: 503, error: 'credential_unavailable', retryable: true },
  /** The broker (or authorization server) answered, and refused: asking again gets the same answer. */
  LK_CREDENTIAL_REFUSED: { status: 403, error: 'credential_refused', retryable: false },
  LK_DNS_FAILED: { status: 502, error: 'upstream_unresolvable', retryable: true },
  /** No answer within sidecar.timeouts.dns_ms (the lookup may go on; its failure is kept network.dns_negative_cache_ms). */
  LK_DNS_TIMEOUT: { status: 504, error: 'upstream_unresolvable', retryable: true },
  /** Not looked up: network.dns_max_lookups names in flight, or every lookup thread held by one past its deadline. */
  LK_DNS_BUSY: { status: 503, error: 'dns_busy', retryable: true },
  LK_UPSTREAM_UNREACHABLE: { status: 502, error: 'upstream_unreachable', retryable: true },
  LK_UPSTREAM_TLS: { status: 502, error: 'upstream_tls', retryable: false },
  LK_UPSTREAM_TIMEOUT: { status: 504, error: 'upstream_timeout', retryable: true },
  LK_UPSTREAM_PROTOCOL: { status: 502, error: 'upstream_protocol', retryable: false },
  /** A fault in the sidecar itself (logged with its frames): not the upstream's, and the same request would meet it again. */
  LK_INTERNAL: { status: 500, error: 'internal', retryable: false },
  LK_DRAINING: { status: 503, error: 'draining', retryable: true },
  /** No upstream connection could be opened: the sidecar's are at sidecar.max_connections, all in use (forward/pools.ts). */
  LK_UPSTREAM_LIMIT: { status: 503, error: 'upstream_connection_limit', retryable: true },
  /** Never rendered (nobody is left to read it); 499 as nginx records it. */
  LK_CLIENT_CLOSED: { status: 499, error: 'client_closed', retryable: false },
  /**
   * A relay closed after timeouts.tunnel_idle_ms with no bytes either way (never rendered: its 200
   * or 101 has gone), or an agent's request body silent, or the response unread, for timeouts.body_ms
   * (a 408 if no response began).
   */
  LK_IDLE_TIMEOUT: { status: 408, error: 'idle_timeout', retryable: true },
  /** An agent's request head not whole within timeouts.client_headers_ms (silent, or trickled a byte at a time). */
  LK_REQUEST_TIMEOUT: { status: 408, error: 'request_timeout', retryable: true },
  LK_AUDIT_UNAVAILABLE: { status: 503, error: 'audit_unavailable', retryable: true },
} as const

export type ErrorCode = keyof typeof ERRORS

export class LatchkeyError extends Error {
  override readonly name = 'LatchkeyError'
  readonly status: number
  /** Whether the agent may simply send the call again: the code's, unless this call says otherwise (upstreamError). */
  readonly retryable: boolean
  constructor(
    readonly code: ErrorCode,
    /** Safe to show the agent: never contains a credential or a header value. */
    readonly reason: string,
    readonly rule: string | null = null,
    retryable?: boolean,
    /** The code's, unless the agent's client could not read that one (asOriginRefusal). */
    status?: number,
  ) {
    super(reason)
    this.status = status ?? ERRORS[code].status
    this.retryable = retryable ?? ERRORS[code].retryable
  }
}

/**
 * A refusal as the sidecar answers it where the agent's client takes it for the origin (a reverse
 * route, a request inside a tunnel), not for a proxy: a 407 there is a 403, same code and body.
 * Node's fetch (undici, so the OpenAI and Anthropic SDKs) turns any 407 into a network error when
 * there is no browser window (Fetch §4.5): the agent read "Connection error.", never the reason,
 * and the SDK retried it as one, `x-should-retry` unread. A 401 would owe a WWW-Authenticate
 * challenge, and the only one the sidecar takes is Proxy-Authorization's.
 */
export function asOriginRefusal(err: LatchkeyError): LatchkeyError {
  return err.status === 407 ? new LatchkeyError(err.code, err.reason, err.rule, err.retryable, 403) : err
}

/** What of an unexpected error is logged: code, type and frames, never its message (it can quote a URL, and a URL can hold a credential). */
export interface InternalErrorDetail {
  code: string | undefined
  type: string | undefined
  frames: string | undefined
}

/**
 * The first frames of a stack, and nothing else of it. The stack begins with the message, and a
 * message can run over lines: cutting its first line off left the rest of it (a quoted request's
 * headers, Authorization included) in the log as "frames". The message is cut off whole (its
 * lines may look like frames), then only frame lines are kept.
 */
function framesOf(stack: string, message: unknown): string | undefined {
  const at = typeof message === 'string' && message.length > 0 ? stack.indexOf(message) : -1
  const rest = at === -1 ? stack : stack.slice(at + (message as string).length)
  const frames = rest.split('\n').filter((l) => /^ {4}at /.test(l)).slice(0, 7)
  return frames.length > 0 ? frames.join('\n') : undefined
}

/**
 * A LatchkeyError as is; anything else is a fault in the sidecar: `log` gets its detail for the
 * operator, and the agent a 500 LK_INTERNAL saying only that it happened (not retryable, and not
 * charged to the upstream, as the 502 it was before made it).
 */
export function asLatchkeyError(err: unknown, log: (detail: InternalErrorDetail) => void): LatchkeyError {
  if (err instanceof LatchkeyError) return err
  const e = err as { code?: unknown; name?: unknown; message?: unknown; stack?: unknown } | null | undefined
  log({ code: typeof e?.code === 'string' ? e.code : undefined, type: typeof e?.name === 'string' ? e.name : undefined, frames: typeof e?.stack === 'string' ? framesOf(e.stack, e.message) : undefined })
  return new LatchkeyError('LK_INTERNAL', 'internal error in the sidecar')
}

export const RULE_HEADER = 'x-latchkey-rule'
export const ERROR_HEADER = 'x-latchkey-error'

export interface ErrorBody {
  error: string
  code: ErrorCode
  rule: string | null
  reason: string
  retryable: boolean
}

export function errorBody(code: ErrorCode, reason: string, rule: string | null, retryable: boolean = ERRORS[code].retryable): ErrorBody {
  return { error: ERRORS[code].error, code, rule, reason, retryable }
}

/**
 * Headers and body of a refusal, ready to write to an http.ServerResponse or a raw socket, and a
 * reason phrase that says it too: many clients show only the status line of a refusal (Python's
 * "Tunnel connection failed: 403 …", wget's "Proxy tunneling failed: …", urllib's HTTPError), and
 * of a refused CONNECT nothing else at all.
 */
export function renderError(err: LatchkeyError): { status: number; statusText: string; headers: Record<string, string>; body: string } {
  const body = JSON.stringify(errorBody(err.code, err.reason, err.rule, err.retryable)) + '\n'
  const headers: Record<string, string> = {
    'content-type': 'application/json',
    'content-length': String(Buffer.byteLength(body)),
    'cache-control': 'no-store',
    [ERROR_HEADER]: err.code,
    // What `retryable` says, where SDKs look: the OpenAI and Anthropic clients (and every other
    // Stainless-generated one) retry any 5xx unless told not to, and sent a POST the upstream may
    // already have taken three times.
    'x-should-retry': err.retryable ? 'true' : 'false',
  }
  if (err.rule) headers[RULE_HEADER] = err.rule
  if (err.status === 407) headers['proxy-authenticate'] = 'Basic realm="latchkey"'
  return { status: err.status, statusText: statusText(err), headers, body }
}

/** "Forbidden (LK_POLICY_DENIED, rule default: no rule allows this request)": printable ASCII, bounded. */
function statusText(err: LatchkeyError): string {
  const said = `${err.code}${err.rule ? `, rule ${err.rule}` : ''}: ${err.reason}`.replace(/[^\x20-\x7e]/g, '?')
  return `${STATUS_CODES[err.status] ?? 'Error'} (${said.length > 200 ? said.slice(0, 197) + '...' : said})`
}

/** The same refusal as raw HTTP/1.1 bytes, for CONNECT, upgrades and parser errors on a bare socket. */
export function renderErrorRaw(err: LatchkeyError): string {
  const { status, statusText, headers, body } = renderError(err)
  let head = `HTTP/1.1 ${status} ${statusText}\r\n`
  for (const [k, v] of Object.entries(headers)) head += `${k}: ${v}\r\n`
  return head + 'connection: close\r\n\r\n' + body
}
