// A route's Set-Cookie, rewritten to live under `/<route>/` (proxy/forward/route-cookie.ts): every
// spelling an upstream may use, and what is dropped because no rewrite of it can be trusted.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import type { IncomingHttpHeaders } from 'node:http'
import { defaultPath, pathThroughRoute, scopeRouteCookies, scopeSetCookie } from '../proxy/forward/route-cookie.js'
import { parseReverseTarget } from '../proxy/listen/target.js'
import { REMOVED } from '../proxy/forward/scrub.js'

const cookie = (c: string, upstreamPath = '/x/y', route = 'search', base = ''): string | null => {
  const r = scopeSetCookie(c, route, base, upstreamPath)
  return 'cookie' in r ? r.cookie : null
}

/** RFC 6265 §5.1.4 path-match, as browsers, tough-cookie, curl, Go and Python (3.8+) do it. */
function pathMatch(requestPath: string, cookiePath: string): boolean {
  if (requestPath === cookiePath) return true
  return requestPath.startsWith(cookiePath) && (cookiePath.endsWith('/') || requestPath[cookiePath.length] === '/')
}

/** A bare prefix match, as Java's CookieManager (and Python before 3.8) does it. */
const prefixMatch = (requestPath: string, cookiePath: string): boolean => requestPath.startsWith(cookiePath)

t.test('a cookie scoped to the whole upstream is put under its route, with the trailing slash', async (t) => {
  t.equal(cookie('upsess=SECRET; Path=/'), 'upsess=SECRET; Path=/search/')
  t.equal(cookie('upsess=SECRET; Path=/account'), 'upsess=SECRET; Path=/search/account')
  t.equal(cookie('upsess=SECRET; Path=/account/'), 'upsess=SECRET; Path=/search/account/')
  // `/search` would cover a route named `search2` for a jar matching by prefix alone.
  const scoped = /Path=(\S+)$/.exec(cookie('s=1; Path=/')!)![1]!
  for (const match of [pathMatch, prefixMatch]) {
    t.ok(match('/search/', scoped) && match('/search/x/y', scoped), `${match.name}: sent on the route`)
    t.notOk(match('/search2/x', scoped) || match('/searchx', scoped) || match('/other/x', scoped) || match('/', scoped), `${match.name}: on no other route`)
  }
  // Every URL a jar sends it on is the route (the sidecar reads the first segment as the route's name).
  const routes = new Map([['search', new URL('http://a.test')], ['search2', new URL('http://b.test')]])
  for (const path of ['/search/', '/search/x', '/search/x/../y']) t.equal(parseReverseTarget(path, routes).route, 'search', path)
})

t.test('the Path attribute in any spelling and spacing; the last one counts; one not starting with / is the default-path', async (t) => {
  for (const c of ['a=1; path=/p', 'a=1; PATH=/p', 'a=1; pAtH=/p', 'a=1;Path=/p', 'a=1 ;  Path  =  /p  ', 'a=1;\tPath\t=\t/p\t', 'a=1; Path=/q; Path=/p', 'a=1; Path=/; path=/q; PATH=/p']) {
    t.equal(cookie(c), 'a=1; Path=/search/p', JSON.stringify(c))
  }
  // RFC 6265 §5.2.4: empty, relative or quoted, the path is the default-path (of /x/y upstream: /x).
  for (const c of ['a=1', 'a=1; Path', 'a=1; Path=', 'a=1; Path=p', 'a=1; Path="/p"', 'a=1; Path=/p; Path=', 'a=1; Path=/p; Path=rel', 'a=1; Path=/p; Path']) {
    t.equal(cookie(c), 'a=1; Path=/search/x', JSON.stringify(c))
  }
  // A default-path is never left to the client: for the bare `/search`, it would have been `/`.
  t.equal(cookie('a=1', '/'), 'a=1; Path=/search/')
  t.equal(cookie('a=1', '/top'), 'a=1; Path=/search/')
  t.equal(cookie('a=1', '/a/b/c'), 'a=1; Path=/search/a/b')
  t.equal(defaultPath('/'), '/')
  t.equal(defaultPath('/a/'), '/a')
  t.equal(defaultPath(''), '/')
})

t.test('Domain is removed: the cookie is host-only on the sidecar, its path what isolates it', async (t) => {
  for (const c of ['a=1; Domain=api.example.com; Path=/', 'a=1; domain=.127.0.0.1; Path=/', 'a=1; DOMAIN=localhost; Path=/', 'a=1; Domain; Path=/', 'a=1; Path=/; Domain=127.0.0.1; domain=x.test']) {
    t.equal(cookie(c), 'a=1; Path=/search/', c)
  }
})

