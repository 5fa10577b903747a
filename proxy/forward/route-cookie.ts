// An upstream's Set-Cookie, as the agent is to store it when it called a reverse route. Every
// route lives on one cookie origin (the sidecar's host: cookies ignore the port), so a cookie an
// upstream scopes to its own `/` would be sent by the agent's cookie jar to every route, each a
// different upstream: a session one upstream issued (after a credentialed login, a credential in
// all but name) handed to another, and one upstream able to plant cookies in another's calls.
// As nginx's proxy_cookie_path does, each cookie is put under the route it came through:
//  - its path (the upstream's Path, or the default-path RFC 6265 §5.1.4 gives the upstream URL
//    called) translated as a Location is (route-location.ts): inside the route's base path, put
//    under `/<route>/`; covering the whole base, `/<route>/` itself; elsewhere on the upstream
//    (never reachable through the route) the cookie is dropped. Always `/<route>/` with its
//    slash: `/search` would, to a jar that matches paths by prefix alone (Java's CookieManager),
//    also cover a route named `search2`;
//  - its Domain removed: the cookie is host-only on the sidecar's host, the path what isolates it;
//  - rewritten whole, from what was understood of it and nothing else: the name and value as RFC
//    6265 §4.1.1 spells them, Expires, Max-Age, Secure, HttpOnly and SameSite (the last of each),
//    and the one Path, last. Any other attribute is left out. Clients parse a Set-Cookie
//    differently (Python's cookiejar takes the first Path, RFC 6265 the last; Python's
//    SimpleCookie, behind aiohttp's jar, starts a new cookie at a space or at an attribute it does
//    not know; Java's HttpCookie splits at commas when it sees Max-Age but no Expires; curl strips
//    quotes from a path): what is written is read as one cookie, with that path, by every one;
//  - a cookie whose name, value or path cannot be read so is dropped, and the caller told why
//    (no value quoted): fail closed, never relayed as it came.
// A Set-Cookie2 (RFC 2965, obsolete, still read by Java's CookieManager) is dropped on a route.
import type { IncomingHttpHeaders } from 'node:http'
import type { Target } from '../context.js'
import { routeBase } from '../listen/target.js'
import { pathUnderRoute } from './route-location.js'

/** Why a Set-Cookie was not relayed; a fixed text, safe to log. */
export type CookieDropReason =
  | 'no name=value before the first ";"'
  | 'name is not a token'
  | 'value has a character outside RFC 6265 cookie-octets'
  | 'an attribute name is not a token, or starts with "$"'
  | 'path has a character outside RFC 6265 cookie-octets'
  | "path is outside the route's base path upstream"
  | 'Set-Cookie2 is not relayed on a route'

export type ScopedCookie = { cookie: string } | { dropped: CookieDropReason }

