// Spellings the decider might judge differently from the upstream that receives them, through
// the real sidecar on every entry path. The upstream reads its request target the way Node's
// documentation says to (`new URL(req.url, base)`): what it acts on must be what policy judged.
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { deflateSync, gzipSync } from 'node:zlib'
import { startUpstream, startTestSidecar, rawRequest, insideTunnel, assertNoCanary, CANARY, type Upstream } from '../helpers/harness.js'
import { validateConfig } from '../../lib/config/load.js'
import { DnsResolver } from '../../proxy/resolve/resolver.js'
import { compileNetworkPolicy } from '../../proxy/resolve/network-policy.js'

/**
 * An upstream and a sidecar in front of it on every entry path (absolute-form, the `up` route, a
 * plaintext tunnel): `deny` is judged first, the rest of the upstream is allowed.
 */
async function denyingSidecar(t: { teardown(fn: () => unknown): void }, deny: Record<string, unknown>, extra: (upstream: Upstream) => Record<string, unknown> = () => ({})) {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [deny, { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [upstream.port] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
    routes: { up: upstream.origin },
    ...extra(upstream),
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  return { upstream, s, host: `127.0.0.1:${upstream.port}` }
}

/** Sends each request, keeping what came back in `seen`: each refused (403) by the rule on DELETE. */
async function refusedByNoDelete(t: { equal(a: unknown, b: unknown, m: string): unknown }, port: number, seen: string[], requests: readonly (readonly [string, string])[]): Promise<void> {
  for (const [name, request] of requests) {
    const r = await rawRequest(port, request)
    seen.push(r.raw)
    t.equal(r.status, 403, `${name}: refused`)
    t.equal(r.headers['x-latchkey-rule'], 'no-delete', `${name}: by the rule on DELETE`)
  }
}

/** Sends a raw request, keeping what came back in `seen`; the answer to the request itself: inside a tunnel, what follows the CONNECT's 200. */
function sender(port: number, seen: string[]) {
  return async (request: string) => {
    const r = await rawRequest(port, request)
    seen.push(r.raw)
    return request.startsWith('CONNECT') ? insideTunnel(r) : r
  }
}

t.test('a path starting with // is judged as a URL-reading upstream reads it', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const entries: [string, (path: string) => string][] = [
    ['absolute-form', (p) => `GET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    ['reverse route', (p) => `GET /up${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
    ['inside a plaintext tunnel', (p) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    // Origin-form in a tunnel (what Node's fetch sends there): `//x` was read as an authority and refused, 400 (path probe).
    ['origin-form inside a plaintext tunnel', (p) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET ${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
  ]
  // Each is /admin/… to `new URL(path, base)`: the first segment is read as a host.
  const spellings = ['//evil.example/admin/x', '//127.0.0.1/admin', '///admin/admin/x', '/.//x/admin/y', '//x/ADMIN/y']
  const seen: string[] = []
  const send = sender(s.sidecar.port, seen)
  for (const [entry, request] of entries) {
    for (const spelling of spellings) {
      t.equal(new URL(spelling.replace(/^\/\.\//, '/'), 'http://base').pathname.toLowerCase().startsWith('/admin'), true, `${spelling} is /admin to a URL reader`)
      const r = await send(request(spelling))
      t.equal(r.status, 403, `${entry} ${spelling}: 403`)
      t.equal(r.headers['x-latchkey-rule'], 'no-admin', `${entry} ${spelling}: the path deny holds`)
    }
    const ok = await send(request('//evil.example/ok'))
    t.equal(ok.status, 200, `${entry}: a // path that no deny covers still passes`)
  }
  const reached = upstream.requests.map((q) => new URL(q.url, 'http://base').pathname)
  t.same(reached, ['/ok', '/ok', '/ok', '/ok'], 'no request the upstream reads as /admin reached it')
  t.same(upstream.requests.map((q) => q.url), Array(4).fill('//evil.example/ok'), 'each as sent, by every entry')
  assertNoCanary(t, s, ...seen)
})

t.test("a WebDAV COPY or MOVE is judged by the path its Destination writes to, not only by its request line", async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const sidecar = `127.0.0.1:${s.sidecar.port}`
  const head = (d: string[]) => `${d.map((v) => `Destination: ${v}\r\n`).join('')}Overwrite: T\r\nConnection: close\r\n\r\n`
  // Each entry, and how its agent writes a path of the upstream's: on the route, in the route's URLs.
  const entries: [string, (method: string, destination: string[]) => string, (path: string) => string][] = [
    ['absolute-form', (m, d) => `${m} http://${host}/public/a.txt HTTP/1.1\r\nHost: ${host}\r\n${head(d)}`, (p) => p],
    ['reverse route', (m, d) => `${m} /up/public/a.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n${head(d)}`, (p) => `/up${p}`],
    ['inside a plaintext tunnel', (m, d) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n${m} /public/a.txt HTTP/1.1\r\nHost: ${host}\r\n${head(d)}`, (p) => p],
  ]
  const seen: string[] = []
  const send = sender(s.sidecar.port, seen)
  for (const [entry, request, written] of entries) {
    const onRoute = entry === 'reverse route'
    // Each writes under /admin to nginx's dav module, which acts on the Destination's path.
    const denied = [
      `http://${host}/admin/config.txt`,
      'http://other.example/admin/x',
      ...['/admin/moved.txt', '/public/../admin/x', '/%61dmin/x', '/ADMIN'].map(written),
      ...(onRoute ? [`http://${sidecar}/up/admin/x`] : ['//x/admin/y']),
    ]
    for (const method of ['COPY', 'MOVE']) {
      for (const destination of denied) {
        const r = await send(request(method, [destination]))
        t.equal(r.status, 403, `${entry} ${method} to ${destination}: 403`)
        t.equal(r.headers['x-latchkey-rule'], 'no-admin', `${entry} ${method} to ${destination}: by the path deny`)
        t.match(JSON.parse(r.body).reason, /^the Destination header names a path the policy denies/, 'saying it was the Destination')
      }
    }
    const ok = await send(request('MOVE', [written('/public/b.txt')]))
    t.equal(ok.status, 200, `${entry}: a Destination no deny covers passes`)
    t.equal(upstream.requests.at(-1)?.headers.destination, '/public/b.txt', `${entry}: and reaches the upstream as its own path`)
    if (onRoute) {
      await send(request('COPY', [`http://${sidecar}/up/public/c.txt`]))
      t.equal(upstream.requests.at(-1)?.headers.destination, `http://${host}/public/c.txt`, 'the route\'s own URL reaches the upstream as the upstream\'s')
    }
    const unreadable: [string[], RegExp][] = [
      [['/public/b', '/admin/x'].map(written), /more than one Destination header/],
      [['ftp://x/admin/x'], /Destination header is not an absolute URL or absolute path/],
      [['admin/x'], /Destination header is not an absolute URL or absolute path/],
      // nginx reads the path from the first `/` after the scheme; the URL parser ends the host at `?`.
      [[`http://${host}?/admin/config.txt`], /something other than a path follows its host/],
      [[`http://${host}#/admin/config.txt`], /something other than a path follows its host/],
      [[`http://${host}\\admin\\x`], /something other than a path follows its host/],
      onRoute ? [['/nope/x'], /names no route \(it is not repeated: it may hold a key\); the routes are "up"/] : [[`http://${sidecar}/up/x`], /names a route of the sidecar, and the request is not on one/],
    ]
    for (const [destinations, why] of unreadable) {
      const r = await send(request('COPY', destinations))
      t.equal(r.status, 400, `${entry} ${destinations.join(' + ')}: refused, not guessed at`)
      t.match(JSON.parse(r.body).reason, why)
    }
  }
  t.same(
    upstream.requests.map((q) => `${q.method} ${q.headers.destination}`),
    ['MOVE /public/b.txt', 'MOVE /public/b.txt', `COPY http://${host}/public/c.txt`, 'MOVE /public/b.txt'],
    'only the allowed calls reached the upstream',
  )
  const audit = await s.audit()
  t.match(audit.find((e) => e.status === 403), { method: 'COPY', path: '/public/a.txt', destination: '/admin/config.txt', decision: 'deny', rule: 'no-admin', error: 'LK_POLICY_DENIED' })
  t.same(
    audit.filter((e) => e.status === 200).map((e) => `${e.method} ${e.path} ${e.destination}`),
    ['MOVE /public/a.txt /public/b.txt', 'MOVE /public/a.txt /public/b.txt', 'COPY /public/a.txt /public/c.txt', 'MOVE /public/a.txt /public/b.txt'],
    'the trail says where each COPY and MOVE wrote, as the upstream\'s path',
  )
  t.ok(audit.every((e) => e.method === 'COPY' || e.method === 'MOVE' || e.destination === null), 'and names no destination for other calls')
  assertNoCanary(t, s, ...seen)
})

t.test('a deny on an exact path is not dodged by a trailing slash or a format suffix, which many routers ignore', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin', '/settings/'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const entries: [string, (path: string) => string][] = [
    ['absolute-form', (p) => `GET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    ['reverse route', (p) => `GET /up${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
    ['inside a plaintext tunnel', (p) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET ${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
  ]
  // Express (non-strict routing, its default), Rails, Spring before 6 and ASP.NET Core answer
  // each from the handler of the path the deny names; Rails (`(.:format)`) the suffixed ones too.
  const spellings = ['/admin/', '/Admin/', '/admin//', '/admin/.', '/admin/;x', '/admin%2F', '/settings', '/admin.json', '/settings.xml/']
  const seen: string[] = []
  const send = sender(s.sidecar.port, seen)
  for (const [entry, request] of entries) {
    for (const spelling of spellings) {
      const r = await send(request(spelling))
      t.equal(r.status, 403, `${entry} ${spelling}: 403`)
      t.equal(r.headers['x-latchkey-rule'], 'no-admin', `${entry} ${spelling}: the path deny holds`)
    }
    t.equal((await send(request('/administrator'))).status, 200, `${entry}: another path still passes`)
  }
  t.same(upstream.requests.map((q) => q.url), ['/administrator', '/administrator', '/administrator'], 'nothing the deny names reached the upstream')
  assertNoCanary(t, s, ...seen)
})

t.test('a path encoded more than once is judged as an upstream that decodes again reads it', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  // What a stack that decodes until nothing changes (a proxy, then a framework, each decoding
  // once more) routes on.
  const decodedFully = (target: string) => {
    let p = target
    for (let i = 0; i < 4; i++) p = decodeURIComponent(p)
    return new URL(p.replace(/\\/g, '/'), 'http://base').pathname.replace(/\/{2,}/g, '/')
  }
  const entries: [string, (path: string) => string][] = [
    ['absolute-form', (p) => `GET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    ['reverse route', (p) => `GET /up${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
  ]
  const spellings = [
    '/api/x%25%32%46..%25%32%46..%25%32%46admin/y',
    '/api/%25%32%65%25%32%65/admin/y',
    '/api/x%25252F..%25252F..%25252Fadmin/y',
    '/api/%25%32%65%25%32%65%25%32%66admin',
  ]
  const seen: string[] = []
  for (const [entry, request] of entries) {
    for (const spelling of spellings) {
      t.match(decodedFully(spelling), /^\/admin(\/|$)/, `${spelling} is /admin to a stack that decodes again`)
      const r = await rawRequest(s.sidecar.port, request(spelling))
      seen.push(r.raw)
      t.equal(r.status, 403, `${entry} ${spelling}: 403`)
      t.equal(r.headers['x-latchkey-rule'], 'no-admin', `${entry} ${spelling}: the path deny holds`)
    }
    const ok = await rawRequest(s.sidecar.port, request('/api/100%25%20sure'))
    seen.push(ok.raw)
    t.equal(ok.status, 200, `${entry}: a literal % still passes`)
  }
  t.same(upstream.requests.map((q) => q.url), ['/api/100%25%20sure', '/api/100%25%20sure'], 'nothing else reached the upstream')
  assertNoCanary(t, s, ...seen)
})

t.test('a path that is a denied one to an upstream cutting at NUL or stripping spaces is refused or denied, however encoded', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-secret', action: 'deny', hosts: ['127.0.0.1'], paths: ['/secret', '/admin/**'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const entries: [string, (path: string) => string][] = [
    ['absolute-form', (p) => `GET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    ['reverse route', (p) => `GET /up${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
    ['inside a plaintext tunnel', (p) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET ${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
  ]
  // A control character encoded twice: one more decoding gives `/secret%00`, which C-backed
  // servers cut at and others trim (`%0d`, `%0a`, `%0b`, `%0c`).
  const refused = ['/secret%25C2%2585', '/secret%2500', '/secret%250d', '/secret%250a', '/secret%250b', '/secret%250c', '/admin%2500/x', '/secret%25%30%30']
  // Unicode spaces, which str.strip() trims, and characters that show nothing.
  const denied = ['/secret%C2%A0', '/secret%E3%80%80', '/secret%E2%80%8B', '/se%C2%ADcret', '/admin%C2%A0/x']
  const seen: string[] = []
  const send = sender(s.sidecar.port, seen)
  for (const [entry, request] of entries) {
    for (const spelling of refused) {
      const r = await send(request(spelling))
      t.equal(r.status, 400, `${entry} ${spelling}: 400`)
      t.match(JSON.parse(r.body), { code: 'LK_BAD_REQUEST', reason: /control character encoded more than once/ }, `${entry} ${spelling}: says why`)
    }
    for (const spelling of denied) {
      const r = await send(request(spelling))
      t.equal(r.status, 403, `${entry} ${spelling}: 403`)
      t.equal(r.headers['x-latchkey-rule'], 'no-secret', `${entry} ${spelling}: the path deny holds`)
    }
    t.equal((await send(request('/secretary%C2%A0x'))).status, 200, `${entry}: a space inside a segment is no path end`)
  }
  t.same(upstream.requests.map((q) => q.url), Array(3).fill('/secretary%C2%A0x'), 'nothing the deny names reached the upstream')
  assertNoCanary(t, s, ...seen)
})

t.test('a method override in a POSTed form is judged as the method it names, where the method matters', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-delete', action: 'deny', hosts: ['127.0.0.1'], methods: ['DELETE'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const form = (body: string, extra = '') =>
    `POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/x-www-form-urlencoded${extra}\r\nContent-Length: ${Buffer.byteLength(body, 'latin1')}\r\nConnection: close\r\n\r\n${body}`
  const chunked = (body: string) =>
    `POST /up/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`
  const seen: string[] = []
  // Each is DELETE to Laravel/Symfony (PHP reads `.` as `_` and cuts a name at a NUL), Rails or Spring.
  await refusedByNoDelete(t, s.sidecar.port, seen, [
    ['a form field', form('name=x&_method=DELETE')],
    ['lower case, first', form('_method=delete&name=x')],
    ['an encoded name', form('%5Fmethod=DELETE')],
    ['a PHP-mangled name', form('.method=DELETE')],
    ['a name cut at a NUL', form('_method%00%ff=DELETE')],
    ['a charset parameter', form('_method=DELETE', '; charset=UTF-8')],
    // A form to PHP (which ends the media type at `;`, `,` or a space) and Rack (at `;` or `,`).
    ['a second media type after a comma', form('_method=DELETE', ', text/plain')],
    ['a word after a space', form('_method=DELETE', ' text/plain')],
    // Rack reads a POST with no Content-Type as a form.
    ['no Content-Type', `POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 14\r\nConnection: close\r\n\r\n_method=DELETE`],
    ['a chunked form, on a route', chunked('a=1&_method=DELETE')],
    // qs (Express) and Rack read a name in brackets as the name inside.
    ['a name in brackets', form('[_method]=DELETE')],
    ['a leading bracket', form(']_method=DELETE')],
    ['PHP dropping a long run of spaces', form(`${'+'.repeat(6000)}_method=DELETE`)],
    // Express's body-parser decodes the form with iconv-lite, which drops a UTF-8 BOM leading it
    // (written here as U+FEFF: the harness sends UTF-8, 3 bytes).
    ['a UTF-8 BOM leading the form', `POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 17\r\nConnection: close\r\n\r\n\ufeff_method=DELETE`],
  ])
  t.equal(upstream.requests.length, 0, 'none reached the upstream')
  const refusedBadly = await rawRequest(s.sidecar.port, form('_method=PUT&_method=PATCH'))
  t.equal(refusedBadly.status, 400, 'two different overrides: which one a framework takes is a guess')
  t.match(JSON.parse(refusedBadly.body).reason, /two different method overrides/)
  t.equal(upstream.requests.length, 0, 'none of those reached the upstream whole')
  // Forms whose override the policy allows, or with none, go on intact, credential injected.
  for (const body of ['_method=PUT&a=1', 'a=1&b=%26x', 'methods=DELETE']) {
    const r = await rawRequest(s.sidecar.port, form(body))
    seen.push(r.raw)
    t.equal(r.status, 200, `${body}: forwarded`)
    t.match(upstream.requests.at(-1), { method: 'POST', body, headers: { authorization: `Bearer ${CANARY}`, 'content-length': String(body.length) } }, `${body}: the body as sent`)
  }
  const viaChunks = await rawRequest(s.sidecar.port, chunked('a=1&b=2'))
  t.equal(viaChunks.status, 200)
  t.match(upstream.requests.at(-1), { body: 'a=1&b=2', headers: { 'transfer-encoding': 'chunked' } }, 'a chunked form streams on as it came')
  // Nothing is held to be checked: `curl --data-binary` calls any upload a form.
  const upload = 'a=' + 'x'.repeat(4 * 1024 * 1024)
  const big = await rawRequest(s.sidecar.port, form(upload))
  t.equal(big.status, 200, 'a form of any size streams, checked as it goes')
  t.equal(upstream.requests.at(-1)?.body.length, upload.length, 'whole')
  const before = upstream.requests.length
  const late = await rawRequest(s.sidecar.port, form(upload + '&_method=DELETE'))
  t.equal(late.status, 403, 'an override after 4 MiB is judged as well')
  t.equal(upstream.requests.length, before, 'and that form never reached the upstream whole')
  const audit = await s.audit()
  t.match(audit.find((e) => e.status === 403), { method: 'POST', decision: 'deny', rule: 'no-delete', bytes_in: 0 })
  // The trail says which method the framework acted on: an allowed override was a plain POST in it
  // (`latchkey audit | grep DELETE` found nothing), and a refused one a POST denied by a DELETE rule.
  t.equal(audit.find((e) => e.status === 403)?.method, 'POST;_method=DELETE', 'the refused override is recorded with the method')
  t.same(audit.filter((e) => e.status === 200).map((e) => e.method), ['POST;_method=PUT', 'POST', 'POST', 'POST', 'POST'], 'so is an allowed one; a form naming none is a POST')
  assertNoCanary(t, s, ...seen)
})

t.test('a method override in a POSTed JSON body is judged as the method it names, as the body streams past', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-delete', action: 'deny', hosts: ['127.0.0.1'], methods: ['DELETE'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const json = (body: string, type = 'application/json') =>
    `POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: ${type}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`
  const chunked = (parts: string[]) =>
    `POST /up/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${parts.map((p) => `${p.length.toString(16)}\r\n${p}\r\n`).join('')}0\r\n\r\n`
  const seen: string[] = []
  // Each is DELETE to Laravel, whose input is the decoded JSON of any Content-Type with `/json` or `+json`.
  await refusedByNoDelete(t, s.sidecar.port, seen, [
    ['a top-level key', json('{"_method":"DELETE"}')],
    ['after other keys, lower case', json('{"a":1,"b":{"c":[1,2,{"d":"}"}]},"_method":"delete"}')],
    ['an escaped key', json('{"\\u005fmethod":"DELETE"}')],
    ['an escaped value, the key in capitals', json('{"_METHOD":"\\u0044ELETE"}')],
    ['white space everywhere', json(' \r\n{ "_method" :\t"DELETE" }\n')],
    ['a byte-order mark', json('\ufeff{"_method":"DELETE"}')],
    ['a charset parameter', json('{"_method":"DELETE"}', 'application/json; charset=utf-8')],
    ['a +json media type', json('{"_method":"DELETE"}', 'application/vnd.api+json')],
    ['a media type in capitals', json('{"_method":"DELETE"}', 'Application/JSON')],
    ['the second of two', json('{"_method":"PUT","_method":"DELETE"}')],
    // Express's method-override takes an array's first value.
    ['in an array', json('{"_method":["DELETE"]}')],
    ['the second in an array', json('{"_method":["PUT" , "delete"]}')],
    ['after 2 MB of prompt', json(`{"prompt":"${'x'.repeat(2 * 1024 * 1024)}","_method":"DELETE"}`)],
    ['chunked, on a route, cut inside the key and the value', chunked(['{"_me', 'thod":"DEL', 'ETE"}'])],
  ])
  t.equal(upstream.requests.length, 0, 'no whole request reached the upstream')
  const badly = await rawRequest(s.sidecar.port, json('{"_method":"DE LETE"}'))
  t.equal(badly.status, 400, 'an override that is no method token is refused, not guessed at')
  t.match(JSON.parse(badly.body).reason, /JSON body carries a method override \(_method\) that is not one method token/)
  for (const body of ['{"_method":{"m":"DELETE"}}', '{"_method":[["DELETE"]]}', '{"_method":["PUT",{"m":"DELETE"}]}']) {
    const r = await rawRequest(s.sidecar.port, json(body))
    t.equal(r.status, 400, `${body}: an override no framework should read as a method, refused`)
    t.match(JSON.parse(r.body).reason, /JSON body carries a method override \(_method\) that is not one method token/)
  }
  // What the scan cannot read as the upstream will is refused before anything goes: Express's
  // body-parser inflates a gzip body and reads JSON in UTF-16; Tomcat reads a form in EBCDIC.
  const raw = (type: string, body: Buffer, extra = '') =>
    Buffer.concat([Buffer.from(`POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: ${type}\r\n${extra}Content-Length: ${body.length}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n`), body])
  for (const [name, request, reason] of [
    ['a gzip JSON body', raw('application/json', gzipSync('{"_method":"DELETE"}'), 'Content-Encoding: gzip\r\n'), /compressed body \(Content-Encoding\)/],
    ['a deflate form', raw('application/x-www-form-urlencoded', deflateSync('_method=DELETE'), 'Content-Encoding: deflate\r\n'), /compressed body/],
    ['JSON in UTF-16', raw('application/json; charset=utf-16le', Buffer.from('{"_method":"DELETE"}', 'utf16le')), /charset "utf-16le" .* send it in UTF-8/],
    ['a form in EBCDIC', raw('application/x-www-form-urlencoded; charset=IBM037', Buffer.from('%6D%94%85%A3%88%96%84=%C4%C5%D3%C5%E3%C5')), /charset "IBM037"/],
  ] as const) {
    const r = await rawRequest(s.sidecar.port, request)
    seen.push(r.raw)
    t.match(r.raw, /^HTTP\/1\.1 400 /, `${name}: refused, before any 100`)
    t.match(JSON.parse(r.body).reason, reason, `${name}: saying why`)
  }
  t.equal(upstream.requests.length, 0, 'none of them reached the upstream')
  // Overrides the policy allows, or none at the top level, go on intact, credential injected.
  const utf8 = await rawRequest(s.sidecar.port, json('{"_method":"PUT"}', 'application/json; charset="UTF-8"'))
  t.equal(utf8.status, 200, 'JSON that says it is UTF-8 is read as such')
  for (const body of ['{"_method":"PUT","a":1}', '{"data":{"_method":"DELETE"}}', '[{"_method":"DELETE"}]', '{"note":"\\"_method\\":\\"DELETE\\""}', '{"_method":["PUT"],"a":[{"b":["DELETE"]}]}', '{"methods":"DELETE"}', '"_method"']) {
    const r = await rawRequest(s.sidecar.port, json(body))
    seen.push(r.raw)
    t.equal(r.status, 200, `${body}: forwarded`)
    t.match(upstream.requests.at(-1), { method: 'POST', body, headers: { authorization: `Bearer ${CANARY}` } }, `${body}: the body as sent`)
  }
  const viaChunks = await rawRequest(s.sidecar.port, chunked(['{"a":', '"_method"}']))
  t.equal(viaChunks.status, 200, 'a value that reads "_method" is no key')
  t.equal(upstream.requests.at(-1)?.body, '{"a":"_method"}', 'a chunked body streams on intact')
  const audit = await s.audit()
  t.match(audit.find((e) => e.status === 403), { method: 'POST', decision: 'deny', rule: 'no-delete', error: 'LK_POLICY_DENIED' })
  assertNoCanary(t, s, ...seen)
})

t.test('a method override in a POSTed multipart form is judged as the method it names, as the body streams past', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-delete', action: 'deny', hosts: ['127.0.0.1'], methods: ['DELETE'] }, (up) => ({
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  }))
  const multipart = (body: string, type = 'multipart/form-data; boundary=b') =>
    `POST http://${host}/items/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: ${type}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`
  const field = (name: string, value: string) => `--b\r\nContent-Disposition: form-data; name=${name}\r\n\r\n${value}\r\n`
  const upload = `--b\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\nContent-Type: application/octet-stream\r\n\r\n${'u'.repeat(2 * 1024 * 1024)}\r\n`
  const seen: string[] = []
  // Each is DELETE to Rails (Rack::MethodOverride), PHP (Symfony, Laravel) or Spring.
  await refusedByNoDelete(t, s.sidecar.port, seen, [
    ['a field', multipart(field('"_method"', 'DELETE') + '--b--\r\n')],
    ['after a 2 MB upload, lower case', multipart(upload + field('"_method"', 'delete') + '--b--\r\n')],
    ['unquoted, the name in capitals', multipart(field('_METHOD', 'DELETE') + '--b--')],
    ["PHP's mangling of a name", multipart(field('".method"', 'DELETE') + '--b--')],
    ['LF line endings', multipart('--b\nContent-Disposition: form-data; name="_method"\n\nDELETE\n--b--\n')],
    ['a folded header', multipart('--b\r\nContent-Disposition: form-data;\r\n name="_method"\r\n\r\nDELETE\r\n--b--')],
    ['no closing boundary', multipart('--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE')],
    ['multipart/mixed', multipart(field('"_method"', 'DELETE') + '--b--', 'multipart/mixed; boundary=b')],
    ['two Content-Dispositions, the first naming it', multipart('--b\r\nContent-Disposition: form-data; name="_method"\r\nContent-Disposition: form-data; name="x"\r\n\r\nDELETE\r\n--b--\r\n')],
    ['a header line PHP joins to the one before', multipart('--b\r\nContent-Disposition: form-data; na\r\nme="_method"\r\n\r\nDELETE\r\n--b--\r\n')],
    ["Rack's Content-ID", multipart('--b\r\nContent-ID: _method\r\n\r\nDELETE\r\n--b--\r\n')],
    ['a name in brackets', multipart(field('"[_method]"', 'DELETE') + '--b--')],
  ])
  // A chunked form whose end comes after its last bytes: judged at the end, the end never sent on.
  const socket = connect(s.sidecar.port, '127.0.0.1')
  await once(socket, 'connect')
  const body = '--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE'
  socket.write(`POST /up/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n`)
  await new Promise((resolve) => setTimeout(resolve, 150))
  const answer: Buffer[] = []
  socket.on('data', (c: Buffer) => answer.push(c))
  socket.write('0\r\n\r\n')
  await once(socket, 'close')
  t.match(Buffer.concat(answer).toString(), /^HTTP\/1\.1 403 [^]*x-latchkey-rule: no-delete/, 'a chunked form ending later: refused at its end')
  t.equal(upstream.requests.length, 0, 'no whole request reached the upstream')
  const badly = await rawRequest(s.sidecar.port, multipart(field('"_method"', 'DE LETE') + '--b--'))
  t.equal(badly.status, 400, 'an override that is no method token is refused, not guessed at')
  t.match(JSON.parse(badly.body).reason, /multipart form carries a method override \(_method\) that is not one method token/)
  for (const form of [field('"_method"', 'PUT') + '--b--\r\n', upload + field('"methods"', 'DELETE') + field('"x"; filename="_method"', 'DELETE') + '--b--\r\n']) {
    const r = await rawRequest(s.sidecar.port, multipart(form))
    seen.push(r.raw)
    t.equal(r.status, 200, `${form.slice(0, 60)}: forwarded`)
    t.equal(upstream.requests.at(-1)?.body, form, 'the body as sent')
    t.equal(upstream.requests.at(-1)?.headers.authorization, `Bearer ${CANARY}`, 'the credential injected')
  }
  const audit = await s.audit()
  t.match(audit.find((e) => e.status === 403 && e.via === 'reverse'), { method: 'POST', decision: 'deny', rule: 'no-delete', error: 'LK_POLICY_DENIED' })
  assertNoCanary(t, s, ...seen)
})

t.test('a form override naming a method beyond the usual ones is judged when a rule names that method', async (t) => {
  // Symfony takes any upper-case token as `_method`, Rack LINK and UNLINK too: a deny of a
  // WebDAV method holds against a POST that names it.
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-dav', action: 'deny', hosts: ['127.0.0.1'], methods: ['PROPFIND', 'LINK'] })
  const form = (body: string) =>
    `POST http://${host}/files/1 HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`
  for (const body of ['_method=PROPFIND', 'a=1&_method=link']) {
    const r = await rawRequest(s.sidecar.port, form(body))
    t.equal(r.status, 403, `${body}: refused`)
    t.equal(r.headers['x-latchkey-rule'], 'no-dav', `${body}: by the rule on that method`)
  }
  t.equal((await rawRequest(s.sidecar.port, form('_method=PUT'))).status, 200, 'an override no rule names passes')
  t.same(upstream.requests.map((r) => r.body), ['_method=PUT'], 'only it reached the upstream')
})

t.test('where the method does not matter, a form is streamed as it comes, never read first, and a JSON body never scanned', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'any-method', action: 'allow', hosts: ['127.0.0.1'], ports: [upstream.port] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const host = `127.0.0.1:${upstream.port}`
  // Over the checked size: refused if it were read first.
  const body = 'a=' + 'x'.repeat(1024 * 1024) + '&_method=DELETE'
  const r = await rawRequest(s.sidecar.port, `POST http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`)
  t.equal(r.status, 200)
  t.equal(upstream.requests.at(-1)?.body.length, body.length)
  const json = `{"_method":"DELETE","a":"${'x'.repeat(1024 * 1024)}"}`
  const j = await rawRequest(s.sidecar.port, `POST http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/json\r\nContent-Length: ${json.length}\r\nConnection: close\r\n\r\n${json}`)
  t.equal(j.status, 200, 'nor is a JSON body scanned')
  t.equal(upstream.requests.at(-1)?.body, json)
})

t.test('a method override in the query never reaches the upstream: the request line is the method policy judged', async (t) => {
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-delete', action: 'deny', hosts: ['127.0.0.1'], methods: ['DELETE'] })
  const post = (target: string) => `POST ${target} HTTP/1.1\r\nHost: ${target.startsWith('/') ? '127.0.0.1' : host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`
  const entries: [string, (pathAndQuery: string) => string][] = [
    ['absolute-form', (q) => post(`http://${host}${q}`)],
    ['reverse route', (q) => post(`/up${q}`)],
    ['inside a plaintext tunnel', (q) => `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n` + post(q)],
  ]
  // Each is `_method` to Symfony/Laravel (PHP reads `.` and ` ` in a name as `_`) or Express's method-override.
  const overrides = ['_method=DELETE', '_METHOD=delete', '%5Fmethod=DELETE', '_meth%6Fd=DELETE', '.method=DELETE', '%20_method=DELETE', '_method[]=DELETE',
    // Cut at the NUL by PHP, and not valid percent-encoded UTF-8 after it (PHP decodes byte by byte).
    '_method%00%ff=DELETE', '_method%00%=DELETE', '%5Fmethod%00%zz=DELETE', '.method%00%c0=DELETE',
    // Escapes of capitals: the look for "method" once missed them.
    '_%4DETHOD=DELETE', '%5F%4D%45%54%48%4F%44=DELETE',
    // Salesforce's REST API: a POST with `?_HttpMethod=DELETE` deletes the record (it went on untouched).
    '_HttpMethod=DELETE', '_httpmethod=DELETE', '%5FHttp%4Dethod=DELETE', '_HTTPMETHOD=delete']
  // What Symfony's getMethod() would read as `_method` (PHP's name mangling: cut at a NUL or `[`), or Salesforce as `_HttpMethod`, were it sent.
  const readsAsOverride = (url: string) =>
    [...new URL(url, 'http://base').searchParams.keys()].some((k) => ['_method', '_httpmethod'].includes(k.toLowerCase().replace(/\0.*$/s, '').replace(/^ +/, '').replace(/\[.*$/, '').replace(/[ .]/g, '_')))
  for (const [entry, request] of entries) {
    for (const override of overrides) {
      t.ok(readsAsOverride(`/x?${override}`), `${override} is an override to a framework`)
      const r = await rawRequest(s.sidecar.port, request(`/x?a=1&${override}&b=2`))
      t.match(r.raw, /HTTP\/1\.1 200 OK/, `${entry} ${override}: forwarded as the POST it is`)
      const got = upstream.requests.at(-1)!
      t.equal(got.method, 'POST')
      t.notOk(readsAsOverride(got.url), `${entry} ${override}: the override did not reach the upstream (${got.url})`)
      t.same(new URL(got.url, 'http://base').searchParams.getAll('a').concat(new URL(got.url, 'http://base').searchParams.getAll('b')), ['1', '2'], `${entry}: other parameters kept`)
    }
  }
  t.equal(upstream.requests.length, entries.length * overrides.length)
  const denied = await rawRequest(s.sidecar.port, `DELETE http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)
  t.equal(denied.headers['x-latchkey-rule'], 'no-delete', 'the DELETE itself is denied')
  const kept = await rawRequest(s.sidecar.port, post(`http://${host}/x?methods=a&100%=b`))
  t.equal(upstream.requests.at(-1)?.url, '/x?methods=a&100%=b', 'names that are not an override, undecodable ones included, pass untouched')
  t.equal(kept.status, 200)
})

t.test('a host name with an empty label is refused, not judged as another name than DNS reads', async (t) => {
  const upstream = await startUpstream()
  const fragment = {
    policy: { default: 'allow', rules: [{ id: 'no-blocked', action: 'deny', hosts: ['blocked.test', '*.blocked.test'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
  }
  // This machine has no DNS: every name is answered 127.0.0.1 (the upstream), as a resolver that
  // reads `blocked.test.` as the fully qualified `blocked.test` would answer it.
  const network = compileNetworkPolicy(validateConfig({ version: 1, ...fragment }).network)
  const resolver = new DnsResolver(network, { cacheMs: 0, lookup: async () => [{ address: '127.0.0.1', family: 4 }] })
  const s = await startTestSidecar(fragment, {}, { resolver })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const p = upstream.port
  t.equal((await rawRequest(s.sidecar.port, `GET http://blocked.test.:${p}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)).headers['x-latchkey-rule'], 'no-blocked', 'one trailing dot: the same name, denied')
  for (const host of ['blocked.test..', 'BLOCKED.test...', 'a.blocked.test..', 'blocked..test', '.blocked.test']) {
    for (const [form, request] of [
      ['absolute-form', `GET http://${host}:${p}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`],
      ['CONNECT', `CONNECT ${host}:${p} HTTP/1.1\r\nHost: ${host}:${p}\r\n\r\n`],
    ]) {
      const r = await rawRequest(s.sidecar.port, request!)
      t.equal(r.status, 400, `${form} ${host}: 400`)
      t.match(r.body, /"reason":"[^"]*empty label/, `${form} ${host}: says why`)
    }
  }
  t.equal(upstream.requests.length, 0, 'no request for a blocked name reached the upstream')
  t.notOk((await s.audit()).some((e) => e.decision === 'allow'), 'none was judged allowed')
})

t.test('a deny by address holds a name whatever the order of its answer', async (t) => {
  // Round-robin DNS reorders an answer from one lookup to the next: only the first address was
  // judged, so a name with 10.1.2.3 second passed a deny of 10.0.0.0/8 (host-policy probe).
  const upstream = await startUpstream()
  const fragment = {
    policy: { default: 'allow', rules: [{ id: 'deny-ten', action: 'deny', cidrs: ['10.0.0.0/8'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }, { cidr: '10.0.0.0/8' }] },
  }
  const answers: Record<string, string[]> = { 'mixed.test': ['127.0.0.1', '10.1.2.3'], 'mapped.test': ['127.0.0.1', '::ffff:a01:203'], 'plain.test': ['127.0.0.1'] }
  const network = compileNetworkPolicy(validateConfig({ version: 1, ...fragment }).network)
  const resolver = new DnsResolver(network, { cacheMs: 0, lookup: async (host) => (answers[host] ?? []).map((address) => ({ address, family: address.includes(':') ? 6 : 4 })) })
  const s = await startTestSidecar(fragment, {}, { resolver })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const p = upstream.port
  for (const host of ['mixed.test', 'mapped.test']) {
    for (const [form, request] of [
      ['absolute-form', `GET http://${host}:${p}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`],
      ['CONNECT', `CONNECT ${host}:${p} HTTP/1.1\r\nHost: ${host}:${p}\r\n\r\n`],
    ]) {
      const r = await rawRequest(s.sidecar.port, request!)
      t.equal(r.headers['x-latchkey-rule'], 'deny-ten', `${form} ${host}: denied by the range its second address is in`)
    }
  }
  t.equal(upstream.requests.length, 0, 'nothing reached the upstream at the first address')
  t.equal((await rawRequest(s.sidecar.port, `GET http://plain.test:${p}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)).status, 200, 'a name outside the range passes')
})

t.test('a request line full of dots is judged like any other', async (t) => {
  // `/admin....../x` is /admin/x to a server that drops a segment's trailing dots. Such runs are
  // trimmed in one pass now (a 16 KB run used to hold the event loop 0.6 s: see test/policy.test.ts).
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'allow', rules: [{ id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const run = '.'.repeat(15_000)
  const get = (path: string) => rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal((await get(`/admin${run}/x`)).headers['x-latchkey-rule'], 'no-admin', 'a run ending a segment is trimmed')
  t.equal((await get(`/admin${run}x/y`)).status, 200, 'a run inside a segment is part of its name')
  t.same(upstream.requests.map((r) => r.url.length), [`/admin${run}x/y`.length])
})

t.test('a path built against a glob\'s wildcards is decided, and other calls are not kept waiting', async (t) => {
  // allow /files/*.*.* once spent 20 s of the event loop on /files/a.a.a…/ (8 KB), trying every
  // way to share its dots among the stars, and every other call waited. Globs are matched in
  // time linear in the path now (see test/policy.test.ts).
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: {
      default: 'deny',
      rules: [
        { id: 'no-key-deletes', action: 'deny', hosts: ['127.0.0.1'], paths: ['/**/users/**/keys/**/delete'] },
        { id: 'files', action: 'allow', hosts: ['127.0.0.1'], paths: ['/files/*.*.*', '/ok'] },
      ],
    },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const get = (path: string) => rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  const hostile = [get(`/files/${'a.'.repeat(7_500)}/`), get(`/${'users/keys/'.repeat(1_350)}`)]
  await sleep(20)
  const started = performance.now()
  const ok = await get('/ok')
  const waited = performance.now() - started
  t.equal(ok.status, 200, 'a call made meanwhile passes')
  t.ok(waited < 1000, `without waiting on them: answered in ${waited.toFixed(0)} ms`)
  const [files, keys] = await Promise.all(hostile)
  t.equal(files!.headers['x-latchkey-rule'], 'default', '/files/a.a.…/ is decided: no file name, so nothing allows it')
  t.equal(keys!.headers['x-latchkey-rule'], 'default', '/users/keys/… is decided: no delete in it, so the deny passes it by')
  t.equal((await get(`/files/${'a.'.repeat(7_500)}a`)).status, 200, 'and a file name with dots in it is allowed')
  t.equal((await get(`/${'users/keys/'.repeat(1_350)}delete`)).headers['x-latchkey-rule'], 'no-key-deletes', 'a key deletion under it is denied')
})

t.test('a deny of GET holds HEAD, which frameworks answer with the GET handler', async (t) => {
  // Express, Flask, Django and Rails route HEAD to the GET handler: it runs (side effects and
  // all) and its headers (Content-Length, X-Total-Count, ETag) come back, only the body does not.
  const { upstream, s, host } = await denyingSidecar(t, { id: 'no-reports', action: 'deny', hosts: ['127.0.0.1'], methods: ['GET'], paths: ['/reports/**'] })
  for (const [entry, request] of [
    ['absolute-form', (m: string, p: string) => `${m} http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`],
    ['reverse route', (m: string, p: string) => `${m} /up${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
  ] as const) {
    for (const method of ['GET', 'HEAD']) {
      const r = await rawRequest(s.sidecar.port, request(method, '/reports/2026'))
      t.equal(r.headers['x-latchkey-rule'], 'no-reports', `${entry} ${method} /reports/2026: denied`)
    }
    t.equal((await rawRequest(s.sidecar.port, request('HEAD', '/other'))).status, 200, `${entry}: HEAD elsewhere passes`)
  }
  t.same(upstream.requests.map((r) => `${r.method} ${r.url}`), ['HEAD /other', 'HEAD /other'], 'no request for /reports reached the upstream')
})
