// Upstreams that echo: the agent must not get its injected credential back through them.
import t from 'tap'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

t.test('TRACE/TRACK refused; reflected credentials scrubbed from response headers', async (t) => {
  const echo = await startUpstream({
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      res.writeHead(302, { location: `https://elsewhere.example/cb?seen=${encodeURIComponent(auth.slice(7))}`, 'x-debug-auth': auth, 'x-plain': 'kept' }).end()
      return true
    },
  })
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [echo.port] }] },
    credentials: [{ id: 'echo', audience: echo.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await echo.close()
  })
  const bodies: string[] = []
  for (const method of ['TRACE', 'TRACK']) {
    const r = await rawRequest(s.sidecar.port, `${method} http://127.0.0.1:${echo.port}/ HTTP/1.1\r\nHost: x\r\n\r\n`)
    bodies.push(r.raw)
    t.equal(r.status, 400, method)
    // TRACE reaches the pipeline and is refused by name; Node's parser already rejects TRACK.
    t.match(JSON.parse(r.body).reason, method === 'TRACE' ? /would echo the request/ : /HPE_INVALID_METHOD/)
  }
  t.equal(echo.requests.length, 0, 'no TRACE reached the upstream')

  const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${echo.port}/r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  bodies.push(r.raw)
  t.equal(r.status, 302)
  t.equal(echo.requests[0]?.headers.authorization, `Bearer ${CANARY}`, 'the upstream did get the credential')
  t.equal(r.headers.location, `https://elsewhere.example/cb?seen=${'*'.repeat(CANARY.length)}`, 'a URL is masked where the credential is, and stays a URL')
  t.equal(r.headers['x-debug-auth'], '[removed by latchkey: it contained the injected credential]')
  t.equal(r.headers['x-plain'], 'kept')
  assertNoCanary(t, s, ...bodies)
})

