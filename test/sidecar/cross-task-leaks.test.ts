// An upstream that shows one request's token in the response to another (a shared "last request"
// view, a request inspector, a cached echo): the response scrubbers look for every token the
// sidecar holds for the binding (CredentialSource.held), not only the one the call carried. Task
// B's response carrying task A's broker JWT, or a task's own token a refresh superseded, reaches
// B masked, and nothing the agent, the log or the audit holds quotes it. All real: broker,
// sidecar, curl, an upstream that remembers an Authorization header and shows it on the next call.
import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { createHash } from 'node:crypto'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Duplex } from 'node:stream'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { startTestBroker, API } from '../helpers/broker.js'
import { startTestSidecar, startUpstream, loopbackPolicy, type TestSidecar, type Upstream } from '../helpers/harness.js'
import { scrubParts } from '../helpers/scrub-parts.js'
import { serverFrame, framePayloads } from '../helpers/websocket-frames.js'
import { AGENT } from '../helpers/tokens.js'
import { REMOVED } from '../../proxy/forward/scrub.js'
import { bodyNeedlesFor, compileNeedles } from '../../proxy/forward/body-scrub.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { HeldValues } from '../../proxy/credentials/held.js'
import type { Credential } from '../../proxy/context.js'

const run = promisify(execFile)
const cleanEnv = () => {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return env
}

const bearer = (auth: string) => (auth.startsWith('Bearer ') ? auth.slice(7) : '')
const b64 = (s: string) => Buffer.from(s).toString('base64')

/** Remembers the Authorization of /remember; /lastauth shows it: in the reason phrase, two headers and the body (plain, inside `Bearer `, base64). */
async function startLastAuthUpstream(): Promise<Upstream> {
  let last = ''
  return startUpstream({
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      if (req.url === '/remember') last = auth
      if (req.url !== '/lastauth') return false
      const token = bearer(last)
      const body = JSON.stringify({ last, token, b64: b64(last), token_b64: b64(token) }) + '\n'
      res.writeHead(200, `last ${token}`, { 'content-type': 'application/json', 'x-last-auth': last, 'x-last-b64': b64(token), 'content-length': String(Buffer.byteLength(body)) }).end(body)
      return true
    },
  })
}

async function rig(t: Test, now?: () => number): Promise<{ s: TestSidecar; up: Upstream; openTask(): Promise<{ id: string; handle: string; proxy: string }> }> {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const up = await startLastAuthUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([up.port]),
      sidecar: {
        agent_id: AGENT,
        broker: { url: broker.url, timeout_ms: 2000 },
        attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } },
      },
      credentials: [{ id: 'lastauth', audience: `http://127.0.0.1:${up.port}`, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }],
    },
    {},
    now ? { now } : {},
  )
  t.teardown(s.close)
  return {
    s,
    up,
    async openTask() {
      const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'lastauth', duration_s: 600, user_token: await broker.userToken('alice@example.com', 'read') }) })
      const body = (await res.json()) as Record<string, unknown>
      if (res.status !== 201) throw new Error(`task not opened: ${res.status}`)
      return { id: body.id as string, handle: body.task as string, proxy: body.proxy_url as string }
    },
  }
}

/** One call through a task's proxy URL with curl: the status line, headers and body as the agent got them. */
async function call(proxy: string, url: string): Promise<{ raw: string; status: string; headers: Record<string, string>; body: string }> {
  const { stdout } = await run('curl', ['-sS', '-i', '-x', proxy, url], { env: cleanEnv() })
  const [head, ...rest] = stdout.split('\r\n\r\n')
  const lines = head!.split('\r\n')
  const headers: Record<string, string> = {}
  for (const l of lines.slice(1)) {
    const i = l.indexOf(':')
    headers[l.slice(0, i).toLowerCase()] = l.slice(i + 1).trim()
  }
  return { raw: stdout, status: lines[0]!, headers, body: rest.join('\r\n\r\n') }
}

/** Every spelling of `token` this test's upstream shows, and its tail: none may be anywhere the agent, the log or the audit has. */
function traces(token: string): string[] {
  return [token, token.slice(-40), b64(token).slice(4, -4), b64(`Bearer ${token}`).slice(8, -8)]
}

