// Framing checks on top of Node's strict parser (insecureHTTPParser stays off). Each refuses
// with a 400 and forwards nothing: an ambiguous message is one the sidecar and the upstream
// might read differently, which is how requests are smuggled.
import type { IncomingMessage } from 'node:http'
import { LatchkeyError } from '../errors.js'
import { connectionListed } from '../forward/headers.js'

/** `requireHost` is off for CONNECT, whose target is its request line (RFC 9112 §3.2.3). */
export function checkFraming(req: IncomingMessage, requireHost = true): void {
  if (req.httpVersionMajor !== 1) {
    throw new LatchkeyError('LK_BAD_REQUEST', `HTTP/${req.httpVersion} is not accepted on this listener; use HTTP/1.1`)
  }
  const raw = req.rawHeaders
  let hosts = 0
  let contentLengths = 0
  let te: string | null = null
  let teCount = 0
  let proxyAuths = 0
  let connection: string | null = null
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!
    switch (name.length) {
      case 4:
        if (name.toLowerCase() === 'host') hosts++
        break
      case 14:
        if (name.toLowerCase() === 'content-length') contentLengths++
        break
      case 19:
        if (name.toLowerCase() === 'proxy-authorization') proxyAuths++
        break
      case 10:
        if (name.toLowerCase() === 'connection') connection = connection === null ? raw[i + 1]! : `${connection},${raw[i + 1]!}`
        break
      case 17:
        if (name.toLowerCase() === 'transfer-encoding') {
          teCount++
          te = raw[i + 1]!
        }
        break
    }
  }
  if (hosts > 1) throw new LatchkeyError('LK_BAD_REQUEST', 'duplicate Host header')
  if (hosts === 0 && requireHost && req.httpVersionMinor === 1) throw new LatchkeyError('LK_BAD_REQUEST', 'HTTP/1.1 request without a Host header')
  if (contentLengths > 1) throw new LatchkeyError('LK_BAD_REQUEST', 'duplicate Content-Length header')
  // node:http frames the body by the exact 64-bit value; undici writes the header again from a
  // JavaScript number, which past 2^53 is another one: the two would end the body in different places.
  if (contentLengths === 1 && req.headers['content-length']!.length > 15 && Number(req.headers['content-length']) > Number.MAX_SAFE_INTEGER) {
    throw new LatchkeyError('LK_BAD_REQUEST', 'Content-Length is larger than a body this sidecar can forward (2^53 - 1 bytes)')
  }
  // Two task handles: which one the call runs under would be a guess.
  if (proxyAuths > 1) throw new LatchkeyError('LK_BAD_REQUEST', 'duplicate Proxy-Authorization header')
  if (teCount > 0) {
    if (req.httpVersionMinor === 0) throw new LatchkeyError('LK_BAD_REQUEST', 'Transfer-Encoding is not allowed on HTTP/1.0')
    if (teCount > 1 || te!.trim().toLowerCase() !== 'chunked') {
      throw new LatchkeyError('LK_BAD_REQUEST', 'Transfer-Encoding must be exactly "chunked"')
    }
    if (contentLengths > 0) throw new LatchkeyError('LK_BAD_REQUEST', 'Content-Length and Transfer-Encoding together')
  }
  if (connection !== null && connection.length > 10) checkConnectionTokens(connection)
}

/**
 * Headers the body is read by. A proxy drops what Connection names, so a body judged by its
 * Content-Type (a form's `_method`) would reach the upstream without one, where Rack takes a
 * typeless POST for a form: `Connection: content-type` on a text/plain `_method=DELETE` ran a
 * DELETE past a method deny.
 */
const BODY_HEADERS = new Set(['content-type', 'content-length', 'content-encoding'])
/** A header name (RFC 9110 §5.1). */
const TOKEN = /^[!#$%&'*+.^_`|~0-9a-z-]+$/

/**
 * The names Connection lists, as the forward reads them to drop them (connectionListed, which
 * trims as JavaScript does: a no-break space around a name too): none may be a header the body
 * is read by, and each must be a header name at all.
 */
function checkConnectionTokens(connection: string): void {
  for (const name of connectionListed(connection) ?? []) {
    if (BODY_HEADERS.has(name)) throw new LatchkeyError('LK_BAD_REQUEST', `the Connection header names ${name}, which says how the body is read: it cannot be dropped on the way`)
    if (!TOKEN.test(name)) throw new LatchkeyError('LK_BAD_REQUEST', 'the Connection header lists something that is not a header name')
  }
}
