// An upstream's redirect cannot steer the agent into another call of the sidecar's choosing: not
// out of its route into another route (and that route's credential), and not back to the
// sidecar's own address from anywhere. Clients follow redirects by themselves: fetch does, and
// keeps a POST's method and body on 307 and 308.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { networkInterfaces } from 'node:os'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary } from '../helpers/harness.js'

const run = promisify(execFile)

t.test('redirects stay on their route and never lead back into the sidecar', async (t) => {
  // Answers /r with the status and Location it is asked for.
  const search = await startUpstream({
    handler: (req, res) => {
      const u = new URL(req.url, 'http://x')
      if (u.pathname === '/two') {
        // Two Location lines: which one a client follows is its own choice.
        res.setHeader('location', ['/fine', u.searchParams.get('to') ?? '/'])
        res.writeHead(Number(u.searchParams.get('code') ?? 302)).end()
        return true
      }
      if (u.pathname === '/links') {
        const lro = { 'operation-location': u.searchParams.getAll('op'), 'azure-asyncoperation': u.searchParams.get('async')! }
        res.writeHead(200, { link: u.searchParams.get('link')!, 'content-location': u.searchParams.get('cl')!, ...lro }).end('[]')
        return true
      }
      if (u.pathname !== '/r') return false
      res.writeHead(Number(u.searchParams.get('code') ?? 302), { location: u.searchParams.get('to') ?? '/' }).end()
      return true
    },
  })
  const billing = await startUpstream()
  const s = await startTestSidecar(
    {
      policy: { default: 'allow' },
      network: { allow: [{ cidr: '127.0.0.1/32', ports: [search.port, billing.port] }] },
      routes: { search: search.origin, billing: billing.origin },
      credentials: [
        { id: 'search', audience: search.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
        { id: 'billing', audience: billing.origin, source: 'static', secret: 'BILLING', inject: { type: 'bearer' } },
      ],
    },
    { LATCHKEY_SECRET_BILLING: 'billing-secret-value' },
  )
  t.teardown(async () => {
    await s.close()
    await Promise.all([search.close(), billing.close()])
  })
  const seen: string[] = []
  const lk = `127.0.0.1:${s.sidecar.port}`
  const via = (path: string, to: string, code = 307) => `${path}?code=${code}&to=${encodeURIComponent(to)}`
  /** The search upstream's 307 to `to`, asked for on its route and in absolute-form: each way's response. */
  const redirectedBothWays = async (to: string) => {
    const ways = [
      ['on a route', via('/search/r', to)],
      ['absolute-form', `http://127.0.0.1:${search.port}${via('/r', to)}`],
    ] as const
    const answers: [string, Awaited<ReturnType<typeof rawRequest>>][] = []
    for (const [how, path] of ways) {
      const r = await rawRequest(s.sidecar.port, `GET ${path} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
      seen.push(r.raw)
      answers.push([how, r])
    }
    return answers
  }

  await t.test('a Location climbing out of its route is put back under it', async (t) => {
    for (const to of ['/../billing/charge', '/%2e%2e/billing/charge', '/./../billing/charge', '../../billing/charge', `${search.origin}/../billing/charge`]) {
      const r = await rawRequest(s.sidecar.port, `GET ${via('/search/r', to)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
      seen.push(r.raw)
      t.equal(r.status, 307, to)
      t.equal(r.headers.location, '/search/billing/charge', to)
    }
    // Followed by fetch, with its method and body: it stays on the search route.
    const followed = await fetch(`http://${lk}${via('/search/r', '/../billing/charge')}`, { method: 'POST', body: 'prompt=private' })
    seen.push(await followed.text())
    t.equal(followed.status, 200)
    t.equal(billing.requests.length, 0, 'the billing route was never called')
    t.match(search.requests.at(-1), { method: 'POST', url: '/billing/charge', body: 'prompt=private' }, 'the followed call went back to the search upstream')
  })

  await t.test("Link, Content-Location and an operation's status URL are put under their route as a Location is; one naming the sidecar is dropped", async (t) => {
    const port = s.sidecar.port
    const link = `</../billing/charge?page=2>; rel="next", <http://127.0.0.1:${port}/billing/charge>; rel="prev", <${search.origin}/items?page=9>; rel="last"; title="a, <b>", <https://docs.example/x>; rel="help"`
    // An Azure SDK's poller calls Operation-Location (or Azure-AsyncOperation) by itself: on a
    // route, the upstream's absolute status URL would take it past the route and its credential,
    // and one naming the sidecar into another route's.
    const op = `${search.origin}/operations/41?api-version=2024-10-21`
    const ask = (path: string, async = `http://localhost:${port}/billing/charge`) =>
      rawRequest(s.sidecar.port, `GET ${path}?link=${encodeURIComponent(link)}&cl=${encodeURIComponent('/../billing/7')}&op=${encodeURIComponent(op)}&async=${encodeURIComponent(async)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
    const routed = await ask('/search/links')
    seen.push(routed.raw)
    t.equal(routed.status, 200)
    t.equal(routed.headers.link, '</search/billing/charge?page=2>; rel="next", </search/items?page=9>; rel="last"; title="a, <b>", <https://docs.example/x>; rel="help"', "each of the upstream's own links put under the route, the one naming the sidecar dropped, the rest as written")
    t.equal(routed.headers['content-location'], '/search/billing/7')
    t.equal(routed.headers['operation-location'], '/search/operations/41?api-version=2024-10-21', "the upstream's absolute status URL put under the route")
    t.equal(routed.headers['azure-asyncoperation'], undefined, "a status URL naming the sidecar's own address is dropped")
    const routedAsync = await ask('/search/links', `${search.origin}/../billing/operations/9`)
    t.equal(routedAsync.headers['azure-asyncoperation'], '/search/billing/operations/9', 'Azure-AsyncOperation climbing out of its route is put back under it')
    // Sent twice, each is looked at: one naming the sidecar is dropped, the other put under the route.
    const twice = await rawRequest(s.sidecar.port, `GET /search/links?op=${encodeURIComponent(`http://localhost:${port}/billing/charge`)}&op=${encodeURIComponent(op)}&link=x&cl=x&async=x HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
    seen.push(twice.raw)
    t.same(twice.raw.split('\r\n').filter((l) => /^operation-location:/i.test(l)).map((l) => l.slice(20)), ['/search/operations/41?api-version=2024-10-21'], 'of two Operation-Locations, the one naming the sidecar is dropped')
    // In absolute-form the agent resolves them against the upstream itself: only the sidecar's is dropped.
    const absolute = await ask(`http://127.0.0.1:${search.port}/links`)
    seen.push(absolute.raw)
    t.equal(absolute.headers.link, `</../billing/charge?page=2>; rel="next", <${search.origin}/items?page=9>; rel="last"; title="a, <b>", <https://docs.example/x>; rel="help"`)
    t.equal(absolute.headers['content-location'], '/../billing/7')
    t.equal(absolute.headers['operation-location'], op, 'in absolute-form the status URL is left as the upstream wrote it')
    t.equal(absolute.headers['azure-asyncoperation'], undefined, "in absolute-form too, one naming the sidecar's own address is dropped")
    // Octokit-style pagination through the route stays on it.
    const next = await fetch(`http://${lk}/search/billing/charge?page=2`)
    t.equal(next.status, 200)
    t.equal(billing.requests.length, 0, 'the billing route was never called')
  })

  await t.test("a redirect naming the sidecar's own address is not relayed, in any spelling", async (t) => {
    const port = s.sidecar.port
    const admin = s.sidecar.adminPort
    const spellings = [
      `http://127.0.0.1:${port}/billing/charge`,
      `http://localhost:${port}/billing/charge`,
      `http://LOCALHOST.:${port}/billing/charge`,
      // Loopback by definition (RFC 6761): curl and systemd-resolved answer 127.0.0.1, and a
      // NO_PROXY of `localhost` has most clients call it directly, where the sidecar takes it for its own.
      `http://app.localhost:${port}/billing/charge`,
      `http://Billing.LOCALHOST.:${port}/billing/charge`,
      // A URL parser's host is evil.test; curl's and Python's, after the userinfo `evil.test\`, the sidecar.
      `http://evil.test\\@127.0.0.1:${port}/billing/charge`,
      // A path on the search upstream to a URL parser; the sidecar's address to curl.
      `http:/127.0.0.1:${port}/billing/charge`,
      `http://127.1:${port}/billing/charge`,
      `http://2130706433:${port}/billing/charge`,
      `http://[::1]:${port}/billing/charge`,
      `http://[::ffff:127.0.0.1]:${port}/billing/charge`,
      `http://127.0.0.2:${port}/billing/charge`,
      `http://0.0.0.0:${port}/billing/charge`,
      `//127.0.0.1:${port}/billing/charge`,
      `http://127.0.0.1:${admin}/v1/tasks`,
    ]
    for (const to of spellings) {
      for (const [how, r] of await redirectedBothWays(to)) {
        t.equal(r.status, 502, `${to} ${how}`)
        t.equal(r.headers['x-latchkey-error'], 'LK_UPSTREAM_PROTOCOL', `${to} ${how}`)
        t.notOk(r.headers.location, 'no Location reaches the agent')
      }
    }
    const followed = await fetch(`http://${lk}${via('/search/r', `http://127.0.0.1:${port}/billing/charge`)}`, { method: 'POST', body: 'prompt=private' })
    seen.push(await followed.text())
    t.equal(followed.status, 502)
    // curl resolves any *.localhost to loopback by itself, and reads a backslash as part of the
    // userinfo; it follows a 307 with its POST and body.
    for (const to of [`http://app.localhost:${port}/billing/charge`, `http://evil.test\\@127.0.0.1:${port}/billing/charge`, `http:/127.0.0.1:${port}/billing/charge`]) {
      for (const how of [['--noproxy', '*', `http://${lk}${via('/search/r', to)}`], ['-x', s.proxy, `http://127.0.0.1:${search.port}${via('/r', to)}`]]) {
        const { stdout: curled } = await run('curl', ['-sS', '-L', '-i', '-X', 'POST', '-d', 'prompt=private', ...how])
        seen.push(curled)
        t.match(curled, /^HTTP\/1\.1 502 /, `curl -L gets the refusal, not the billing route: ${to} ${how[0] === '-x' ? 'through the proxy' : 'on a route'}`)
      }
    }
    t.equal(billing.requests.length, 0, 'the billing route was never called')
    const audit = await s.audit()
    t.match(audit.at(-1), { status: 502, error: 'LK_UPSTREAM_PROTOCOL', path: '/r', credential: { binding: 'search' } }, 'the call is recorded with why it was refused')
  })

  await t.test('a Location read as another host by the sidecar and as a path on the sidecar by clients is not relayed', async (t) => {
    // To a URL parser `///billing/charge` names host `billing`; to RFC 3986 it has an empty
    // authority, which Python and Java fill with the URL they asked: on a route, the sidecar's
    // own billing route, with billing's credential.
    const spellings = ['///billing/charge', '////billing/charge', 'http:///billing/charge', `//:${s.sidecar.port}/billing/charge`]
    // Tabs, which both parsers drop anywhere: each of these is `///billing/charge` to them.
    spellings.push('/\t//billing/charge', '//\t/billing/charge', '/\t/\t/billing/charge', 'h\tttp:///billing/charge', 'http\t:///billing/charge')
    for (const to of spellings) {
      for (const [how, r] of await redirectedBothWays(to)) {
        t.equal(r.status, 502, `${JSON.stringify(to)} ${how}`)
        t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /clients read as different URLs|not a URL/ }, JSON.stringify(to))
        t.notOk(r.headers.location, 'no Location reaches the agent')
      }
    }
    // Python's urllib follows a 307 by itself, resolving the Location as RFC 3986 does.
    const script = 'import sys, urllib.request, urllib.error\ntry:\n  r = urllib.request.urlopen(sys.argv[1]); print(r.status, r.read().decode())\nexcept urllib.error.HTTPError as e:\n  print(e.code, e.read().decode())\n'
    for (const to of ['///billing/charge', '////billing/charge', '/\t//billing/charge']) {
      const { stdout } = await run('python3', ['-c', script, `http://${lk}${via('/search/r', to)}`], { env: { ...process.env, NO_PROXY: '*', no_proxy: '*' } })
      seen.push(stdout)
      t.match(stdout, /^502 /, `urllib gets the refusal, not the billing route: ${to}`)
    }
    t.equal(billing.requests.length, 0, 'the billing route was never called')
  })

  await t.test('a redirect with more than one Location is not relayed', async (t) => {
    const two = await rawRequest(s.sidecar.port, `GET ${via('/search/two', `http://127.0.0.1:${s.sidecar.port}/billing/charge`, 302)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
    seen.push(two.raw)
    t.equal(two.status, 502)
    t.match(JSON.parse(two.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /more than one Location/ })
    const created = await rawRequest(s.sidecar.port, `GET ${via('/search/two', '/other', 201)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
    seen.push(created.raw)
    t.equal(created.status, 201, 'on a response clients do not follow, each is relayed')
    t.same(created.raw.split('\r\n').filter((l) => /^location:/i.test(l)).map((l) => l.slice(10)), ['/search/fine', '/search/other'], 'each put back under the route')
  })

  await t.test('what is not a redirect to the sidecar is relayed as it is', async (t) => {
    // An Azure SDK's poller follows a 202's Location by itself: one naming the sidecar would steer
    // it into the billing route. The answer is relayed, without it.
    for (const code of [201, 202]) {
      const answered = await rawRequest(s.sidecar.port, `GET ${via('/search/r', `http://localhost:${s.sidecar.port}/billing/x`, code)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
      seen.push(answered.raw)
      t.equal(answered.status, code, `a ${code} is relayed`)
      t.equal(answered.headers.location, undefined, `its Location naming the sidecar is dropped`)
    }
    const two = await rawRequest(s.sidecar.port, `GET ${via('/search/two', `http://127.0.0.1:${s.sidecar.port}/billing/x`, 202)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
    seen.push(two.raw)
    t.same(two.raw.split('\r\n').filter((l) => /^location:/i.test(l)).map((l) => l.slice(10)), ['/search/fine'], 'of two, the one naming the sidecar is dropped, the other put under the route')
    for (const to of [`http://127.0.0.1:${billing.port}/charge`, 'https://example.com/x', `http://127.0.0.1:1/x`]) {
      const r = await rawRequest(s.sidecar.port, `GET ${via('/search/r', to, 302)} HTTP/1.1\r\nHost: ${lk}\r\nConnection: close\r\n\r\n`)
      seen.push(r.raw)
      t.equal(r.status, 302, to)
      t.equal(r.headers.location, to, 'another origin: left as the upstream wrote it')
    }
  })
  assertNoCanary(t, s, ...seen)
})

t.test("a redirect to this host's own address, or any name, on the sidecar's port is not relayed when the sidecar serves remote clients", async (t) => {
  const hostAddress = Object.values(networkInterfaces())
    .flat()
    .find((i) => i && i.family === 'IPv4' && !i.internal)?.address
  if (!hostAddress) return t.pass('this machine has no non-loopback IPv4 interface: nothing to check')
  const search = await startUpstream({
    handler: (req, res) => {
      res.writeHead(307, { location: new URL(req.url, 'http://x').searchParams.get('to') ?? '/' }).end()
      return true
    },
  })
  const billing = await startUpstream()
  const s = await startTestSidecar({
    sidecar: { listen: { host: '0.0.0.0', port: 0 }, allow_remote_clients: true },
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [search.port, billing.port] }] },
    routes: { search: search.origin, billing: billing.origin },
    credentials: [{ id: 'billing', audience: billing.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await Promise.all([search.close(), billing.close()])
  })
  const port = s.sidecar.port
  for (const to of [`http://${hostAddress}:${port}/billing/charge`, `http://[::ffff:${hostAddress}]:${port}/billing/charge`]) {
    const r = await rawRequest(port, `GET /search/r?to=${encodeURIComponent(to)} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`)
    t.equal(r.status, 502, `${to}: not relayed`)
    t.notOk(r.headers.location, 'no Location reaches the agent')
  }
  // Followed the way a client with NO_PROXY covering this network would: straight to the sidecar.
  const curl = await promisify(execFile)('curl', ['-sS', '-L', '--noproxy', '*', '-w', '\n%{http_code}', `http://127.0.0.1:${port}/search/r?to=${encodeURIComponent(`http://${hostAddress}:${port}/billing/charge`)}`])
  t.match(curl.stdout, /\n502$/)
  // Nor by a name (a Service's) that reaches it: it takes any Host for its own here.
  const named = await promisify(execFile)('curl', ['-sS', '-L', '--noproxy', '*', '--resolve', `latchkey.example:${port}:127.0.0.1`, '-w', '\n%{http_code}', `http://127.0.0.1:${port}/search/r?to=${encodeURIComponent(`http://latchkey.example:${port}/billing/charge`)}`])
  t.match(named.stdout, /\n502$/, 'a name on its port is not relayed either')
  t.equal(billing.requests.length, 0, 'the billing route was never called')
  const elsewhere = await rawRequest(port, `GET /search/r?to=${encodeURIComponent('http://latchkey.example:8080/x')} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`)
  t.equal(elsewhere.status, 307, 'another port is another service: relayed')
})