function assertMaskedLastAuth(t: Test, got: Awaited<ReturnType<typeof call>>, shown: string, what: string): void {
  // t.ok, not t.match or t.equal: a failure must not print what it found, the token.
  t.ok(/^HTTP\/1\.1 200 OK$/.test(got.status), `${what}: the reason phrase that quoted it is the standard one`)
  t.ok(got.headers['x-last-auth'] === REMOVED, `${what}: the header showing it is replaced`)
  t.ok(got.headers['x-last-b64'] === REMOVED, `${what}: and the one showing its base64`)
  let body: { last: string; token: string; b64: string; token_b64: string }
  try {
    body = JSON.parse(got.body) as typeof body
  } catch {
    return void t.fail(`${what}: the body is JSON`)
  }
  t.ok(/^\*+$/.test(body.token), `${what}: plain in the body, overwritten`)
  t.ok(body.token.length === shown.length, `${what}: at its length`)
  t.ok(/^Bearer \*+$/.test(body.last), `${what}: inside the Authorization it was sent in, overwritten`)
  t.notOk(Buffer.from(body.b64, 'base64').toString('latin1').includes(shown.slice(8, -8)), `${what}: base64 of "Bearer <token>" no longer decodes to it`)
  t.notOk(Buffer.from(body.token_b64, 'base64').toString('latin1').includes(shown.slice(8, -8)), `${what}: nor its own base64`)
  for (const trace of traces(shown)) t.notOk(got.raw.includes(trace), `${what}: no trace of it in what the agent got (${trace.length} chars)`)
}

async function assertNowhere(t: Test, s: TestSidecar, tokens: string[], seen: string[]): Promise<void> {
  const logs = s.logs.join('')
  const audit = JSON.stringify(await s.audit())
  for (const [i, token] of tokens.entries()) {
    for (const trace of traces(token)) {
      t.notOk(logs.includes(trace), `token ${i + 1}: no log line holds it`)
      t.notOk(audit.includes(trace), `token ${i + 1}: no audit event holds it`)
      t.notOk(seen.some((x) => x.includes(trace)), `token ${i + 1}: no response the agents got holds it`)
    }
  }
}

t.test("task B's response carries task A's broker token: B gets it masked, in the head and the body", async (t) => {
  const { s, up, openTask } = await rig(t)
  const a = await openTask()
  const b = await openTask()
  const remembered = await call(a.proxy, `http://127.0.0.1:${up.port}/remember`)
  t.match(remembered.status, /^HTTP\/1\.1 200 /, 'A called the API')
  const shown = await call(b.proxy, `http://127.0.0.1:${up.port}/lastauth`)

  const tokenA = bearer(String(up.requests.find((r) => r.url === '/remember')?.headers.authorization))
  const tokenB = bearer(String(up.requests.find((r) => r.url === '/lastauth')?.headers.authorization))
  t.ok(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/.test(tokenA), "the API got A's JWT")
  t.ok(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/.test(tokenB), "and B's")
  t.ok(tokenA !== tokenB, 'two tasks, two tokens')

  assertMaskedLastAuth(t, shown, tokenA, "A's token in B's response")
  const warned = s.logs.filter((l) => l.includes('sent the injected credential back in a response body'))
  t.equal(warned.length, 1, 'the reflection is logged for the operator, once')
  t.match(warned.length === 1 ? JSON.parse(warned[0]!) : {}, { binding: 'lastauth', matches: 4 }, 'counted as today: plain twice (alone, inside the header), and base64 of each')
  await assertNowhere(t, s, [tokenA, tokenB], [remembered.raw, shown.raw])
})

t.test('a task ended: the token it held still valid upstream is still masked for the next', async (t) => {
  const { s, up, openTask } = await rig(t)
  const a = await openTask()
  await call(a.proxy, `http://127.0.0.1:${up.port}/remember`)
  t.equal((await fetch(`${s.sidecar.adminUrl}/v1/tasks/${a.handle}`, { method: 'DELETE' })).status, 204, 'A ended')
  const b = await openTask()
  const shown = await call(b.proxy, `http://127.0.0.1:${up.port}/lastauth`)
  const tokenA = bearer(String(up.requests[0]?.headers.authorization))
  assertMaskedLastAuth(t, shown, tokenA, "an ended task's token")
  await assertNowhere(t, s, [tokenA], [shown.raw])
})