t.test('a malformed Proxy-Authorization is refused with 407; a missing Host with 400', async (t) => {
  const up = await startUpstream()
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [up.port] }] } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const bad = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Negotiate\r\nConnection: close\r\n\r\n`)
  t.equal(bad.status, 407)
  t.equal(bad.headers['proxy-authenticate'], 'Basic realm="latchkey"')
  t.equal(JSON.parse(bad.body).code, 'LK_PROXY_AUTH')
  const unknown = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic dGFzazo=\r\nConnection: close\r\n\r\n`)
  t.equal(unknown.status, 407, 'a handle of no open task is refused, not ignored')
  t.match(JSON.parse(unknown.body).reason, /no open task/)
  const task = s.sidecar.tasks.open({ purpose: 'test', durationS: 60 })
  const basic = Buffer.from(`task:${task.handle}`).toString('base64')
  const ok = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic ${basic}\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200)
  t.equal(up.requests[0]?.headers['proxy-authorization'], undefined, 'consumed, never forwarded')
  const noHost = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n`)
  t.equal(noHost.status, 400)
  t.equal(up.requests.length, 1)
})

t.test('every reflection of the credential in a response head is scrubbed, in any encoding', async (t) => {
  // A secret whose encodings differ: percent-encoding, form encoding and base64 all change it.
  // ...and one that holds an escape itself (%25), which the unescaping rounds must not lose.
  const QSECRET = `${CANARY}/a+b=c d!~ä%25`
  const reflect = (req: { url: string; headers: Record<string, unknown> }, res: import('node:http').ServerResponse): boolean => {
    const auth = String(req.headers.authorization ?? '')
    const url = new URL(req.url, 'http://x')
    const key = url.searchParams.get('key') ?? ''
    switch (url.pathname) {
      case '/reason':
        res.writeHead(200, `OK ${auth}`, { 'x-plain': 'kept' }).end('ok')
        return true
      case '/name':
        res.writeHead(200, { [`x-${auth.slice(7).toLowerCase()}`]: '1', 'x-plain': 'kept' }).end('ok')
        return true
      case '/name-pct': {
        const secret = auth.slice(7)
        res.writeHead(200, { [`x-${[...secret].map((c) => '%' + c.charCodeAt(0).toString(16).toUpperCase()).join('')}`]: '1', 'x-plain': 'kept' }).end('ok')
        return true
      }
      case '/utf8':
        // The decoded secret echoed as UTF-8 bytes: a header carries one byte per character.
        res.writeHead(200, { 'x-utf8': Buffer.from(key).toString('latin1'), 'x-plain': 'kept' }).end('ok')
        return true
      case '/cookies':
        res.writeHead(200, { 'set-cookie': ['session=abc', `token=${auth.slice(7)}`, 'theme=dark'] }).end('ok')
        return true
      case '/basic':
        res.writeHead(200, { 'x-echo': auth, 'x-echo-b64': auth.slice(6) }).end('ok')
        return true
      case '/query':
        res.writeHead(200, {
          'x-form': new URLSearchParams({ key }).toString(),
          'x-lower-hex': encodeURIComponent(key).replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()),
          'x-twice': encodeURIComponent(encodeURIComponent(key)),
          'x-plus': key.replace(/ /g, '+'),
          'x-plain': 'kept',
        }).end('ok')
        return true
      case '/wire': {
        // The URL as the upstream got it (the secret percent-encoded), encoded again: a login
        // link's `next=`, an OAuth `state`, a debug header. Each is one step from what it received.
        const b64 = Buffer.from(req.url).toString('base64')
        const body = `<a href="/login?next=${encodeURIComponent(req.url)}">log in</a> ${b64} ${Buffer.from(req.url).toString('hex')}`
        res.writeHead(200, {
          'content-length': Buffer.byteLength(body),
          'x-url-b64': b64,
          'x-url-hex': Buffer.from(req.url).toString('hex'),
          'x-url-twice': encodeURIComponent(req.url),
          'set-cookie': `state=${Buffer.from(req.url).toString('base64url')}`,
          'x-plain': 'kept',
        }).end(body)
        return true
      }
      case '/escaped': {
        // What echoes do to text: JSON and HTML escaping, encoding three times over, base64 and hex.
        const basic = auth.startsWith('Basic ')
        const secret = key || (basic ? Buffer.from(auth.slice(6), 'base64').toString().split(':')[1]! : auth.slice(7))
        const b64 = (x: string) => Buffer.from(x).toString('base64')
        res.writeHead(200, {
          'x-json': JSON.stringify({ seen: secret }).replace(/\//g, '\\/'),
          'x-json-u': secret.replace(/[/+= !~]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0')),
          'x-html': secret.replace(/[/+= !~&]/g, (c) => `&#x${c.charCodeAt(0).toString(16)};`),
          'x-thrice': encodeURIComponent(encodeURIComponent(encodeURIComponent(secret))),
          'x-b64': b64(secret),
          'x-b64url': Buffer.from(secret).toString('base64url'),
          'x-b64-unpadded': b64(secret).replace(/=+$/, ''),
          'x-hex': Buffer.from(secret).toString('hex'),
          // Java's printHexBinary, .NET's Convert.ToHexString, Go's %X, Python's .hex().upper().
          'x-hex-upper': Buffer.from(secret).toString('hex').toUpperCase(),
          ...(basic ? { 'x-basic-url': Buffer.from(`svc:${secret}`).toString('base64url') } : {}),
          // Base64 of longer text that holds it, at each of the three places in a 3-byte group:
          // the header as sent, and session cookies (Flask's is base64url of JSON).
          'x-b64-header': b64(auth || `key=${secret}`),
          'x-b64-at-1': b64(`{"a":${JSON.stringify(secret)}}`),
          'x-b64url-at-2': Buffer.from(`{"ab":${JSON.stringify(secret)},"n":1}`).toString('base64url'),
          'x-b64-at-3': b64(`{"abc":${JSON.stringify(secret)}}`),
          'x-plain': 'kept',
        }).end('ok')
        return true
      }
      case '/tabbed': {
        // A tab inside the echoed secret hides it from the scrub; the URL parser, which resolves a
        // route's Location, drops tabs.
        const secret = auth.slice(7)
        res.writeHead(302, { location: `/next?k=${secret.slice(0, 4)}\t${secret.slice(4)}` }).end()
        return true
      }
      case '/hints':
        res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style', 'x-echo': auth })
        setTimeout(() => res.writeHead(200, { 'x-plain': 'kept' }).end('ok'), 20)
        return true
    }
    return false
  }
  const bearer = await startUpstream({ handler: reflect })
  const basic = await startUpstream({ handler: reflect })
  const query = await startUpstream({ handler: reflect })
  const s = await startTestSidecar(
    {
      policy: { default: 'allow' },
      network: { allow: [{ cidr: '127.0.0.1/32', ports: [bearer.port, basic.port, query.port] }] },
      routes: { echo: bearer.origin },
      credentials: [
        { id: 'bearer', audience: bearer.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
        { id: 'basic', audience: basic.origin, source: 'static', secret: 'CANARY', inject: { type: 'basic', username: 'svc' } },
        { id: 'query', audience: query.origin, source: 'static', secret: 'QKEY', inject: { type: 'query', name: 'key' } },
      ],
    },
    { LATCHKEY_SECRET_QKEY: QSECRET },
  )
  t.teardown(async () => {
    await s.close()
    await Promise.all([bearer.close(), basic.close(), query.close()])
  })
  const get = (port: number, path: string) => rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  const REMOVED = '[removed by latchkey: it contained the injected credential]'
  const seen: string[] = []

  const reason = await get(bearer.port, '/reason')
  seen.push(reason.raw)
  t.match(reason.raw, /^HTTP\/1\.1 200 OK\r\n/, 'a reason phrase carrying the credential is replaced by the standard one')
  t.equal(reason.headers['x-plain'], 'kept')

  const name = await get(bearer.port, '/name')
  seen.push(name.raw)
  t.equal(name.status, 200)
  t.notOk(Object.keys(name.headers).some((h) => h.includes(CANARY.toLowerCase())), 'a header named after the credential is dropped')
  t.equal(name.headers['x-plain'], 'kept')

  const namePct = await get(bearer.port, '/name-pct')
  seen.push(namePct.raw)
  t.same(Object.keys(namePct.headers).filter((h) => h.startsWith('x-')), ['x-plain'], 'a header named after the credential in upper-case percent-encoding is dropped')

  const utf8 = await get(query.port, '/utf8?a=1')
  seen.push(utf8.raw)
  t.equal(utf8.headers['x-utf8'], REMOVED, 'a secret beyond ASCII echoed as its UTF-8 bytes is recognised')

  const cookies = await get(bearer.port, '/cookies')
  seen.push(cookies.raw)
  const setCookies = cookies.raw.split('\r\n').filter((l) => l.toLowerCase().startsWith('set-cookie:'))
  t.same(setCookies, ['set-cookie: session=abc', `set-cookie: ${REMOVED}`, 'set-cookie: theme=dark'], 'only the cookie that carries it is replaced')

  const b = await get(basic.port, '/basic')
  seen.push(b.raw)
  t.equal(basic.requests[0]?.headers.authorization, `Basic ${Buffer.from(`svc:${CANARY}`).toString('base64')}`, 'the upstream got the basic credential')
  t.equal(b.headers['x-echo'], REMOVED, 'the Basic header echoed back')
  t.equal(b.headers['x-echo-b64'], REMOVED, 'its base64 alone')

  const q = await get(query.port, '/query?a=1')
  seen.push(q.raw)
  t.equal(new URL(query.requests[0]!.url, 'http://x').searchParams.get('key'), QSECRET, 'the upstream got the query credential')
  for (const h of ['x-form', 'x-lower-hex', 'x-twice', 'x-plus']) t.equal(q.headers[h], REMOVED, `${h}: a re-encoding of the secret is recognised`)
  t.equal(q.headers['x-plain'], 'kept')

  const wire = await get(query.port, '/wire?a=1')
  seen.push(wire.raw)
  const sent = query.requests.at(-1)!.url
  t.ok(sent.includes(encodeURIComponent(QSECRET)), 'the upstream got the secret percent-encoded')
  for (const h of ['x-url-b64', 'x-url-hex', 'x-url-twice', 'set-cookie']) t.equal(wire.headers[h], REMOVED, `${h}: the URL as sent, encoded again, is recognised`)
  t.equal(wire.headers['x-plain'], 'kept')
  t.match(wire.body, /^<a href="\/login\?next=/, 'the body is relayed')
  for (const [what, form] of [
    ['percent-encoded again', encodeURIComponent(encodeURIComponent(QSECRET))],
    ['base64', Buffer.from(sent).toString('base64').slice(8, -8)],
    ['hex', Buffer.from(encodeURIComponent(QSECRET)).toString('hex')],
  ]) {
    t.notOk(wire.body.includes(form!), `the body holds no ${what} copy of the URL as sent`)
  }

  for (const [upstream, path, what] of [
    [query, '/escaped?a=1', 'query'],
    [bearer, '/escaped', 'bearer'],
    [basic, '/escaped', 'basic'],
  ] as const) {
    const e = await get(upstream.port, path)
    seen.push(e.raw)
    for (const h of ['x-json', 'x-json-u', 'x-html', 'x-thrice', 'x-b64', 'x-b64url', 'x-b64-unpadded', 'x-b64-header', 'x-b64-at-1', 'x-b64url-at-2', 'x-b64-at-3', 'x-hex', 'x-hex-upper', ...(what === 'basic' ? ['x-basic-url'] : [])]) {
      t.equal(e.headers[h], REMOVED, `${what}: ${h} recognised`)
    }
    t.equal(e.headers['x-plain'], 'kept', `${what}: unrelated headers kept`)
  }

  const tabbed = await rawRequest(s.sidecar.port, `GET /echo/tabbed HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  seen.push(tabbed.raw)
  t.equal(tabbed.status, 302)
  t.equal(tabbed.headers.location, `/echo/next?k=${'*'.repeat(CANARY.length)}`, "a route's Location is scrubbed as it is relayed, after the URL parser has reshaped it (its tab dropped, the credential whole, then masked)")

  const hints = await get(bearer.port, '/hints')
  seen.push(hints.raw)
  t.match(hints.raw, /^HTTP\/1\.1 200 OK\r\n/, 'the hint that echoed the credential is not relayed; the final response is')
  const audit = await s.audit()
  t.match(audit.find((e) => e.path === '/hints'), { status: 200, error: null }, 'an interim response does not break the call')
  assertNoCanary(t, s, ...seen)
  t.notOk(seen.some((r) => r.includes(Buffer.from(`svc:${CANARY}`).toString('base64'))), 'no base64 form reached the agent')
})