t.test('what is kept of the attributes: Expires, Max-Age, Secure, HttpOnly, SameSite, the last of each; nothing else', async (t) => {
  t.equal(
    cookie('a=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Max-Age=60; Secure; HttpOnly; SameSite=Lax; Path=/'),
    'a=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Max-Age=60; Secure; HttpOnly; SameSite=Lax; Path=/search/',
  )
  t.equal(cookie('a=1; path=/; expires=Thu, 01-Jan-1970 00:00:01 GMT; max-age=-1; secure; httponly; samesite=strict'), 'a=1; Expires=Thu, 01-Jan-1970 00:00:01 GMT; Max-Age=-1; Secure; HttpOnly; SameSite=strict; Path=/search/')
  t.equal(cookie('a=1; Max-Age=1; Secure; Max-Age=2; secure=yes'), 'a=1; Max-Age=2; Secure; Path=/search/x', 'the last of each, where it came')
  // Left out: what no parser reads the same way (Python's SimpleCookie starts a new cookie at an
  // attribute it does not know), and what a route cannot mean (Partitioned, Port).
  t.equal(cookie('a=1; Priority=High; Partitioned; Version=1; Comment=hi; Port=443; Foo=bar; Discard; Path=/'), 'a=1; Path=/search/')
  // A value a client would not take is left out (RFC 6265 §5.2: the attribute is ignored).
  for (const c of ['a=1; Max-Age=5 evil=2; Path=/', 'a=1; Max-Age=5,evil=2; Path=/', 'a=1; Expires=x evil=2; Path=/', 'a=1; SameSite=Lax evil=2; Path=/', 'a=1; Max-Age; Path=/', 'a=1; Expires="Wed"; Path=/']) {
    t.equal(cookie(c), 'a=1; Path=/search/', c)
  }
})

t.test('names and values: as RFC 6265 writes them, spacing trimmed; a quoted value kept quoted', async (t) => {
  t.equal(cookie('  a  =  1  ; Path=/'), 'a=1; Path=/search/')
  t.equal(cookie('a=; Path=/'), 'a=; Path=/search/', 'an empty value')
  t.equal(cookie('a=""; Path=/'), 'a=""; Path=/search/')
  t.equal(cookie('a="quoted-value"; Path=/'), 'a="quoted-value"; Path=/search/')
  t.equal(cookie('JSESSIONID=ABC123.node1; Path=/app; HttpOnly'), 'JSESSIONID=ABC123.node1; HttpOnly; Path=/search/app')
  t.equal(cookie('tok=eyJhbGciOi.J9==; Path=/'), 'tok=eyJhbGciOi.J9==; Path=/search/', '= and . inside a value')
  t.equal(cookie('a=1;; ;Path=/;'), 'a=1; Path=/search/', 'empty attributes')
  t.equal(cookie('$x=1; Path=/'), '$x=1; Path=/search/', 'a name starting with $ is a token')
})

t.test('a Set-Cookie that cannot be read well enough to scope is dropped', async (t) => {
  const dropped: Array<[string, string]> = [
    ['no-equals', 'no name=value'],
    ['', 'no name=value'],
    ['; Path=/', 'no name=value'],
    [REMOVED, 'no name=value'],
    ['=value; Path=/', 'not a token'],
    ['a b=1; Path=/', 'not a token'],
    ['a:b=1', 'not a token'],
    ['a=1 b=2; Path=/', 'cookie-octets'],
    ['a=x,y; Path=/', 'cookie-octets'],
    ['a="x; Path=/"; Path=/p', 'cookie-octets'],
    ['a="x\\"y"', 'cookie-octets'],
    ['a=x\\y', 'cookie-octets'],
    ['a=caf\u00e9', 'cookie-octets'],
    ['a=1\u0001', 'cookie-octets'],
    ['a={"j":1}', 'cookie-octets'],
    ['a=1; $Path=/', 'starts with "$"'],
    ['a=1; Pa th=/', 'not a token'],
    ['a=1; Path/x=/', 'not a token'],
    ['a=1; =/x', 'not a token'],
    ['a=1; Path=/x y', 'path has a character'],
    ['a=1; Path=/x,y', 'path has a character'],
    ['a=1; Path=/x"', 'path has a character'],
    ['a=1; Path=/caf\u00e9', 'path has a character'],
  ]
  for (const [c, why] of dropped) {
    const r = scopeSetCookie(c, 'search', '', '/x/y')
    t.ok('dropped' in r && r.dropped.includes(why), `${JSON.stringify(c)}: ${'dropped' in r ? r.dropped : 'kept as ' + r.cookie}`)
  }
  // A default-path that cannot be written (the call's path held a comma or a `;`).
  t.same(scopeSetCookie('a=1', 'search', '', '/a,b/c'), { dropped: 'path has a character outside RFC 6265 cookie-octets' })
  t.same(scopeSetCookie('a=1', 'search', '', '/a;b/c'), { dropped: 'path has a character outside RFC 6265 cookie-octets' })
})

