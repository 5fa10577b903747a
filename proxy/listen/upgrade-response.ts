// The upstream's answer to a WebSocket handshake, read and checked before a single byte of it
// reaches the agent: only a `101` that switches to websocket opens the relay, and its head is
// rebuilt from parsed, scrubbed headers (an upstream may reflect the injected credential).
// Anything else is refused: relaying it raw would leave the connection as a keep-alive HTTP
// channel to the audience that no later request on it would be decided, injected or audited for.
import type { IncomingHttpHeaders } from 'node:http'
import type { Socket } from 'node:net'
import { createHash } from 'node:crypto'
import { LatchkeyError } from '../errors.js'
import { MAX_UPSTREAM_HEAD_BYTES } from '../forward/headers.js'

/** RFC 6455 §1.3: the GUID the server appends to the client's key. */
const WEBSOCKET_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

/**
 * The `Sec-WebSocket-Accept` a server that read this handshake's key must answer. Checked before
 * the relay opens: a `101` without it (a server that reflects any status, a mock) has not
 * switched protocols, and would read the agent's next bytes as HTTP requests nobody decided.
 */
export function expectedAccept(key: string): string {
  return createHash('sha1').update(key + WEBSOCKET_GUID).digest('base64')
}

const HEAD_END = Buffer.from('\r\n\r\n')
const STATUS_LINE = /^HTTP\/1\.[01] (\d{3})(?: [^\r\n]*)?$/
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/

export interface UpgradeResponse {
  /** Lower-cased names, for checks and scrubbing. */
  headers: IncomingHttpHeaders
  /** Each name as the upstream spelled it, to write it back the same way. */
  spelling: Map<string, string>
  /** Bytes after the head: the first WebSocket frames, to relay as they are. */
  rest: Buffer
  /** The upstream's head as it came, blank line included: not part of what the relay counts. */
  headBytes: number
}

/**
 * Reads the upstream's response head. `done` gets the parsed head of a `101` to websocket, or
 * the refusal to send the agent (a non-101 status, a malformed or oversized head, an early close,
 * no complete head within `timeoutMs`: timeouts.headers_ms, as for any response).
 */
export function readUpgradeResponse(upstream: Socket, accept: string, timeoutMs: number, done: (err: LatchkeyError | null, response: UpgradeResponse | null, status: number) => void): void {
  let buffered: Buffer = Buffer.alloc(0)
  const onData = (chunk: Buffer) => {
    buffered = buffered.length ? Buffer.concat([buffered, chunk]) : chunk
    const end = buffered.indexOf(HEAD_END)
    if (end === -1) {
      if (buffered.length > MAX_UPSTREAM_HEAD_BYTES) finish(protocolError(`its handshake answer has no end of head within ${MAX_UPSTREAM_HEAD_BYTES / 1024} KiB`), null, 502)
      return
    }
    const parsed = parseHead(buffered.subarray(0, end).toString('latin1'), accept)
    if ('error' in parsed) return finish(parsed.error, null, parsed.status)
    const headBytes = end + HEAD_END.length
    finish(null, { ...parsed, rest: buffered.subarray(headBytes), headBytes }, 101)
  }
  const onEnd = () => finish(protocolError('it closed the connection before answering the handshake'), null, 502)
  // An upstream that accepts the connection and never answers would otherwise hold both sockets
  // for as long as the agent waits.
  const onTimeout = () =>
    finish(new LatchkeyError('LK_UPSTREAM_TIMEOUT', `the upstream did not answer the WebSocket handshake within ${timeoutMs} ms (sidecar.timeouts.headers_ms)`), null, 504)
  function finish(err: LatchkeyError | null, response: UpgradeResponse | null, status: number): void {
    upstream.removeListener('data', onData)
    upstream.removeListener('end', onEnd)
    upstream.setTimeout(0)
    upstream.removeListener('timeout', onTimeout)
    upstream.pause()
    done(err, response, status)
  }
  upstream.on('data', onData)
  upstream.once('end', onEnd)
  upstream.setTimeout(timeoutMs, onTimeout)
}

function parseHead(head: string, accept: string): { headers: IncomingHttpHeaders; spelling: Map<string, string> } | { error: LatchkeyError; status: number } {
  const lines = head.split('\r\n')
  const m = STATUS_LINE.exec(lines[0] ?? '')
  if (!m) return { error: protocolError('its handshake answer has no valid status line'), status: 502 }
  const status = Number(m[1])
  if (status !== 101) {
    return { error: protocolError(`it answered ${status} instead of 101 Switching Protocols`), status }
  }
  const headers: IncomingHttpHeaders = {}
  const spelling = new Map<string, string>()
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!
    const colon = line.indexOf(':')
    const name = colon > 0 ? line.slice(0, colon) : ''
    // No folded lines, no bare names, no control characters: a head this sidecar cannot read
    // exactly is not relayed.
    if (!TOKEN.test(name)) return { error: protocolError('its handshake answer has a malformed header line'), status }
    const value = line.slice(colon + 1).trim()
    if (hasControlCharacter(value)) return { error: protocolError('its handshake answer has a control character in a header'), status }
    const key = name.toLowerCase()
    const prev = headers[key]
    if (!spelling.has(key)) spelling.set(key, name)
    if (prev === undefined) headers[key] = value
    else headers[key] = Array.isArray(prev) ? [...prev, value] : [prev as string, value]
  }
  if (String(headers.upgrade ?? '').toLowerCase() !== 'websocket') {
    return { error: protocolError('it switched protocols without `Upgrade: websocket`'), status }
  }
  if (headers['sec-websocket-accept'] !== accept) {
    return { error: protocolError("its Sec-WebSocket-Accept does not answer the handshake's key"), status }
  }
  return { headers, spelling }
}

/** Any control character but horizontal tab (RFC 9110 field values). */
function hasControlCharacter(value: string): boolean {
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i)
    if ((c < 0x20 && c !== 0x09) || c === 0x7f) return true
  }
  return false
}

function protocolError(why: string): LatchkeyError {
  return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream did not accept the WebSocket: ${why}`)
}

/** The 101 head sent to the agent, from parsed (and scrubbed) headers. */
export function serializeSwitchingProtocols({ headers, spelling }: UpgradeResponse): string {
  let head = 'HTTP/1.1 101 Switching Protocols\r\n'
  for (const name in headers) {
    const v = headers[name]
    // Latchkey's own namespace is the sidecar's voice, never an upstream's.
    if (v === undefined || name.startsWith('x-latchkey-')) continue
    const spelt = spelling.get(name) ?? name
    for (const x of Array.isArray(v) ? v : [v]) head += `${spelt}: ${x}\r\n`
  }
  return head + '\r\n'
}
