// What Node's fetch, and so every SDK built on it (OpenAI's, Anthropic's: a base URL on a route,
// or HTTP_PROXY through undici's EnvHttpProxyAgent), reads of a refusal about the agent's task.
// fetch turns any 407 into a network error (Fetch §4.5, no browser window): the SDK said
// "Connection error." and retried, never reading the reason or `x-should-retry`.
import t from 'tap'
import { once } from 'node:events'
import { Client, EnvHttpProxyAgent, fetch as undiciFetch } from 'undici'
import { startBearerRig, rawRequest, parseRawResponse, assertNoCanary, openTask, CANARY } from '../helpers/harness.js'

/** The head the OpenAI SDK (6.x, on Node's fetch) sends for a chat completion, its placeholder key included. */
const SDK_HEADERS = {
  accept: 'application/json',
  'content-type': 'application/json',
  'user-agent': 'OpenAI/JS 6.49.0',
  'x-stainless-retry-count': '0',
  'x-stainless-lang': 'js',
  authorization: 'Bearer sk-agent-placeholder',
}
const BODY = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'

/** A refusal as the caller saw it, or what fetch threw instead. */
async function seen(call: Promise<{ status: number; headers: { get(name: string): string | null }; text(): Promise<string> }>) {
  try {
    const res = await call
    const text = await res.text()
    return { status: res.status, error: res.headers.get('x-latchkey-error'), shouldRetry: res.headers.get('x-should-retry'), challenge: res.headers.get('proxy-authenticate'), body: text, thrown: null }
  } catch (err) {
    return { status: 0, error: null, shouldRetry: null, challenge: null, body: '', thrown: String((err as Error).message) }
  }
}

t.test('tasks.required: fetch on a route, or tunnelled to one, reads why it was refused; a proxy client still gets its 407', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: (up) => ({ tasks: { required: true }, routes: { api: up.origin } }) })
  const url = `${s.proxy}/api/v1/chat/completions`
  const bodies: string[] = []

  const none = await seen(fetch(url, { method: 'POST', headers: SDK_HEADERS, body: BODY }))
  bodies.push(none.body)
  t.same(
    { status: none.status, error: none.error, shouldRetry: none.shouldRetry, challenge: none.challenge, thrown: none.thrown },
    { status: 403, error: 'LK_PROXY_AUTH', shouldRetry: 'false', challenge: null, thrown: null },
    'no task on a route: a response fetch hands over, saying not to retry',
  )
  t.match(none.body ? JSON.parse(none.body) : {}, { code: 'LK_PROXY_AUTH', retryable: false, reason: /requires a task/ }, 'with the reason the agent acts on')

  // HTTP_PROXY set as well: undici tunnels http:// to the sidecar's own address, and the request inside is the route's.
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: s.proxy, noProxy: '' })
  t.teardown(() => dispatcher.close())
  const tunnelled = await seen(undiciFetch(url, { method: 'POST', headers: SDK_HEADERS, body: BODY, dispatcher }))
  bodies.push(tunnelled.body)
  t.same([tunnelled.status, tunnelled.error, tunnelled.shouldRetry, tunnelled.thrown], [403, 'LK_PROXY_AUTH', 'false', null], 'inside a tunnel to the route too')

  const task = await openTask(s)
  const ok = await seen(fetch(url, { method: 'POST', headers: { ...SDK_HEADERS, 'proxy-authorization': task.proxyAuthorization }, body: BODY }))
  t.equal(ok.status, 200, 'with its task the call is made')
  t.same(
    upstream.requests.map((r) => [r.method, r.url, r.rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'authorization').length, r.headers.authorization]),
    [['POST', '/v1/chat/completions', 1, `Bearer ${CANARY}`]],
    'once, with the injected credential alone, the placeholder gone',
  )

  t.equal((await fetch(`${s.sidecar.adminUrl}/v1/tasks/${task.handle}`, { method: 'DELETE' })).status, 204)
  const ended = await seen(fetch(url, { method: 'POST', headers: { ...SDK_HEADERS, 'proxy-authorization': task.proxyAuthorization }, body: BODY }))
  bodies.push(ended.body)
  t.same([ended.status, ended.error, ended.shouldRetry, ended.thrown], [403, 'LK_PROXY_AUTH', 'false', null], 'its task ended: read as such, not as a dropped connection')
  t.match(ended.body ? JSON.parse(ended.body) : {}, { reason: /no open task/ })

  // A client that knows it talks to a proxy (absolute-form) is asked for proxy credentials as before.
  const proxied = await rawRequest(s.sidecar.port, `POST ${upstream.origin}/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ${BODY.length}\r\nConnection: close\r\n\r\n${BODY}`)
  bodies.push(proxied.raw)
  t.equal(proxied.status, 407)
  t.equal(proxied.headers['proxy-authenticate'], 'Basic realm="latchkey"')

  t.equal(upstream.requests.length, 1, 'no refused call reached the upstream')
  const audit = await s.audit()
  t.same(
    audit.map((e) => [e.via, e.status, e.error]),
    [
      ['reverse', 403, 'LK_PROXY_AUTH'],
      ['tunnelled', 403, 'LK_PROXY_AUTH'],
      ['reverse', 200, null],
      ['reverse', 403, 'LK_PROXY_AUTH'],
      ['absolute', 407, 'LK_PROXY_AUTH'],
    ],
    'each refusal recorded once, with the status the agent got',
  )
  assertNoCanary(t, s, ...bodies)
})