t.test("a task's own token a refresh superseded, still valid, is masked in its later responses", async (t) => {
  let clock = Date.now()
  const { s, up, openTask } = await rig(t, () => clock)
  const a = await openTask()
  await call(a.proxy, `http://127.0.0.1:${up.port}/remember`)
  const jti = () => s.sidecar.brokerTokens!.describe(a.id)[0]?.jti
  const first = jti()
  // Past half the token's life (720 s for a 600 s task): the next call starts a refresh, served the current token.
  clock += 400_000
  await call(a.proxy, `http://127.0.0.1:${up.port}/noop`)
  for (let i = 0; i < 200 && jti() === first; i++) await new Promise((r) => setTimeout(r, 10))
  t.not(jti(), first, 'the token was refreshed')
  const shown = await call(a.proxy, `http://127.0.0.1:${up.port}/lastauth`)
  const old = bearer(String(up.requests.find((r) => r.url === '/remember')?.headers.authorization))
  const current = bearer(String(up.requests.find((r) => r.url === '/lastauth')?.headers.authorization))
  t.ok(old.startsWith('eyJ'), 'the API got the first token')
  t.ok(old !== current, 'the call carried the new token; the upstream showed the old one')
  assertMaskedLastAuth(t, shown, old, 'the superseded token')
  await assertNowhere(t, s, [old, current], [shown.raw])

  // Once expired on the sidecar's clock, a token is no longer held: the set does not grow for ever.
  const source = s.sidecar.brokerTokens!
  const binding = compileBinding({ id: 'lastauth', audience: `http://127.0.0.1:${up.port}`, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } })
  const held = () => source.held(binding).length
  t.equal(held(), 2, 'both tokens held while either may be valid')
  clock += 3_600_000
  t.equal(held(), 0, 'expired, they are no longer held')
})

// A WebSocket outlives the calls around it: a token issued after it opened (another task's, a
// refresh) was not among what its messages were checked for, so an upstream streaming its request
// log down the socket handed it over whole.
t.test("a WebSocket open before task B's token was issued gets B's token masked in its messages", async (t) => {
  const { s, up, openTask } = await rig(t)
  const sockets: Duplex[] = []
  up.server.on('upgrade', (req: IncomingMessage, socket: Duplex) => {
    socket.on('error', () => {})
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
    sockets.push(socket)
  })
  const a = await openTask()
  const proxy = new URL(a.proxy)
  const sock = connect(Number(proxy.port), proxy.hostname)
  sock.on('error', () => {})
  await once(sock, 'connect')
  const chunks: Buffer[] = []
  sock.on('data', (c: Buffer) => chunks.push(c))
  sock.write(`GET http://127.0.0.1:${up.port}/log HTTP/1.1\r\nHost: 127.0.0.1:${up.port}\r\nProxy-Authorization: Basic ${b64(`task:${a.handle}`)}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
  while (!Buffer.concat(chunks).includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
  t.match(Buffer.concat(chunks).toString('latin1'), /^HTTP\/1\.1 101 /, "A's WebSocket opened")

  // Task B is opened and calls after A's socket opened: its token is new to the sidecar.
  const b = await openTask()
  const called = await call(b.proxy, `http://127.0.0.1:${up.port}/remember`)
  const tokenA = bearer(String(up.requests.find((r) => r.url === '/log')?.headers.authorization ?? ''))
  const tokenB = bearer(String(up.requests.find((r) => r.url === '/remember')?.headers.authorization))
  t.ok(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/.test(tokenB) && tokenB !== tokenA, "the API got B's own JWT")
  // The upstream's request log, streamed down A's socket: B's call, then a later message.
  sockets[0]!.end(Buffer.concat([serverFrame(JSON.stringify({ url: '/remember', authorization: `Bearer ${tokenB}` })), serverFrame('after')]))
  await once(sock, 'close')
  const all = Buffer.concat(chunks)
  const messages = framePayloads(all.subarray(all.indexOf('\r\n\r\n') + 4)).map((f) => f.payload.toString('latin1'))
  t.equal(messages.length, 2, 'both messages reached A')
  t.ok(/^\{"url":"\/remember","authorization":"Bearer \*+"\}$/.test(messages[0] ?? ''), "B's token is overwritten in A's message, at its length")
  t.equal(messages[1], 'after', 'and the socket goes on as it was')
  await assertNowhere(t, s, [tokenB], [all.toString('latin1'), called.raw])
})

// A streamed response outlives the calls around it too: an event stream opened by task A, then
// task B's call, then the upstream's next event quoting it.
t.test("an event stream open before task B's token was issued gets B's token masked in its later events", async (t) => {
  const { s, up, openTask } = await rig(t)
  let push: ((event: string) => void) | null = null
  up.server.removeAllListeners('request')
  up.server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    up.requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders, body: '' })
    if (req.url !== '/events') return void res.end('ok')
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('data: opened\n\n')
    push = (event) => res.end(`data: ${event}\n\n`)
  })
  const a = await openTask()
  const streamed = call(a.proxy, `http://127.0.0.1:${up.port}/events`)
  while (push === null) await new Promise((r) => setTimeout(r, 5))
  const b = await openTask()
  await call(b.proxy, `http://127.0.0.1:${up.port}/remember`)
  const tokenB = bearer(String(up.requests.find((r) => r.url === '/remember')?.headers.authorization))
  t.ok(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/.test(tokenB), "the API got B's JWT")
  ;(push as (event: string) => void)(`{"url":"/remember","authorization":"Bearer ${tokenB}"}`)
  const got = await streamed
  t.ok(/^data: opened\n\ndata: \{"url":"\/remember","authorization":"Bearer \*+"\}\n\n$/.test(got.body), "B's token is overwritten in A's later event, at its length")
  await assertNowhere(t, s, [tokenB], [got.raw])
})

