// Reverse routes and the admin API answer requests addressed to the sidecar itself, so a web page
// must not be able to send them. A page reaches localhost two ways: DNS rebinding (its own name
// re-pointed at 127.0.0.1; the Host header still carries that name) and plain cross-site requests
// (a browser marks those with Origin or Sec-Fetch-Site). Agents and their SDKs send neither, and
// address the sidecar by a loopback address or localhost.
import { isIP } from 'node:net'
import type { IncomingHttpHeaders } from 'node:http'
import { LatchkeyError } from '../errors.js'
import { normaliseHost } from '../policy/policy.js'

/**
 * Throws LK_FOREIGN_ORIGIN unless the request looks like it came from a local program. With
 * `namedHosts` (sidecar.allow_remote_clients: the sidecar is meant to be reached by a name, a
 * Service's, say) any Host passes; a web page is still refused by its Origin.
 */
export function checkLocalCaller(headers: IncomingHttpHeaders, namedHosts = false): void {
  const host = headers.host
  if (!namedHosts && host !== undefined && !isLocalName(hostname(host) ?? '')) {
    // Named for the Host header: an absolute-form URL may say 127.0.0.1 and the Host another name.
    throw new LatchkeyError('LK_FOREIGN_ORIGIN', 'the Host header names another host than this sidecar; send a loopback address or localhost there (another name is what DNS rebinding looks like)')
  }
  const site = headers['sec-fetch-site']
  if (headers.origin !== undefined) {
    // Some programs send one of their own (Python's websocket-client, Netty's client handshake):
    // told what to leave out, as a page cannot.
    throw new LatchkeyError('LK_FOREIGN_ORIGIN', 'a request with an Origin header is taken for one from a web page and refused: reverse routes and the admin API serve local programs only (a program that sends Origin itself should not: websocket-client, suppress_origin=True)')
  }
  if (site !== undefined && site !== 'none' && site !== 'same-origin') {
    throw new LatchkeyError('LK_FOREIGN_ORIGIN', 'a request from a web page is refused: reverse routes and the admin API serve local programs only')
  }
}

/**
 * The host of a Host header, or null when it is no RFC 3986 authority (host, then `:port` at
 * most): an IPv6 address must be bracketed (`[::1]:80`; a bare `::1` or `::1:80` has no one
 * reading), and nothing may follow the bracket but a port (`[::1].evil` is not `[::1]`).
 */
function hostname(host: string): string | null {
  const h = host.trim().toLowerCase()
  let name: string
  let rest: string
  if (h.startsWith('[')) {
    const end = h.indexOf(']')
    if (end === -1) return null
    name = h.slice(1, end)
    if (isIP(name) !== 6) return null
    rest = h.slice(end + 1)
  } else {
    const colon = h.indexOf(':')
    name = colon === -1 ? h : h.slice(0, colon)
    rest = colon === -1 ? '' : h.slice(colon)
  }
  if (rest !== '' && !/^:\d*$/.test(rest)) return null
  return name.endsWith('.') ? name.slice(0, -1) : name
}

/** An IP literal (which no DNS answer can re-point), or a name that only ever means this machine. */
function isLocalName(name: string): boolean {
  return isIP(name) !== 0 || isLocalhostName(name) || isNumericIPv4(name)
}

/**
 * An IPv4 address in another spelling URLs take (`127.1`, `2130706433`, `0x7f.1`: Python's
 * urllib sends the Host as written), a literal too. What ends in a number and is no address is
 * no URL host at all (`evil.0x7f`), so never a name DNS could answer for. Read as targets and
 * rules are (normaliseHost).
 */
function isNumericIPv4(name: string): boolean {
  return /^[0-9a-fx.]+$/.test(name) && isIP(normaliseHost(name)) === 4
}

/** `localhost` and its subdomains (RFC 6761 §6.3): loopback to this sidecar's resolver, curl and browsers. */
export function isLocalhostName(name: string): boolean {
  return name === 'localhost' || name.endsWith('.localhost')
}

/**
 * The host spellings an agent may use for this sidecar's own address: the one it listens on and,
 * where that is loopback or every address, the loopback names. Never another machine's.
 */
export function ownHosts(listenHost: string): ReadonlySet<string> {
  const host = listenHost.startsWith('[') ? listenHost.slice(1, -1) : listenHost
  const loopback = ['localhost', '127.0.0.1', '::1']
  if (host === '0.0.0.0' || host === '::' || loopback.includes(host)) return new Set([host, ...loopback])
  return new Set([host])
}

/** Whether a connection's peer address (as node reports it) is loopback. */
export function isLoopbackPeer(address: string | undefined): boolean {
  return !!address && (address.startsWith('127.') || address === '::1' || address.startsWith('::ffff:127.'))
}