t.test("a route with a base path upstream: its paths translated as Location's are, the rest of the upstream dropped", async (t) => {
  const v3 = (c: string, upstreamPath = '/v3/items/1') => cookie(c, upstreamPath, 'api', '/v3')
  t.equal(v3('a=1; Path=/v3/items'), 'a=1; Path=/api/items')
  t.equal(v3('a=1; Path=/v3/'), 'a=1; Path=/api/')
  t.equal(v3('a=1; Path=/v3'), 'a=1; Path=/api/')
  t.equal(v3('a=1; Path=/'), 'a=1; Path=/api/', 'covering the whole upstream: the whole route')
  t.equal(cookie('a=1; Path=/v3', '/v3/v4/x', 'api', '/v3/v4'), 'a=1; Path=/api/', 'covering the base: the whole route')
  t.equal(v3('a=1'), 'a=1; Path=/api/items', 'the default-path of /v3/items/1')
  t.equal(v3('a=1', '/v3/'), 'a=1; Path=/api/', 'the default-path of the route root')
  for (const outside of ['/v', '/v3x', '/v4', '/other/v3', '/V3']) t.same(scopeSetCookie(`a=1; Path=${outside}`, 'api', '/v3', '/v3/x'), { dropped: "path is outside the route's base path upstream" }, outside)
  t.equal(pathThroughRoute('/', 'r', ''), '/r/')
  t.equal(pathThroughRoute('/v3/a', 'r', '/v3'), '/r/a')
  t.equal(pathThroughRoute('/v3/', 'r', '/v3/v4'), '/r/')
  t.equal(pathThroughRoute('/v', 'r', '/v3'), null)
})

t.test('scopeRouteCookies: every Set-Cookie of a head, one or many; Set-Cookie2 dropped; absolute-form untouched', async (t) => {
  const target = parseReverseTarget('/search/x/y', new Map([['search', new URL('http://a.test')]]))
  const upstream = new URL('http://a.test')
  const many: IncomingHttpHeaders = { 'set-cookie': ['a=1; Path=/', 'bad cookie', 'b=2; Domain=a.test'], 'content-type': 'text/plain' }
  t.same(scopeRouteCookies(many, target, upstream), ['no name=value before the first ";"'])
  t.same(many, { 'set-cookie': ['a=1; Path=/search/', 'b=2; Path=/search/x'], 'content-type': 'text/plain' })
  const one = { 'set-cookie': 'a=1' } as unknown as IncomingHttpHeaders
  t.same(scopeRouteCookies(one, target, upstream), [])
  t.same(one, { 'set-cookie': ['a=1; Path=/search/x'] })
  const none: IncomingHttpHeaders = { 'set-cookie': ['a b=1'], 'set-cookie2': 'x=1; Version=1' } as IncomingHttpHeaders
  t.same(scopeRouteCookies(none, target, upstream), ['Set-Cookie2 is not relayed on a route', 'name is not a token'])
  t.same(none, {}, 'nothing left: no empty Set-Cookie')
  const direct = { 'set-cookie': ['a=1; Path=/'] } as IncomingHttpHeaders
  t.same(scopeRouteCookies(direct, { ...target, route: null }, upstream), [])
  t.same(direct, { 'set-cookie': ['a=1; Path=/'] }, 'not a route: left as the upstream wrote it')
})

t.test("Python's cookiejar (requests) and SimpleCookie (aiohttp) read each rewritten cookie as one cookie, on the route", async (t) => {
  // What an upstream might send to widen a cookie, or plant another, past a naive rewrite.
  const tricky = [
    'a=1; Path=/',
    'a=1; Path=/; Max-Age=5 evil=2',
    'a=1; Priority=High; evil=2; Path=/',
    'a=1; Max-Age=5, evil=2; Path=/',
    'a=1; Expires=x evil=2; Path=/',
    'a=1; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Path=/',
    'a=1; Path=/search/../; Path=/',
    'a=1; path=/other; PATH=/',
    'a=1; HttpOnly; SameSite=None; Domain=127.0.0.1; Path=/',
  ]
  const scoped = tricky.map((c) => cookie(c)).filter((c): c is string => c !== null)
  const script = `
import json, sys, http.cookiejar, http.cookies, urllib.request, email.message
out = []
for header in json.loads(sys.argv[1]):
    msg = email.message.Message()
    msg['Set-Cookie'] = header
    class R:
        def info(self): return msg
    jar = http.cookiejar.CookieJar()
    jar.extract_cookies(R(), urllib.request.Request('http://127.0.0.1:15001/search'))
    simple = http.cookies.SimpleCookie()
    simple.load(header)
    out.append({'jar': sorted([c.name, c.path] for c in jar), 'simple': sorted([k, m['path']] for k, m in simple.items())})
print(json.dumps(out))`
  const read = JSON.parse(execFileSync('python3', ['-c', script, JSON.stringify(scoped)], { encoding: 'utf8' })) as Array<{ jar: string[][]; simple: string[][] }>
  t.equal(read.length, tricky.length, 'none was dropped')
  read.forEach((r, i) => {
    t.same(r.jar, [['a', '/search/']], `cookiejar: ${scoped[i]}`)
    t.same(r.simple, [['a', '/search/']], `SimpleCookie: ${scoped[i]}`)
  })
})
