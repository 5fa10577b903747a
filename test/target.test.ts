import t from 'tap'
import { parseAbsoluteTarget, parseConnectTarget, parseReverseTarget, parseTunnelledTarget, hostHeader } from '../proxy/listen/target.js'
import { locationThroughRoute, resolveLocation } from '../proxy/forward/route-location.js'

const routes = new Map([
  ['gh', new URL('https://api.github.com')],
  ['svc', new URL('http://127.0.0.1:8080')],
  ['v3', new URL('https://api.example.com/v3/')],
])

t.test('numeric spellings of a host are judged by the address they mean', async (t) => {
  for (const spelling of ['2130706433', '0x7f000001', '0177.0.0.1', '0x7f.1', '127.1', '127.0.1', '0177.0.0.01', '%31%32%37.0.0.1', '127.000.000.001']) {
    const target = parseAbsoluteTarget(`http://${spelling}/x`)
    t.equal(target.host, '127.0.0.1', spelling)
    t.ok(target.hostIsIp, `${spelling} is an IP literal`)
  }
  t.equal(parseAbsoluteTarget('http://[::ffff:127.0.0.1]/').host, '::ffff:7f00:1')
  t.equal(parseAbsoluteTarget('http://[0:0:0:0:0:0:0:1]/').host, '::1')
})

t.test('host names are folded: case, trailing dot, IDN', async (t) => {
  t.equal(parseAbsoluteTarget('http://API.Example.COM./a').host, 'api.example.com')
  t.equal(parseAbsoluteTarget('http://bücher.example/').host, 'xn--bcher-kva.example')
  t.equal(parseAbsoluteTarget('HTTPS://x.com/').scheme, 'https')
  t.equal(parseAbsoluteTarget('https://x.com/').port, 443)
  t.equal(parseAbsoluteTarget('http://x.com:8080/').port, 8080)
})

t.test('dot segments are resolved before anything looks at the path', async (t) => {
  t.equal(parseAbsoluteTarget('http://x.com/a/../admin').path, '/admin')
  t.equal(parseAbsoluteTarget('http://x.com/a/%2e%2e/admin').path, '/admin')
  t.equal(parseAbsoluteTarget('http://x.com/a?b=1').search, '?b=1')
})

t.test('absolute targets that could mislead are refused', async (t) => {
  for (const bad of [
    'http://user:pw@x.com/',
    'http://x.com@127.0.0.1/',
    // The URL parser skips the extra slashes and reads userinfo after them.
    'http:///x.com@127.0.0.1/',
    'http:///user@x.com/',
    'https:////user:pw@x.com/',
    'HTTP:///u@x.com/',
    'ftp://x.com/',
    'http://x.com/#frag',
    'http://a b.com/',
    '/relative',
    'http://[::1/',
    // An empty label: `x.com..` would be the fully qualified x.com to DNS, and another name to policy.
    'http://x.com../',
    'http://x.com.../',
    'http://x..com/',
    'http://.x.com/',
    // Userinfo after no path, before the query or fragment.
    'http://x.com@127.0.0.1?q',
    'http://x.com@127.0.0.1#f',
    // Port 0 names no server; names DNS could never answer for.
    'http://x.com:0/',
    'http://127.0.0.1:0/',
    `http://${'a'.repeat(64)}.com/`,
    `http://${'abcdefghi.'.repeat(26)}com/`,
  ]) {
    t.throws(() => parseAbsoluteTarget(bad), { code: 'LK_BAD_REQUEST' }, bad)
  }
  t.throws(() => parseAbsoluteTarget(`http://${'a'.repeat(5000)}.com/`), { code: 'LK_BAD_REQUEST', reason: 'request target host name is longer than DNS allows (253 characters, 63 a label)' }, 'a long name is refused without being quoted')
})

t.test('the authority ends at the path, the query or the fragment, as the URL parser ends it', async (t) => {
  for (const [raw, host, port, search] of [
    ['http://x.com?to=a@b.com', 'x.com', 80, '?to=a@b.com'],
    ['http://x.com:8080?to=a@b.com&p=/x', 'x.com', 8080, '?to=a@b.com&p=/x'],
    ['http://x.com?a=\\', 'x.com', 80, '?a=\\'],
    ['http://127.0.0.1:019180/', '127.0.0.1', 19180, ''],
    [`http://${'a'.repeat(63)}.${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(61)}/`, `${'a'.repeat(63)}.${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(61)}`, 80, ''],
  ] as const) {
    const target = parseAbsoluteTarget(raw)
    t.same([target.host, target.port, target.path, target.search], [host, port, '/', search], raw)
  }
})

t.test('paths an upstream could read differently from the path rules are refused, on every entry path', async (t) => {
  const bad = ['/admin%00/x', '/admin%0a/x', '/admin%0D/x', '/admin%0b/x', '/admin%09/x', '/admin%7f/x', '/admin%1F', '/admin%ff/x', '/%C0%AEadmin/x', '/%E0%80%AE/', '/100%/x', '/a%zz',
    // The same once a server decodes the path again, up to the readings policy judges.
    '/admin%2500/x', '/admin%250d', '/admin%250A/x', '/admin%250b', '/admin%250C', '/admin%2509', '/admin%257f', '/admin%25%30%30', '/admin%252500', '/admin%25252500',
    '/%25C0%25AEadmin/x', '/%25E0%2580%25AE/', '/%25c1%259c',
    // C1 controls: NEL (U+0085) is a space to Python's strip().
    '/admin%C2%85', '/admin%c2%80/x', '/admin%C2%9F', '/admin%25C2%2585',
    // Past the decodings policy judges.
    '/secret%2525252500', '/secre%2525252574']
  for (const path of bad) {
    t.throws(() => parseAbsoluteTarget(`http://x.com${path}`), { code: 'LK_BAD_REQUEST' }, `absolute ${path}`)
    t.throws(() => parseReverseTarget(`/svc${path}`, routes), { code: 'LK_BAD_REQUEST' }, `reverse ${path}`)
    t.throws(() => parseTunnelledTarget(path, parseConnectTarget('x.com:80')), { code: 'LK_BAD_REQUEST' }, `tunnelled ${path}`)
  }
  for (const good of ['/caf%C3%A9', '/a%20b', '/%E2%9C%93', '/a%2Fb', '/%25', '/%EF%BD%81dmin', '/100%25%20sure', '/%25%20done', '/%25C3%25A9', '/%2525zz', '/products/100%25Beef', '/50%25Cafe', '/a%25ff', '/%C2%A0', '/%C2%A9', '/%252525']) {
    t.equal(parseAbsoluteTarget(`http://x.com${good}`).path, good, `${good} is valid UTF-8 and no control character`)
  }
  t.throws(() => parseReverseTarget('/svc/a#frag', routes), { code: 'LK_BAD_REQUEST' }, 'a fragment is refused in origin-form too')
})

