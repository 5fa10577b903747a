// Turns what the agent sent (absolute URI, CONNECT authority, or a reverse route) into one
// normalised Target. The WHATWG URL parser does the host work: numeric spellings (2130706433,
// 0177.1, 0x7f.1) become dotted IPv4, IDN becomes punycode, case is folded, dot segments and
// their percent-encoded forms are resolved. Anything it cannot parse is refused, never guessed.
import { isIP } from 'node:net'
import { LatchkeyError } from '../errors.js'
import type { Target } from '../context.js'
import { furtherDecodings, MAX_EXTRA_DECODINGS } from '../policy/paths.js'

const DEFAULT_PORT = { http: 80, https: 443 } as const

/** A parsed URL's host as a Target holds it (no brackets, no trailing dot), and its port with the scheme's default. */
export function urlHostPort(url: URL, scheme: 'http' | 'https'): { host: string; port: number } {
  let host = url.hostname
  if (host.startsWith('[')) host = host.slice(1, -1)
  if (host.endsWith('.')) host = host.slice(0, -1)
  return { host, port: url.port === '' ? DEFAULT_PORT[scheme] : Number(url.port) }
}

function fromUrl(url: URL): Target {
  const scheme = url.protocol === 'https:' ? 'https' : 'http'
  const { host, port } = urlHostPort(url, scheme)
  if (host === '') throw new LatchkeyError('LK_BAD_REQUEST', 'request target has an empty host')
  // `blocked.test..` is `blocked.test.` once its root dot is dropped: the fully qualified
  // blocked.test to DNS, another name to a rule naming blocked.test. No name has an empty label.
  if (host.charCodeAt(0) === 46 || host.charCodeAt(host.length - 1) === 46 || host.includes('..')) {
    throw new LatchkeyError('LK_BAD_REQUEST', 'request target host has an empty label (a leading dot, two dots in a row, or more than one trailing dot)')
  }
  const hostIsIp = isIP(host) !== 0
  // No resolver answers for such a name: refused as the request's fault, not sent to DNS to
  // come back a retryable 502 quoting thousands of characters in the reason.
  if (!hostIsIp && (host.length > MAX_NAME || LONG_LABEL.test(host))) {
    throw new LatchkeyError('LK_BAD_REQUEST', `request target host name is longer than DNS allows (${MAX_NAME} characters, ${MAX_LABEL} a label)`)
  }
  // Port 0 names no server: dialled, it fails as a refused connection would, and retries.
  if (port === 0) throw new LatchkeyError('LK_BAD_REQUEST', 'request target port 0 is not a port a server listens on')
  const target: Target = { scheme, host, port, path: url.pathname || '/', search: url.search, hostIsIp, route: null }
  try {
    target.path = checkedPath(target.path)
  } catch (err) {
    // The trail says where the refused path was bound: `/admin%00/drop` on which host.
    refusedTargets.set(err as object, target)
    throw err
  }
  return target
}

const refusedTargets = new WeakMap<object, Target>()

/** The target a refusal was for, where its host and port were read before its path was refused. */
export function targetOfRefusal(err: unknown): Target | null {
  return (typeof err === 'object' && err !== null && refusedTargets.get(err)) || null
}

/**
 * Why a host written in the config (a rule's, a route's, an audience's) is not one a request can
 * name, or null: judged as a request's host is, so that a rule never silently matches nothing or
 * another host (`api.example..`; `twin\lk.test`, which the URL parser reads as `twin`).
 */