// The scrubber's side, without servers: what a set of many tokens costs and finds.
const jwtLike = (i: number) => `eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiJ1${i}LCJ0YXNrIjoi${'x'.repeat(i % 7)}.sig${i}-${(i * 7919).toString(36)}_AbCdEfGhIjKlMnOp`
const cred = (value: string, expiresAt: number | null = null): Credential => ({ value, id: `t:${value.slice(-8)}`, expiresAt, scopes: [] })

t.test('a held set: worked out once per set, the static case unchanged, many tokens scanned in one pass', async (t) => {
  const binding = compileBinding({ id: 'b', audience: 'https://api.example.com', source: 'broker', inject: { type: 'bearer' } })
  const one = cred(jwtLike(1))
  t.equal(bodyNeedlesFor(binding, one, [one]), bodyNeedlesFor(binding, one), "a set of the call's own credential alone (a static secret) is that credential's needles")
  t.equal(bodyNeedlesFor(binding, one, [one]).index, null, 'scanned as before, a native indexOf per needle')
  const creds = Array.from({ length: 40 }, (_, i) => cred(jwtLike(i)))
  const held = Object.freeze([...creds])
  const set = bodyNeedlesFor(binding, creds[3]!, held)
  t.equal(bodyNeedlesFor(binding, creds[17]!, held), set, 'the same set for every call while the held array is the same: nothing per call')
  t.not(set.index, null, `${set.needles.length} needles: one pass over the bytes`)
  const outsider = cred(jwtLike(99))
  const withOwn = bodyNeedlesFor(binding, outsider, held)
  t.equal(bodyNeedlesFor(binding, outsider, held), withOwn, "a call's credential the set lacks is added once, not per call")

  // Every token, in every spelling the body scrubber knows for it, across every cut: found as the per-needle scan finds it.
  const spellings = (v: string) => [v, `Bearer ${v}`, Buffer.from(`Bearer ${v}`).toString('base64'), Buffer.from(v).toString('hex'), encodeURIComponent(`"${v}"`)]
  const shown = [creds[0]!, creds[39]!, creds[21]!, outsider].map((c) => c.value)
  const body = shown.map((v, i) => `{"n":${i},"v":${JSON.stringify(spellings(v))}}\n`).join('')
  // The same needles scanned one by one (a native indexOf each): what the one-pass index must match.
  const reference = { ...compileNeedles(shown.flatMap((v) => [v, ...binding.encodedForms(cred(v))])), index: null }
  const scrub = (n: typeof set, cuts: number[]) => {
    const { out, found } = scrubParts(n, [0, ...cuts].map((from, k) => body.slice(from, [...cuts, body.length][k])))
    return { text: out, found }
  }
  const expected = scrub(reference, [])
  t.equal(expected.found, shown.length * 5, 'the reference finds each spelling of each token')
  const wrong: string[] = []
  let checked = 0
  for (let i = 0; i <= body.length; i += 7) {
    for (const j of [i, Math.min(body.length, i + 5), Math.min(body.length, i + 301)]) {
      const got = scrub(withOwn, [i, j])
      checked++
      if (got.text.replace(/[^*\n]/g, '') !== expected.text.replace(/[^*\n]/g, '') || got.found !== expected.found) wrong.push(`cut at ${i}, ${j}: ${got.found}`)
    }
  }
  t.same(wrong, [], `${checked} ways of cutting the body: the one-pass scan overwrites what the per-needle scan does`)
  for (const v of shown) t.notOk(scrub(withOwn, [body.length >> 1]).text.includes(v.slice(-24)), 'no token is left')
})

t.test('held values: expired ones drop out, the set is bounded, the array is the same until it changes', async (t) => {
  let now = 1_000
  const h = new HeldValues(3, () => now)
  t.equal(h.get('k').length, 0)
  const a = cred('a-token-value-0001', 2_000)
  const b = cred('b-token-value-0002', 5_000)
  h.add('k', a)
  h.add('k', b)
  const first = h.get('k')
  t.same(first, [a, b])
  t.equal(h.get('k'), first, 'unchanged: the same array')
  now = 2_000
  t.same(h.get('k'), [b], 'a expired: dropped, in a new array')
  h.add('k', cred('c', 9_000))
  h.add('k', cred('d', 9_000))
  h.add('j', cred('e', 9_000))
  t.equal(h.size, 3, 'never more than the bound')
  t.same(h.get('k').map((c) => c.value), ['c', 'd'], 'the oldest of the largest set went first')
})