t.test('CONNECT needs host:port and nothing more', async (t) => {
  const c = parseConnectTarget('Example.com:443')
  t.same([c.host, c.port, c.path], ['example.com', 443, ''])
  t.equal(parseConnectTarget('[::1]:8443').host, '::1')
  t.equal(parseConnectTarget('0x7f.1:443').host, '127.0.0.1')
  t.equal(parseConnectTarget('example.com:0443').port, 443, 'leading zeros, as absolute-form takes them')
  for (const bad of ['example.com', 'example.com:', 'example.com:443/path', 'user@example.com:443', 'example.com:99999', 'example.com:0', 'example.com:000', 'example.com:00000000000000000000000443x', 'example.com:1e3', 'example.com:+443', ':443', 'a b:443', 'example.com..:443', '.example.com:443', `${'a'.repeat(300)}:443`]) {
    t.throws(() => parseConnectTarget(bad), { code: 'LK_BAD_REQUEST' }, bad)
  }
})

t.test('reverse routes map onto their upstream origin', async (t) => {
  const target = parseReverseTarget('/gh/repos/x?per_page=1', routes)
  t.same([target.route, target.scheme, target.host, target.port, target.path, target.search], ['gh', 'https', 'api.github.com', 443, '/repos/x', '?per_page=1'])
  t.equal(parseReverseTarget('/gh', routes).path, '/')
  t.equal(parseReverseTarget('/x/../svc/a', routes).route, 'svc', 'dot segments resolved before the route is picked')
  t.equal(parseReverseTarget('/gh/a/../../svc/b', routes).route, 'svc')
  t.throws(() => parseReverseTarget('/nope/x', routes), { code: 'LK_NO_ROUTE' })
  t.throws(() => parseReverseTarget('//evil.com/x', routes), { code: 'LK_NO_ROUTE', reason: 'origin-form requests must start with a route name' }, 'a path, never an authority: its first segment is empty')
  t.equal(hostHeader(parseReverseTarget('/svc/a', routes)), '127.0.0.1:8080')
  t.equal(hostHeader(parseReverseTarget('/gh/a', routes)), 'api.github.com')
})

t.test("a reverse route's redirects stay on the route", async (t) => {
  const through = (location: string, path = '/gh/repos/x') => {
    const target = parseReverseTarget(path, routes)
    return locationThroughRoute(location, resolveLocation(location, target), target, routes.get(target.route!)!)
  }
  const cases: [string, string][] = [
    ['/login?next=%2Fx', '/gh/login?next=%2Fx'],
    ['https://api.github.com/v2/x?a=1#f', '/gh/v2/x?a=1#f'],
    ['HTTPS://API.GITHUB.COM.:443/y', '/gh/y'],
    ['https://api.github.com:8443/y', 'https://api.github.com:8443/y'],
    ['http://api.github.com/y', 'http://api.github.com/y'],
    ['https://evil.example/y', 'https://evil.example/y'],
    ['https://user@api.github.com/y', 'https://user@api.github.com/y'],
    ['//evil.example/y', '//evil.example/y'],
    ['/\\evil.example/y', '/\\evil.example/y'],
    // Relative references are resolved against the upstream URL the call went to.
    ['next/page', '/gh/repos/next/page'],
    ['?page=2', '/gh/repos/x?page=2'],
    ['not a url', '/gh/repos/not%20a%20url'],
    // Dot segments cannot climb out of the route into another one (and its credential).
    ['/../billing/charge', '/gh/billing/charge'],
    ['/%2e%2e/billing/charge', '/gh/billing/charge'],
    ['/./../billing/charge', '/gh/billing/charge'],
    ['../../../../billing/charge', '/gh/billing/charge'],
    ['https://api.github.com/../billing/charge', '/gh/billing/charge'],
  ]
  for (const [location, expected] of cases) t.equal(through(location), expected, location)
  // A route with a base path: what is under it maps back; what is not is the upstream's own URL.
  t.equal(through('/v3/users?a=1', '/v3/repos'), '/v3/users?a=1')
  t.equal(through('https://api.example.com/v3', '/v3/repos'), '/v3/')
  t.equal(through('/login', '/v3/repos'), 'https://api.example.com/login')
  t.equal(through('/v3x/y', '/v3/repos'), 'https://api.example.com/v3x/y')
  t.equal(through('/v3/../login', '/v3/repos'), 'https://api.example.com/login')
  const absolute = parseAbsoluteTarget('https://api.github.com/x')
  t.equal(locationThroughRoute('/login', resolveLocation('/login', absolute), absolute, routes.get('gh')!), '/login', 'absolute-form calls are not rewritten')
})