t.test('tasks.required, HTTP_PROXY naming no task: fetch of an http:// URL on port 80 reads the refusal inside its tunnel', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: () => ({ tasks: { required: true } }) })
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: s.proxy, noProxy: '' })
  t.teardown(() => dispatcher.close())
  // Port 80, plain HTTP's: undici tunnels it, and the CONNECT's own 407 was only "fetch failed".
  const port80 = await seen(undiciFetch('http://api.example/v1/chat/completions', { method: 'POST', headers: SDK_HEADERS, body: BODY, dispatcher }))
  t.same([port80.status, port80.error, port80.shouldRetry, port80.thrown], [403, 'LK_PROXY_AUTH', 'false', null], 'a response fetch hands over, saying not to retry')
  t.match(port80.body ? JSON.parse(port80.body) : {}, { reason: /requires a task/ })

  // Nothing is dialled for it, and TLS there is refused: the tunnel carries no call of a task.
  const tls = await rawRequest(s.sidecar.port, 'CONNECT api.example:80 HTTP/1.1\r\nHost: api.example:80\r\n\r\n\x16\x03\x01\x00\x01\x01')
  t.match(tls.raw, /^HTTP\/1\.1 200 /, 'the tunnel opens, undialled')
  t.equal(tls.raw.charCodeAt(tls.raw.indexOf('\r\n\r\n') + 4), 0x15, 'and TLS in it gets an alert')
  // Another port keeps the CONNECT's 407, for a client that sends its credential when challenged.
  const other = await rawRequest(s.sidecar.port, `CONNECT 127.0.0.1:${upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\n\r\n`)
  t.equal(other.status, 407)
  t.equal(other.headers['proxy-authenticate'], 'Basic realm="latchkey"')

  t.equal(upstream.requests.length, 0)
  const audit = await s.audit(3)
  t.same(
    audit.map((e) => [e.via, e.method, e.status, e.error]),
    [
      ['tunnelled', 'POST', 403, 'LK_PROXY_AUTH'],
      ['connect', 'CONNECT', 407, 'LK_PROXY_AUTH'],
      ['connect', 'CONNECT', 407, 'LK_PROXY_AUTH'],
    ],
    'the request inside recorded with the status it got; TLS refused, and the other port, as the 407s they are',
  )
  assertNoCanary(t, s, port80.body, tls.raw, other.raw)
})

// Shutdown begins with a response streaming on a keep-alive connection (its head, keep-alive,
// already sent); once it ends, the client sends a CONNECT to port 80 on that connection, the way
// undici tunnels (Client.connect, what ProxyAgent drives under fetch). The listener is closed and
// idle connections with it, so this is where a CONNECT meets the drain. Its 503 on the status line
// is "fetch failed" to fetch; inside the tunnel the request reads the 503 and that it may retry,
// with Connection: close, and the tunnel ends with that answer, not at the drain's deadline.
t.test('shutdown: a CONNECT to port 80 on a connection the drain left open is answered 503 LK_DRAINING inside, and the tunnel closes with it', async (t) => {
  let finish = () => {}
  const { upstream, s } = await startBearerRig(t, {
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' }).write('a')
      finish = () => res.end('b')
      return true
    },
  })
  const client = new Client(s.proxy)
  t.teardown(() => client.destroy())
  const streaming = await client.request({ method: 'GET', path: `${upstream.origin}/stream` })
  t.equal(streaming.headers.connection, 'keep-alive')
  const t0 = performance.now()
  const closed = s.close()
  finish()
  t.equal(await streaming.body.text(), 'ab', 'the call in flight finishes')
  const tunnel = await client.connect({ path: 'api.example:80' }).catch((err: { statusCode?: number }) => ({ statusCode: err.statusCode ?? 0, socket: null }))
  t.equal(tunnel.statusCode, 200, 'the tunnel opens, for the refusal inside it')
  let inside = ''
  if (tunnel.socket) {
    tunnel.socket.on('data', (d: Buffer) => (inside += d.toString('latin1')))
    tunnel.socket.write(`POST /v1/chat/completions HTTP/1.1\r\nHost: api.example\r\nContent-Length: ${BODY.length}\r\n\r\n${BODY}`)
    await once(tunnel.socket, 'end')
  }
  const answer = parseRawResponse(inside)
  t.same(
    [answer.status, answer.headers['x-latchkey-error'], answer.headers['x-should-retry'], answer.headers.connection],
    [503, 'LK_DRAINING', 'true', 'close'],
    'the request inside reads the 503, that it may retry, and that the tunnel closes',
  )
  t.match(answer.body ? JSON.parse(answer.body) : {}, { code: 'LK_DRAINING', retryable: true, reason: /shutting down/ })
  await closed
  const ms = performance.now() - t0
  t.ok(ms < 1000, `the sidecar ended the tunnel after its answer and stopped in ${Math.round(ms)} ms (drain_ms 2000)`)
  t.same(upstream.requests.map((r) => r.url), ['/stream'], 'nothing dialled for the tunnel')
  t.match(await s.audit(2), [
    { via: 'absolute', path: '/stream', status: 200, error: null },
    { via: 'tunnelled', method: 'POST', host: 'api.example', port: 80, path: '/v1/chat/completions', status: 503, error: 'LK_DRAINING' },
  ], 'the request inside recorded with the 503 it got')
  assertNoCanary(t, s, inside)
})