/** RFC 9110 token. */
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/
/** RFC 6265 §4.1.1 cookie-octet: no CTL, whitespace, DQUOTE, comma, semicolon or backslash. */
const OCTETS = /^[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*$/
/** A cookie-value: cookie-octets, optionally in double quotes. */
const COOKIE_VALUE = /^(?:[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*|"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*")$/
/**
 * A date as Expires spells it (`Wed, 21 Oct 2015 07:28:00 GMT`, `Thu, 01-Jan-1970 00:00:01 GMT`):
 * no `=`, so no parser reads another cookie or attribute out of it. The only place a space or a
 * comma is written: with Expires present Java's HttpCookie reads a Netscape cookie and does not
 * split at commas.
 */
const EXPIRES = /^[A-Za-z0-9 ,:+./-]*$/
const MAX_AGE = /^-?[0-9]+$/
const SAME_SITE = /^[A-Za-z]+$/
/** WSP as RFC 6265 trims it: space and horizontal tab. */
const WSP = /^[ \t]+|[ \t]+$/g

/** The attributes kept, in the order written, as written. */
const KEPT = ['Expires', 'Max-Age', 'Secure', 'HttpOnly', 'SameSite'] as const
type Kept = (typeof KEPT)[number]
const KEPT_BY_NAME = new Map<string, Kept>(KEPT.map((k) => [k.toLowerCase(), k]))
const FLAGS = new Set<Kept>(['Secure', 'HttpOnly'])
const VALID: Partial<Record<Kept, RegExp>> = { Expires: EXPIRES, 'Max-Age': MAX_AGE, SameSite: SAME_SITE }

function trim(s: string): string {
  return s.replace(WSP, '')
}

/**
 * One Set-Cookie value rewritten to live under `/<route>/` (see the top of this file), or why it
 * is dropped. `base`: the route's base path upstream (routeBase, `''` for none); `upstreamPath`:
 * the path the call was sent to upstream (its default-path is a cookie's without a Path).
 */
export function scopeSetCookie(setCookie: string, route: string, base: string, upstreamPath: string): ScopedCookie {
  // RFC 6265 §5.2: the name-value-pair runs to the first `;`, split at its first `=`.
  const semicolon = setCookie.indexOf(';')
  const pair = semicolon === -1 ? setCookie : setCookie.slice(0, semicolon)
  const eq = pair.indexOf('=')
  if (eq === -1) return { dropped: 'no name=value before the first ";"' }
  const name = trim(pair.slice(0, eq))
  const value = trim(pair.slice(eq + 1))
  if (!TOKEN.test(name)) return { dropped: 'name is not a token' }
  if (!COOKIE_VALUE.test(value)) return { dropped: 'value has a character outside RFC 6265 cookie-octets' }
  const kept = new Map<Kept, string | null>()
  let path: string | null = null
  if (semicolon !== -1) {
    for (const av of setCookie.slice(semicolon + 1).split(';')) {
      const a = trim(av)
      if (a === '') continue
      const aeq = a.indexOf('=')
      const aname = aeq === -1 ? a : trim(a.slice(0, aeq))
      const avalue = aeq === -1 ? null : trim(a.slice(aeq + 1))
      // `$Path` is Path to Python's SimpleCookie.
      if (!TOKEN.test(aname) || aname.startsWith('$')) return { dropped: 'an attribute name is not a token, or starts with "$"' }
      const lower = aname.toLowerCase()
      // The last Path counts (RFC 6265 §5.3 step 7); one with no value is an empty one.
      if (lower === 'path') path = avalue ?? ''
      else {
        const k = KEPT_BY_NAME.get(lower)
        if (k === undefined) continue
        // The last of each counts; it takes the place where it came.
        kept.delete(k)
        if (FLAGS.has(k)) kept.set(k, null)
        // A value a client would not take (RFC 6265 §5.2: the attribute is ignored) is left out.
        else if (avalue !== null && VALID[k]!.test(avalue)) kept.set(k, avalue)
      }
    }
  }
  // RFC 6265 §5.2.4: an empty Path, or one not starting with `/`, is the default-path.
  if (path === null || !path.startsWith('/')) path = defaultPath(upstreamPath)
  if (!OCTETS.test(path)) return { dropped: 'path has a character outside RFC 6265 cookie-octets' }
  const scoped = pathThroughRoute(path, route, base)
  if (scoped === null) return { dropped: "path is outside the route's base path upstream" }
  let cookie = `${name}=${value}`
  for (const [k, v] of kept) cookie += v === null ? `; ${k}` : `; ${k}=${v}`
  return { cookie: `${cookie}; Path=${scoped}` }
}

/** RFC 6265 §5.1.4: the directory of a request path, without its trailing slash (`/` for a top-level one). */
export function defaultPath(requestPath: string): string {
  if (!requestPath.startsWith('/')) return '/'
  const last = requestPath.lastIndexOf('/')
  return last === 0 ? '/' : requestPath.slice(0, last)
}

/**
 * A cookie path upstream, as a path under `/<route>/`: one inside the route's base path put
 * under the route as a Location is; one that path-matches the whole base (RFC 6265 §5.1.4: `/`,
 * or `/api` for base `/api/v1`) the route's own `/<route>/`; null for any other, which no call
 * through the route reaches.
 */
export function pathThroughRoute(path: string, route: string, base: string): string | null {
  const under = pathUnderRoute(path, route, base)
  if (under !== null) return under
  if (base.startsWith(path) && (path.endsWith('/') || base.charCodeAt(path.length) === 0x2f)) return `/${route}/`
  return null
}

/**
 * Scopes every Set-Cookie of a response relayed through the reverse route `target` names (its
 * upstream URL `routeUpstream`) in place, and drops any Set-Cookie2. Returns why each cookie
 * not relayed was dropped (empty when none was).
 */
export function scopeRouteCookies(headers: IncomingHttpHeaders, target: Target, routeUpstream: URL): CookieDropReason[] {
  const dropped: CookieDropReason[] = []
  const route = target.route
  if (route === null) return dropped
  if ((headers as Record<string, unknown>)['set-cookie2'] !== undefined) {
    delete (headers as Record<string, unknown>)['set-cookie2']
    dropped.push('Set-Cookie2 is not relayed on a route')
  }
  const raw = headers['set-cookie'] as string | string[] | undefined
  if (raw === undefined) return dropped
  const base = routeBase(routeUpstream)
  const cookies: string[] = []
  for (const one of Array.isArray(raw) ? raw : [raw]) {
    const r = scopeSetCookie(one, route, base, target.path)
    if ('cookie' in r) cookies.push(r.cookie)
    else dropped.push(r.dropped)
  }
  if (cookies.length === 0) delete headers['set-cookie']
  else headers['set-cookie'] = cookies
  return dropped
}