export function hostNameProblem(host: string): string | null {
  if (/[\\%/@?#\s]/.test(host)) return 'holds a character no host name has (\\, %, /, @, ?, # or a space)'
  let url: URL
  try {
    url = new URL(`http://${host}/`)
  } catch {
    return 'is not a valid host name or address'
  }
  try {
    fromUrl(url)
  } catch (err) {
    if (err instanceof LatchkeyError) return err.reason.replace(/^request target (host )?/, '')
    throw err
  }
  return null
}

/** RFC 1035's limits, on the name as DNS gets it (IDN in punycode, no trailing dot). */
const MAX_NAME = 253
const MAX_LABEL = 63
const LONG_LABEL = new RegExp(`[^.]{${MAX_LABEL + 1}}`)

/** C0 controls, DEL and the C1 controls (U+0080-U+009F, UTF-8 `%C2%80`-`%C2%9F`: Python's strip() takes NEL for a space). */
const ENCODED_CONTROL = /%(?:[01][0-9A-Fa-f]|7[Ff])|%[Cc]2%[89][0-9A-Fa-f]/

/**
 * A path policy can judge as the upstream will read it. Encoded control characters and
 * percent-encoding that is not UTF-8 are refused: no API needs them, and upstreams read them
 * differently (NUL cuts a string, a trailing CR, LF or tab is trimmed, %C0%AE is "." to a lax
 * decoder, %FF is whatever the server's charset says), so `/admin%00/x` or `/admin%0d/x` would
 * be /admin/x to one server and not to the path rules.
 */
function checkedPath(path: string): string {
  if (!path.includes('%')) return path
  if (ENCODED_CONTROL.test(path)) throw new LatchkeyError('LK_BAD_REQUEST', 'request path contains an encoded control character')
  if (!isUtf8Escapes(path)) throw new LatchkeyError('LK_BAD_REQUEST', 'request path has malformed percent-encoding, or encodes bytes that are not UTF-8')
  // The same, as a server that decodes the path again reads it (the readings policy judges):
  // `/admin%2500/x` is `/admin%00/x` to it, and then `/admin` to one that cuts at NUL; and
  // `%25C0%25AE` is the overlong `.` a lax decoder reads. (Not every escape a further decoding
  // leaves need be UTF-8: `/100%25Beef` is a literal `%` to its server, and `%Be` no dot to any.)
  if (path.includes('%25')) {
    const decodings = furtherDecodings(path)
    for (const p of decodings) {
      if (ENCODED_CONTROL.test(p)) throw new LatchkeyError('LK_BAD_REQUEST', 'request path contains a control character encoded more than once')
      if (OVERLONG.test(p)) throw new LatchkeyError('LK_BAD_REQUEST', 'request path encodes, more than once, an overlong UTF-8 sequence')
    }
    // Past the decodings policy judges, no reading can be sure of it.
    if (decodings.length === MAX_EXTRA_DECODINGS && decodings[decodings.length - 1]!.includes('%25')) {
      throw new LatchkeyError('LK_BAD_REQUEST', `request path is percent-encoded more than ${MAX_EXTRA_DECODINGS + 1} times`)
    }
  }
  return path
}

/** Lead bytes of overlong UTF-8 (C0, C1; E0 then 80-9F; F0 then 80-8F): ASCII to a lax decoder, `%C0%AE` a dot. */
const OVERLONG = /%[Cc][01]|%[Ee]0%[89][0-9A-Fa-f]|%[Ff]0%8[0-9A-Fa-f]/

function isUtf8Escapes(s: string): boolean {
  try {
    decodeURIComponent(s)
    return true
  } catch {
    return false
  }
}

/**
 * Absolute-form request target, as sent to an HTTP_PROXY. A WebSocket client going through a
 * proxy may name its target ws:// or wss:// (aiohttp does): allowed on an upgrade, where they
 * are http:// and https:// by another name (RFC 6455 §3), and refused elsewhere.
 */
export function parseAbsoluteTarget(raw: string, upgrade = false): Target {
  let lower = raw.slice(0, 8).toLowerCase()
  if (upgrade && (lower.startsWith('ws://') || lower.startsWith('wss://'))) {
    raw = 'http' + raw.slice(2)
    lower = raw.slice(0, 8).toLowerCase()
  }
  if (!lower.startsWith('http://') && !lower.startsWith('https://')) {
    throw new LatchkeyError('LK_BAD_REQUEST', upgrade ? 'absolute request target must use http://, https://, ws:// or wss://' : 'absolute request target must use http:// or https://')
  }
  // The authority ends where the URL parser ends it: at the path, the query or the fragment
  // (`http://host?to=a@b` has a query with an `@` in it, and no userinfo).
  const start = lower.startsWith('https') ? 8 : 7
  const authorityEnd = raw.slice(start).search(/[/?#]/)
  const authority = raw.slice(start, authorityEnd === -1 ? undefined : start + authorityEnd)
  // The URL parser skips extra slashes (http:///user@host/ is host, with userinfo): the text
  // checked below must be the authority it will read.
  if (authority === '') throw new LatchkeyError('LK_BAD_REQUEST', 'request target has an empty authority')
  // The URL parser would silently drop userinfo; a proxy that ignores it could be tricked into
  // judging one host and reaching another (http://allowed.com@evil.com/), so refuse it outright.
  if (authority.includes('@')) throw refusedUserinfo(raw)
  if (/[\\\s]/.test(authority)) throw new LatchkeyError('LK_BAD_REQUEST', 'request target authority contains an invalid character')
  let url: URL
  try {
    url = new URL(raw)
  } catch {
    throw new LatchkeyError('LK_BAD_REQUEST', 'request target is not a valid URL')
  }
  if (url.hash) throw new LatchkeyError('LK_BAD_REQUEST', 'request target must not contain a fragment')
  if (url.username || url.password) throw refusedUserinfo(raw)
  return fromUrl(url)
}

/**
 * The refusal of a target with userinfo, with the target it names for the trail (which host the
 * agent was sent to: `http://a@169.254.169.254/`); the userinfo itself, often a password, is kept
 * out of it. A target that names none the URL parser can read is refused all the same.
 */
function refusedUserinfo(raw: string): LatchkeyError {
  const err = new LatchkeyError('LK_BAD_REQUEST', 'request target must not contain userinfo')
  let named: Target | null = null
  try {
    const url = new URL(raw)
    url.username = ''
    url.password = ''
    named = fromUrl(url)
  } catch (other) {
    named = targetOfRefusal(other)
  }
  if (named) refusedTargets.set(err, named)
  return err
}

/** CONNECT authority-form: host:port, nothing else. */
export function parseConnectTarget(raw: string): Target {
  if (raw.includes('/') || raw.includes('@') || raw.includes('?') || raw.includes('#') || /[\\\s]/.test(raw)) {
    throw new LatchkeyError('LK_BAD_REQUEST', 'CONNECT target must be host:port with no path, userinfo or query')
  }
  // Digits only, leading zeros allowed (RFC 3986's port, and what the URL parser takes in absolute-form).
  const m = /^(\[[^\]]+\]|[^:[\]]+):(\d+)$/.exec(raw)
  if (!m) throw new LatchkeyError('LK_BAD_REQUEST', 'CONNECT target must be host:port with an explicit port')
  const port = Number(m[2])
  if (port < 1 || port > 65535) throw new LatchkeyError('LK_BAD_REQUEST', 'CONNECT port out of range (1-65535)')
  let url: URL
  try {
    url = new URL(`https://${m[1]}/`)
  } catch {
    throw new LatchkeyError('LK_BAD_REQUEST', 'CONNECT target host is not valid')
  }
  const t = fromUrl(url)
  t.port = port
  t.path = ''
  t.search = ''
  return t
}

export interface ReverseRoutes {
  /** Route name → upstream origin, parsed once at start-up. */
  get(name: string): URL | undefined
  keys(): Iterable<string>
}

/** How many route names a refusal lists: enough to spot the one meant, bounded for the status line. */
const LISTED_ROUTES = 8

/**
 * An unknown route, refused without repeating the segment that named it: an agent whose base URL
 * lost its route name sends the API's own path, and some APIs carry their key there (Telegram's
 * /bot<token>/…). It was quoted into the body, the status line, the log and the audit trail.
 * The configured names are listed instead: they say the same to whoever mistyped one.
 */
function noRoute(routes: ReverseRoutes): LatchkeyError {
  const names = [...routes.keys()]
  const listed = names.slice(0, LISTED_ROUTES).map((n) => JSON.stringify(n)).join(', ') + (names.length > LISTED_ROUTES ? ', ...' : '')
  const known = names.length === 0 ? 'no routes are configured' : `the routes are ${listed}`
  return new LatchkeyError('LK_NO_ROUTE', `the path's first segment names no route (it is not repeated: it may hold a key); ${known}`)
}

/** Origin-form `/<route>/<rest>` mapped onto the route's upstream origin. */
export function parseReverseTarget(rawPath: string, routes: ReverseRoutes): Target {
  if (!rawPath.startsWith('/')) throw new LatchkeyError('LK_BAD_REQUEST', 'request target must be origin-form or absolute-form')
  // Dot segments (including %2e forms) are resolved before the route is picked, so /a/../b is route b.
  const { path, search } = parseOriginForm(rawPath)
  const slash = path.indexOf('/', 1)
  const name = path.slice(1, slash === -1 ? undefined : slash)
  const upstream = name ? routes.get(name) : undefined
  if (!upstream) throw name ? noRoute(routes) : new LatchkeyError('LK_NO_ROUTE', 'origin-form requests must start with a route name')
  const rest = slash === -1 ? '/' : path.slice(slash)
  const base = routeBase(upstream)
  const target = fromUrl(upstream)
  target.path = base + rest
  target.search = search
  target.route = name
  return target
}

/** The path every call on a route is under: its upstream URL's path, without a trailing slash (`''` for none). */
export function routeBase(upstream: URL): string {
  return upstream.pathname.endsWith('/') ? upstream.pathname.slice(0, -1) : upstream.pathname
}

/**
 * An origin-form target (`/path?query`), normalised by the URL parser as absolute-form is:
 * dot segments resolved; `//host/...` (a path the parser would read as an authority), a fragment
 * (never sent, so refused rather than dropped) and a path checkedPath refuses are a 400.
 */
function parseOriginForm(raw: string): { path: string; search: string } {
  let url: URL
  try {
    // Appended, not resolved against a base: `//x/y` is a path here, as in absolute-form (resolved,
    // it was the authority `x`, and a tunnelled `GET //x/y` was refused where one outside passed).
    url = new URL('http://origin-form.invalid' + raw)
  } catch {
    throw new LatchkeyError('LK_BAD_REQUEST', 'request path is not valid')
  }
  if (url.host !== 'origin-form.invalid') throw new LatchkeyError('LK_BAD_REQUEST', 'request path is not valid')
  if (url.hash) throw new LatchkeyError('LK_BAD_REQUEST', 'request target must not contain a fragment')
  return { path: checkedPath(url.pathname), search: url.search }
}

/** Host header value for a target: host[:port], port omitted when it is the scheme's default. */
export function hostHeader(t: Target): string {
  const host = t.host.includes(':') ? `[${t.host}]` : t.host
  return t.port === DEFAULT_PORT[t.scheme] ? host : `${host}:${t.port}`
}

export function originKey(scheme: string, host: string, port: number): string {
  return `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}`
}

/**
 * A request that arrived inside a plaintext CONNECT tunnel. The tunnel's authority is what was
 * decided, so it wins: origin-form paths are placed on it, and an absolute URI naming any other
 * origin is refused rather than followed.
 */
export function parseTunnelledTarget(raw: string, tunnel: Target, upgrade = false): Target {
  if (raw.startsWith('/')) return { ...tunnel, scheme: 'http', ...parseOriginForm(raw) }
  // ws:// on an upgrade, as outside a tunnel (parseAbsoluteTarget).
  const t = parseAbsoluteTarget(raw, upgrade)
  if (t.host !== tunnel.host || t.port !== tunnel.port || t.scheme !== 'http') {
    throw new LatchkeyError('LK_BAD_REQUEST', 'a request inside a CONNECT tunnel must be for the tunnel\'s own origin')
  }
  return t
}
