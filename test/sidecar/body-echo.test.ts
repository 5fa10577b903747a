// Upstreams that reflect the injected credential in a response BODY (an echo API, an error page
// quoting the token it refused): the agent gets the body with every spelling of the credential
// overwritten, at the same length, streamed as it comes.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { brotliCompressSync, constants as zlibConstants, createGzip, deflateRawSync, deflateSync, gunzipSync, gzipSync } from 'node:zlib'
import { Agent, fetch, ProxyAgent } from 'undici'
import { BodyScrubber, RELEASE_MAX, bodyNeedlesFor, compileNeedles } from '../../proxy/forward/body-scrub.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { startUpstream, startTestSidecar, startBearerRig, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'
import { scrubParts } from '../helpers/scrub-parts.js'

const run = promisify(execFile)
// A secret holding characters each echo escapes its own way: `/` (JSON's `\/`), `+` and space
// (percent- and form-encoding), `&` and `"` (HTML, JSON).
const ODD = `${CANARY}/a+b c&d"e`


/**
 * A streamed answer's first read (or "nothing within <ms> ms" when none came by then), and, once
 * `sendRest` lets the upstream go on, the rest: an event held back until the next waits for ever.
 */
async function firstThenRest(body: AsyncIterable<Uint8Array>, ms: number, sendRest: () => void): Promise<{ first: string; rest: string }> {
  const chunks = body[Symbol.asyncIterator]()
  const read = await Promise.race([chunks.next(), new Promise<{ value: Uint8Array }>((resolve) => setTimeout(() => resolve({ value: Buffer.from(`nothing within ${ms} ms`) }), ms))])
  sendRest()
  let rest = ''
  for (let c = await chunks.next(); !c.done; c = await chunks.next()) rest += Buffer.from(c.value).toString()
  return { first: Buffer.from(read.value!).toString(), rest }
}

t.test('the scrubber: a match anywhere, cut anywhere across chunks, is overwritten at the same length', async (t) => {
  const secret = 'S3cr3t-token-0123456789'
  const n = compileNeedles([secret, Buffer.from(secret).toString('base64')])
  const body = `{"a":"x","auth":"Bearer ${secret}","b64":"${Buffer.from(secret).toString('base64')}","z":1}\n`
  const expected = body.replace(secret, '*'.repeat(secret.length)).replace(Buffer.from(secret).toString('base64'), '*'.repeat(Buffer.from(secret).toString('base64').length))
  let checked = 0
  const wrong: string[] = []
  for (let i = 0; i <= body.length; i++) {
    for (const j of [i, Math.min(body.length, i + 3), Math.min(body.length, i + 17)]) {
      const { out: got, found } = scrubParts(n, [body.slice(0, i), body.slice(i, j), body.slice(j)])
      if (got !== expected || found !== 2) wrong.push(`cut at ${i} and ${j}: ${found} found, ${got}`)
      checked++
    }
  }
  t.same(wrong, [], `${checked} ways of cutting the body, each overwritten both matches and nothing else`)
  t.ok(checked > 200)
})

t.test('a copy some of whose characters an echo escaped, and not others, is overwritten, cut anywhere across chunks', async (t) => {
  // Go's html/template writes `+` as `\u002b` and `/` as `\/` in a <script> string: a mixed
  // spelling no whole-spelling needle matched, which went to the agent whole (injector probe).
  const secret = 'q7Xr2mVt9LpA4sKd8NwZ+hF3jC6yB1eU/oG0iTxy=='
  const n = compileNeedles([secret])
  const spellings = [
    'q7Xr2mVt9LpA4sKd8NwZ\\u002bhF3jC6yB1eU\\/oG0iTxy==', // Go html/template
    'q7Xr2mVt9LpA4sKd8NwZ+hF3jC6yB1eU\\u002foG0iTxy==', // `/` alone as \u002f
    'q7Xr2mVt9LpA4sKd8NwZ&#x2b;hF3jC6yB1eU/oG0iTxy==', // `+` alone as an HTML reference
    'q7Xr2mVt9LpA4sKd8NwZ\\u002BhF3jC6yB1eU\\u002FoG0iTxy\\u003D\\u003D', // every special, upper-case hex
    'q7Xr2mVt9LpA4sKd8NwZ\\x2bhF3jC6yB1eU\\x2foG0iTxy\\x3d\\x3d', // \x escapes
    'q7Xr2mVt9LpA4sKd8NwZ%252BhF3jC6yB1eU%252FoG0iTxy%253D%253D', // percent-encoded twice
    'q7Xr2mVt9LpA4sKd8NwZ%2bhF3jC6yB1eU/oG0iTxy&#61;=', // two styles in one copy
  ]
  const wrong: string[] = []
  let checked = 0
  for (const copy of spellings) {
    const body = `<script>var session = {token: "${copy}"};</script>\n`
    const at = body.indexOf(copy)
    for (let i = 0; i <= body.length; i++) {
      for (const j of [i, Math.min(body.length, i + 5)]) {
        const { out, found } = scrubParts(n, [body.slice(0, i), body.slice(i, j), body.slice(j)])
        const masked = out.slice(at, at + copy.length)
        if (out.length !== body.length || found !== 1 || /[A-Za-z0-9]{4}/.test(masked) || out.slice(0, at) + out.slice(at + copy.length) !== body.slice(0, at) + body.slice(at + copy.length)) {
          wrong.push(`${copy} cut at ${i} and ${j}: ${found} found, ${out}`)
        }
        checked++
      }
    }
  }
  t.same(wrong.slice(0, 5), [], `${checked} ways of cutting ${spellings.length} spellings: each copy overwritten, nothing else`)
  const clean = 'q7Xr2mVt9LpA4sKd8NwZ and hF3jC6yB1eU are runs of it; ' + 'a/b+c=d '.repeat(20)
  t.equal(scrubParts(n, [clean]).out, clean, 'runs of it too short to matter, and escapes elsewhere, pass untouched')
})

t.test('through the sidecar: a secret echoed with some of its characters escaped reaches no client', async (t) => {
  // No run of it between + / = is the three quarters a copy must show: only matched escape by escape.
  const secret = `LKCANARY+${CANARY.slice(8, 20)}/${CANARY.slice(20, 32)}+${CANARY.slice(8, 20)}=`
  const mixed: Record<string, (token: string) => string> = {
    "Go's html/template in a <script> string (\\u002b, \\/)": (token) => `<script>var s = "${token.replace(/[+/]/g, (c) => (c === '/' ? '\\/' : '\\u002b'))}";</script>`,
    '+ alone as an HTML hex reference': (token) => token.replace(/\+/g, '&#x2b;'),
    'percent-encoded twice': (token) => encodeURIComponent(encodeURIComponent(token)),
  }
  const echo = await startUpstream({
    handler: (req, res) => {
      const body = `before ${mixed[decodeURIComponent(req.url.slice(1))]!(String(req.headers.authorization).slice(7))} after`
      res.writeHead(200, { 'content-type': 'text/html', 'content-length': Buffer.byteLength(body) }).end(body)
      return true
    },
  })
  const s = await startTestSidecar(
    { policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [echo.port] }] }, credentials: [{ id: 'echo', audience: echo.origin, source: 'static', secret: 'MIXED', inject: { type: 'bearer' } }] },
    { LATCHKEY_SECRET_MIXED: secret },
  )
  const agent = new ProxyAgent(s.proxy)
  t.teardown(async () => {
    await agent.close()
    await s.close()
    await echo.close()
  })
  for (const [name, spell] of Object.entries(mixed)) {
    const body = await (await fetch(`http://127.0.0.1:${echo.port}/${encodeURIComponent(name)}`, { dispatcher: agent })).text()
    const copy = spell(secret)
    t.equal(body.length, `before ${copy} after`.length, `${name}: relayed at its length`)
    t.notOk(/[0-9a-f]{6}/.test(body.slice(7, -6)), `${name}: no run of the secret is left (${body})`)
  }
  t.equal(echo.requests.at(-1)?.headers.authorization, `Bearer ${secret}`, 'the upstream did get the credential')
})

t.test("a Basic header's base64 echoed in a body is overwritten whole, its last group too", async (t) => {
  // `svc:CANARY-9d41e` is 16 bytes: its base64 ends in a group of one byte, `ZQ==`, that the
  // secret's own base64 core leaves out. Overwriting the core first hid the whole header's match.
  for (const secret of ['CANARY-9d41e', 'CANARY-9d41ef', 'CANARY-9d41efg']) {
    const binding = compileBinding({ id: 'b', audience: 'http://127.0.0.1:1', source: 'static', secret: 'B', inject: { type: 'basic', username: 'svc' } })
    const credential = { value: secret, id: 'static:B', expiresAt: null, scopes: [] }
    const header = Buffer.from(`svc:${secret}`).toString('base64')
    for (const body of [`{"auth":"${header}"}`, `Basic ${header}`, header]) {
      const s = new BodyScrubber(bodyNeedlesFor(binding, credential))
      const out = Buffer.concat([s.push(Buffer.from(body)) ?? Buffer.alloc(0), s.end() ?? Buffer.alloc(0)]).toString()
      const at = body.indexOf(header)
      t.equal(out.slice(at, at + header.length), out[at]!.repeat(header.length), `${secret}, ${JSON.stringify(body)}: every byte of the header's base64 overwritten`)
      t.equal(out.slice(0, at) + out.slice(at + header.length), body.slice(0, at) + body.slice(at + header.length), 'and nothing else')
      t.equal(s.found, 1, 'counted once')
    }
  }
})

t.test('copies of the secret that touch one another, cut by every chunk, hold back no more than one copy: no body grows what waits', async (t) => {
  // UTF-16 copies back to back: the little- and big-endian needles match one byte apart, so each
  // copy overlaps the next. Holding all that overlapped what waits held the whole body, rescanned
  // at every chunk: 1 MiB of them took 25 s of the event loop (the resource probe).
  const secret = 'LKCANARY-probe4-9f3c2a7d61e84b05'
  const copy = Buffer.from(secret, 'utf16le')
  for (const [what, body] of [
    ['UTF-16 copies', Buffer.concat([Buffer.from(' '.repeat(14)), ...Array.from({ length: 4096 }, () => copy)])],
    ['ASCII copies', Buffer.from(' '.repeat(14) + secret.repeat(8192))],
  ] as const) {
    const s = new BodyScrubber(compileNeedles([secret]))
    let out = 0
    let mostHeld = 0
    const sent: Buffer[] = []
    for (let at = 0; at < body.length; at += 4096) {
      const chunk = body.subarray(at, at + 4096)
      const got = s.push(chunk)
      if (got) sent.push(got)
      out += got?.length ?? 0
      mostHeld = Math.max(mostHeld, at + chunk.length - out)
    }
    const rest = s.end()
    if (rest) sent.push(rest)
    const all = Buffer.concat(sent)
    t.equal(all.length, body.length, `${what}: the whole body goes, at its length`)
    t.ok(mostHeld <= 2 * copy.length, `${what}: at most ${mostHeld} bytes held back at once (one copy is ${copy.length})`)
    t.equal(all.indexOf(copy), -1, `${what}: no UTF-16 copy is left`)
    t.equal(all.indexOf(secret), -1, `${what}: no ASCII copy is left`)
    t.equal(all.indexOf(secret.slice(0, 12)), -1, `${what}: nor a third of one`)
  }
})

t.test('the scrubber holds back only what could begin a match, and never writes into the chunk it was given', async (t) => {
  const n = compileNeedles(['Zq9-secret-value-XYZ'])
  const s = new BodyScrubber(n)
  const event = Buffer.from('data: {"n":1}\n\n')
  t.same(s.push(event), event, 'an event ending in a newline goes on whole: a stream is not delayed')
  const tail = s.push(Buffer.from('data: Zq9-se'))
  t.equal(tail?.toString(), 'data: ', 'what could begin the secret waits for the next chunk')
  const chunk = Buffer.from('cret-value-XYZ!')
  const copy = Buffer.from(chunk)
  t.equal(s.push(chunk)?.toString(), '********************!')
  t.same(chunk, copy, "the chunk it was handed (undici's buffer) is unchanged")
  t.equal(s.push(Buffer.from('Zq9')), null, 'a chunk that may all begin the secret waits whole')
  t.equal(s.end()?.toString(), 'Zq9', 'and goes at the end as it was: it never was the secret')
})

t.test('a credential echoed in a response body reaches no client, however spelled', async (t) => {
  const reflections: Record<string, (auth: string, token: string) => string> = {
    'httpbin-style JSON (PHP escapes /)': (auth) => JSON.stringify({ headers: { Authorization: auth } }).replace(/\//g, '\\/'),
    'JSON as JSON.stringify writes it': (auth) => JSON.stringify({ authorization: auth }),
    'an error page quoting the token (HTML)': (_a, token) => `<p>invalid token &quot;${token.replace(/&/g, '&amp;').replace(/"/g, '&quot;')}&quot;</p>`,
    'a URL in the body (percent-encoded, lower-case hex)': (_a, token) => `see https://x.example/cb?t=${encodeURIComponent(token).replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase())}`,
    'a form (+ for space)': (_a, token) => `t=${encodeURIComponent(token).replace(/%20/g, '+')}`,
    "Python's urllib.parse.quote (keeps /)": (_a, token) => `next=${encodeURIComponent(token).replace(/[!*'()]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase()).replace(/%2F/g, '/')}`,
    "Go's url.QueryEscape (every reserved character, + for space)": (_a, token) => encodeURIComponent(token).replace(/[!*'()]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase()).replace(/%20/g, '+'),
    "Go's html/template (&#34; &#43;)": (_a, token) => token.replace(/[&<>"'+]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;', '+': '&#43;' })[c]!),
    'HTML numeric references, decimal and hex': (_a, token) => token.replace(/[&"+/]/g, (c) => `&#${c.charCodeAt(0)};`) + ' ' + token.replace(/[&"+/]/g, (c) => `&#x${c.charCodeAt(0).toString(16)};`),
    "Go's encoding/json (\\u0026)": (auth) => JSON.stringify({ auth }).replace(/&/g, '\\u0026'),
    // ASP.NET Core's default (JavaScriptEncoder.Default): upper-case hex, `+` and `"` escaped too.
    ".NET's System.Text.Json (\\u002B \\u0022)": (auth) => `{"auth":"${auth.replace(/["<>&'+`]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0'))}"}`,
    'base64 of the header': (auth) => Buffer.from(auth).toString('base64'),
    'hex of the token': (_a, token) => Buffer.from(token).toString('hex').toUpperCase(),
    // A header scrub decodes it; a body's needles must hold it as is.
    'every byte of the token percent-encoded, either hex case': (_a, token) => [...Buffer.from(token)].map((b) => '%' + b.toString(16).toUpperCase().padStart(2, '0')).join('') + ' ' + [...Buffer.from(token)].map((b) => '%' + b.toString(16).padStart(2, '0')).join(''),
    // The token is ASCII: a NUL beside each character is its UTF-16, little- or big-endian, in UTF-8 bytes.
    'the header in UTF-16LE': (auth) => [...auth].map((c) => c + '\0').join(''),
    'the token in UTF-16BE': (_a, token) => [...token].map((c) => '\0' + c).join(''),
  }
  const echo = await startUpstream({
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      const reflect = reflections[decodeURIComponent(req.url.slice(1))]
      const body = reflect ? `before ${reflect(auth, auth.slice(7))} after` : 'no such reflection'
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body), 'x-upstream-length': String(Buffer.byteLength(body)) }).end(body)
      return true
    },
  })
  const s = await startTestSidecar(
    {
      policy: { default: 'allow' },
      network: { allow: [{ cidr: '127.0.0.1/32', ports: [echo.port] }] },
      credentials: [{ id: 'echo', audience: echo.origin, source: 'static', secret: 'ODD', inject: { type: 'bearer' } }],
    },
    { LATCHKEY_SECRET_ODD: ODD },
  )
  t.teardown(async () => {
    await s.close()
    await echo.close()
  })
  const seen: string[] = []
  const agent = new ProxyAgent(s.proxy)
  t.teardown(() => agent.close())
  for (const name of Object.keys(reflections)) {
    const url = `http://127.0.0.1:${echo.port}/${encodeURIComponent(name)}`
    const r = await fetch(url, { dispatcher: agent })
    const body = await r.text()
    seen.push(body)
    t.equal(r.status, 200, name)
    t.match(body, /^before .* after$/s, `${name}: the rest of the body is relayed`)
    t.equal(Buffer.byteLength(body), Number(r.headers.get('x-upstream-length')), `${name}: at the length the upstream sent`)
    t.notOk(body.includes(CANARY), `${name}: the token is not in it`)
    t.notOk(body.includes(reflections[name]!(`Bearer ${ODD}`, ODD).slice(-40)), `${name}: nor the end of its reflection`)
  }
  const curl = await run('curl', ['-s', '--compressed', '-x', s.proxy, `http://127.0.0.1:${echo.port}/${encodeURIComponent('httpbin-style JSON (PHP escapes /)')}`])
  seen.push(curl.stdout)
  t.match(curl.stdout, /^before \{"headers":\{"Authorization":"Bearer \*+"\}\} after$/, 'curl --compressed gets the JSON, the token overwritten')
  t.equal(echo.requests.at(-1)?.headers['accept-encoding'], 'identity', 'a credentialed call asks for a body it can read')
  t.equal(echo.requests.at(-1)?.headers.authorization, `Bearer ${ODD}`, 'the upstream did get the credential')
  const warned = s.logs.filter((l) => l.includes('sent the injected credential back in a response body'))
  t.equal(warned.length, Object.keys(reflections).length + 1, 'each reflecting call is logged for the operator')
  t.match(JSON.parse(warned[0]!), { binding: 'echo', matches: 1 })
  assertNoCanary(t, s, ...seen)
})

t.test('a short held tail is let go when the body pauses; a match beginning in it is overwritten from where it stops', async (t) => {
  const secret = 'Zq9-secret-value-XYZ'
  const n = compileNeedles([secret])
  const body = `text ${secret} more`
  const at = body.indexOf(secret)
  const wrong: string[] = []
  let released = 0
  for (let i = 1; i < body.length; i++) {
    const s = new BodyScrubber(n)
    const out: Buffer[] = []
    const first = s.push(Buffer.from(body.slice(0, i)))
    if (first) out.push(first)
    const let_go = s.release()
    if (let_go) {
      out.push(let_go)
      released++
    }
    const second = s.push(Buffer.from(body.slice(i)))
    if (second) out.push(second)
    const rest = s.end()
    if (rest) out.push(rest)
    // Let go only when the cut falls within the secret's first RELEASE_MAX bytes: the agent then
    // has those bytes, and the rest of the secret is overwritten.
    const shown = let_go ? i - at : 0
    const expected = body.slice(0, at + shown) + '*'.repeat(secret.length - shown) + body.slice(at + secret.length)
    if (Buffer.concat(out).toString() !== expected || s.found !== 1) wrong.push(`cut at ${i}: ${s.found} found, ${Buffer.concat(out).toString()}`)
  }
  t.same(wrong, [], 'every cut: the secret overwritten past what was let go, and found once')
  t.equal(released, RELEASE_MAX, `a tail was let go at the ${RELEASE_MAX} cuts inside the secret's first ${RELEASE_MAX} bytes, and nowhere else`)

  const s = new BodyScrubber(n)
  t.equal(s.push(Buffer.from('a Zq9-secr'))?.toString(), 'a ')
  t.notOk(s.releasable, 'a tail longer than RELEASE_MAX bytes is not let go: it is that much of the secret')
  t.equal(s.release(), null)
  const s2 = new BodyScrubber(n)
  t.equal(s2.push(Buffer.from('a Zq'))?.toString(), 'a ')
  t.equal(s2.release()?.toString(), 'Zq')
  t.equal(s2.push(Buffer.from('9-s')), null, 'what continues a let-go tail waits')
  t.notOk(s2.releasable, 'and is not let go once the two pass RELEASE_MAX bytes')
  t.equal(s2.push(Buffer.from('ecret-value-XYZ and on'))?.toString(), `${'*'.repeat(secret.length - 2)} and on`, 'the secret overwritten past the two bytes let go')
})

t.test("a bare text stream (tokens with no framing) is not held at a token ending in the secret's first letter", async (t) => {
  let sendRest: () => void = () => {}
  const restWanted = new Promise<void>((resolve) => (sendRest = resolve))
  const { upstream: echo, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const secret = String(req.headers.authorization ?? '').slice('Bearer '.length)
      res.writeHead(200, { 'content-type': 'text/plain' })
      // The next token is written only once the client has this one: a sidecar holding the
      // trailing letter waits for ever (the race below).
      res.write(`Hello ${secret[0]}`)
      void restWanted.then(() => res.end(`${secret.slice(1)} and on`))
      return true
    },
  })
  const agent = new ProxyAgent(s.proxy)
  t.teardown(() => agent.close())
  const r = await fetch(`http://127.0.0.1:${echo.port}/tokens`, { dispatcher: agent })
  const reader = r.body!.getReader()
  // The letter comes apart from what went before it (the part no needle begins goes at once).
  let got = ''
  const gaveUp = setTimeout(() => void reader.cancel(), 3000)
  while (got.length < 'Hello L'.length) {
    const c = await reader.read()
    if (c.done) break
    got += Buffer.from(c.value).toString()
  }
  clearTimeout(gaveUp)
  t.equal(got, `Hello ${CANARY[0]}`, 'the token arrives though it ends in what could begin the secret')
  sendRest()
  let rest = ''
  for (let c = await reader.read(); !c.done; c = await reader.read()) rest += Buffer.from(c.value).toString()
  t.equal(rest, `${'*'.repeat(CANARY.length - 1)} and on`, "the secret it began is overwritten from where the agent's copy stops")
  assertNoCanary(t, s, rest)
})

t.test('a reflection split across chunks is caught; a stream of events is not held back', async (t) => {
  let sendRest: () => void = () => {}
  const restWanted = new Promise<void>((resolve) => (sendRest = resolve))
  const { upstream: echo, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      if (req.url === '/split') {
        res.write(`data: ${auth.slice(0, 15)}`)
        setTimeout(() => res.end(`${auth.slice(15)}\n\n`), 30)
        return true
      }
      // The second event is sent only once the client has the first: a sidecar that held the
      // first back would wait here forever (the test's timeout).
      res.write('data: first\n\n')
      void restWanted.then(() => res.end('data: second\n\n'))
      return true
    },
  })
  const agent = new ProxyAgent(s.proxy)
  t.teardown(() => agent.close())
  const split = await (await fetch(`http://127.0.0.1:${echo.port}/split`, { dispatcher: agent })).text()
  t.equal(split, `data: Bearer ${'*'.repeat(CANARY.length)}\n\n`, 'overwritten though it came in two writes 30 ms apart')

  const r = await fetch(`http://127.0.0.1:${echo.port}/events`, { dispatcher: agent })
  const { first, rest } = await firstThenRest(r.body!, 2000, sendRest)
  t.equal(first, 'data: first\n\n', 'the first event arrives before the upstream sends the next')
  t.equal(rest, 'data: second\n\n')
  assertNoCanary(t, s, split)
})

t.test('a compressed event stream on a credentialed route is decoded event by event; an agent leaving mid-stream closes the upstream', async (t) => {
  // An API that compresses whatever it is asked, flushing each event (compression middleware
  // over SSE), read as the OpenAI and Anthropic SDKs read it: fetch on a route.
  let sendRest: () => void = () => {}
  const restWanted = new Promise<void>((resolve) => (sendRest = resolve))
  let endlessClosed: () => void = () => {}
  const upstreamClosed = new Promise<void>((resolve) => (endlessClosed = resolve))
  const { s } = await startBearerRig(t, {
    handler: (req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'content-encoding': 'gzip' })
      const z = createGzip()
      z.pipe(res)
      const event = (data: string) => {
        z.write(`data: ${data}\n\n`)
        z.flush(zlibConstants.Z_SYNC_FLUSH)
      }
      if (req.url === '/endless') {
        const tick = setInterval(() => event('more'), 50)
        res.once('close', () => {
          clearInterval(tick)
          endlessClosed()
        })
        event('first')
        return true
      }
      // The rest is sent only once the agent has the first event: one held back waits for ever.
      event('first')
      void restWanted.then(() => {
        event(String(req.headers.authorization))
        z.end()
      })
      return true
    },
    fragment: (up) => ({ routes: { api: up.origin } }),
  })
  const client = new Agent()
  t.teardown(() => client.destroy())
  const r = await fetch(`${s.proxy}/api/events`, { dispatcher: client, method: 'POST', headers: { authorization: 'Bearer sk-agent-placeholder', 'content-type': 'application/json' }, body: '{"stream":true}' })
  t.equal(r.headers.get('content-encoding'), null, 'relayed as identity')
  const { first, rest } = await firstThenRest(r.body!, 5000, sendRest)
  t.equal(first, 'data: first\n\n', 'the first event, decoded, arrives before the upstream sends the next')
  t.equal(rest, `data: Bearer ${'*'.repeat(CANARY.length)}\n\n`, 'then the rest, the echoed credential overwritten')

  const controller = new AbortController()
  const endless = await fetch(`${s.proxy}/api/endless`, { dispatcher: client, signal: controller.signal })
  const endlessReader = endless.body!.getReader()
  t.equal(Buffer.from((await endlessReader.read()).value!).toString(), 'data: first\n\n')
  controller.abort()
  const closed = await Promise.race([upstreamClosed.then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5000))])
  t.ok(closed, 'the agent aborting closes the upstream response')
  const audit = await s.audit(2)
  t.same(
    audit.map((e) => [e.path, e.status, e.error]),
    [
      ['/events', 200, null],
      ['/endless', 200, 'LK_CLIENT_CLOSED'],
    ],
    'the aborted stream recorded as the agent leaving',
  )
  assertNoCanary(t, s, first, rest)
})

t.test('a compressed body on a credentialed call is decoded, checked and relayed as identity; elsewhere it passes as sent', async (t) => {
  // Some APIs compress whatever they are asked (the Stack Exchange API always does).
  const big = Array.from({ length: 40_000 }, (_, i) => `line ${i} of a long answer\n`).join('')
  const echo = await startUpstream({
    handler: (req, res) => {
      if (req.headers['if-none-match'] !== undefined) {
        res.writeHead(304, { 'content-encoding': 'gzip', etag: '"v1"' }).end()
        return true
      }
      const text = `seen ${String(req.headers.authorization ?? 'nothing')}`
      const [coding, packed] =
        req.url === '/br' ? ['br', brotliCompressSync(text)]
        : req.url === '/deflate' ? ['deflate', deflateSync(text)]
        // Raw deflate (RFC 1951) labelled deflate, the IIS quirk that fetch and browsers read.
        : req.url === '/raw-deflate' ? ['deflate', deflateRawSync(text)]
        : req.url === '/big' ? ['gzip', gzipSync(big + text + big)]
        : req.url === '/corrupt' ? ['gzip', Buffer.concat([gzipSync(text).subarray(0, 12), Buffer.from('not gzip at all')])]
        : ['gzip', gzipSync(text)]
      if (req.url === '/deflate-split' || req.url === '/raw-deflate-split') {
        // Chunked, its first chunk one byte: which format it is waits for the second.
        const split = req.url === '/deflate-split' ? deflateSync(big + text) : deflateRawSync(big + text)
        res.writeHead(200, { 'content-encoding': 'deflate', etag: '"v1"' })
        res.write(split.subarray(0, 1))
        res.end(split.subarray(1))
        return true
      }
      res.writeHead(200, { 'content-encoding': coding, 'content-length': packed.length, etag: '"v1"' }).end(packed)
      return true
    },
  })
  const plain = await startUpstream({
    handler: (_req, res) => {
      const packed = gzipSync('a compressed body')
      res.writeHead(200, { 'content-encoding': 'gzip', 'content-length': packed.length }).end(packed)
      return true
    },
  })
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [echo.port, plain.port] }] },
    credentials: [{ id: 'echo', audience: echo.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await echo.close()
    await plain.close()
  })
  const seen: string[] = []
  for (const path of ['/gzip', '/br', '/deflate', '/raw-deflate']) {
    const r = await fetch(`${echo.origin}${path}`, { dispatcher: new ProxyAgent(s.proxy), headers: { 'accept-encoding': 'gzip, br' } })
    const body = await r.text().catch((err: Error) => `cut: ${err.message}`)
    seen.push(body)
    t.equal(r.status, 200, `${path}: relayed`)
    t.equal(r.headers.get('content-encoding'), null, `${path}: as identity`)
    t.equal(r.headers.get('etag'), 'W/"v1"', `${path}: its ETag made weak: the same representation, other bytes`)
    t.match(body, /^seen Bearer \*+$/, `${path}: decoded, the credential in it masked`)
  }
  t.equal(echo.requests[0]?.headers['accept-encoding'], 'identity', "the agent's Accept-Encoding was replaced")
  const large = await fetch(`${echo.origin}/big`, { dispatcher: new ProxyAgent(s.proxy) })
  const largeBody = await large.text()
  seen.push(largeBody)
  t.equal(largeBody.length, big.length * 2 + `seen Bearer ${CANARY}`.length, 'a large body decoded whole, its length kept')
  t.ok(largeBody.startsWith(big) && largeBody.endsWith(big), 'byte for byte around the masked credential')
  for (const path of ['/deflate-split', '/raw-deflate-split']) {
    const split = await (await fetch(`${echo.origin}${path}`, { dispatcher: new ProxyAgent(s.proxy) })).text().catch((err: Error) => `cut: ${err.message}`)
    seen.push(split)
    t.ok(split.length === big.length + `seen Bearer ${CANARY}`.length && split.startsWith(big) && /seen Bearer \*+$/.test(split), `${path}: decoded whole from a one-byte first chunk, the credential masked`)
  }
  const corrupt = await rawRequest(s.sidecar.port, `GET ${echo.origin}/corrupt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  seen.push(corrupt.raw)
  t.notMatch(corrupt.raw, /0\r\n\r\n$/, 'a body that does not decode is cut, never ended as if whole')
  const head = await rawRequest(s.sidecar.port, `HEAD http://127.0.0.1:${echo.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(head.status, 200, 'a HEAD has no body to check: its head is relayed')
  // As the GET's head would be: the agent's HEAD and GET agree, and a 304 revalidates what it got.
  t.same([head.headers['content-encoding'], head.headers['content-length'], head.headers.etag], [undefined, undefined, 'W/"v1"'], 'HEAD: the head of the decoded GET')
  const revalidated = await rawRequest(s.sidecar.port, `GET ${echo.origin}/gzip HTTP/1.1\r\nHost: x\r\nIf-None-Match: W/"v1"\r\nConnection: close\r\n\r\n`)
  t.equal(revalidated.status, 304)
  t.same([revalidated.headers['content-encoding'], revalidated.headers.etag], [undefined, 'W/"v1"'], '304: no coding the 200 it revalidates did not have')

  const passed = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${plain.port}/ HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n`)
  t.equal(passed.status, 200, 'no credential injected: nothing to check')
  t.equal(passed.headers['content-encoding'], 'gzip')
  t.equal(plain.requests[0]?.headers['accept-encoding'], 'gzip', "the agent's Accept-Encoding is kept where no credential goes")
  const events = await s.audit()
  t.same(events.filter((e) => e.port === echo.port && e.method === 'GET').map((e) => [e.path, e.status, e.error]), [
    ['/gzip', 200, null],
    ['/br', 200, null],
    ['/deflate', 200, null],
    ['/raw-deflate', 200, null],
    ['/big', 200, null],
    ['/deflate-split', 200, null],
    ['/raw-deflate-split', 200, null],
    ['/corrupt', 200, 'LK_UPSTREAM_PROTOCOL'],
    ['/gzip', 304, null],
  ])
  t.equal(events.find((e) => e.path === '/big')?.bytes_out, largeBody.length, 'bytes_out counts what the agent got, decoded')
  assertNoCanary(t, s, ...seen, head.raw, revalidated.raw)
})

t.test('a Content-Encoding its Connection lists is still the body\'s coding: decoded and checked, never relayed unlabelled', async (t) => {
  // Connection-listed headers are dropped as hop-by-hop: the gzip label went, the gzip bytes did
  // not, so the scrub read compressed bytes (no credential in them) and the agent, told nothing,
  // had only to gunzip its body to hold the credential.
  const echo = await startUpstream({
    handler: (req, res) => {
      const packed = gzipSync(`seen ${String(req.headers.authorization ?? 'nothing')}`)
      res.writeHead(200, { 'content-encoding': 'gzip', connection: 'content-encoding', 'content-length': packed.length }).end(packed)
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
  const r = await fetch(`${echo.origin}/`, { dispatcher: new ProxyAgent(s.proxy) })
  const bytes = Buffer.from(await r.arrayBuffer())
  t.equal(r.status, 200)
  t.equal(r.headers.get('content-encoding'), null, 'relayed as identity')
  t.match(bytes.toString('latin1'), /^seen Bearer \*+$/, 'decoded, the credential in it masked')
  let unpacked = ''
  try {
    unpacked = gunzipSync(bytes).toString()
  } catch {
    // Not gzip: what the agent has is the decoded body.
  }
  assertNoCanary(t, s, bytes.toString('latin1'), unpacked)
})

t.test('a body the sidecar cannot read whole is not relayed: transfer codings, a coding sent twice, a Range', async (t) => {
  const { upstream, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      if (req.url === '/te') {
        // A transfer coding undici does not undo: the body reaches it still gzipped.
        const socket = res.socket!
        const packed = gzipSync(auth)
        socket.write(`HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n${packed.length.toString(16)}\r\n`)
        socket.write(packed)
        socket.end('\r\n0\r\n\r\n')
        return true
      }
      if (req.url === '/chunked-twice') {
        // Chunked over chunked: undici undoes the outer framing; the inner one splits the credential.
        const inner = [...auth.matchAll(/[\s\S]{1,7}/g)].map(([piece]) => `${piece.length.toString(16)}\r\n${piece}\r\n`).join('') + '0\r\n\r\n'
        res.socket!.end(`HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n${Buffer.byteLength(inner).toString(16)}\r\n${inner}\r\n0\r\n\r\n`)
        return true
      }
      if (req.url === '/twice') {
        res.socket!.end(`HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd`)
        return true
      }
      const body = `range=${String(req.headers.range)} if-range=${String(req.headers['if-range'])} ${auth}`
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) }).end(body)
      return true
    },
  })
  const te = await rawRequest(s.sidecar.port, `GET ${upstream.origin}/te HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(te.status, 502)
  t.match(JSON.parse(te.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /gzip-encoded body/, retryable: false })
  const chunkedTwice = await rawRequest(s.sidecar.port, `GET ${upstream.origin}/chunked-twice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(chunkedTwice.status, 502, 'a body chunked twice is refused (undici undid one framing; the other split the credential)')
  t.match(JSON.parse(chunkedTwice.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /chunked twice/, retryable: false })
  t.notOk(chunkedTwice.body.includes('Bearer'), 'none of its body is relayed')
  const twice = await rawRequest(s.sidecar.port, `GET ${upstream.origin}/twice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(twice.status, 502)
  t.match(JSON.parse(twice.body), { code: 'LK_UPSTREAM_PROTOCOL', retryable: false }, 'Content-Encoding sent twice: read as one list, refused as such')
  const ranged = await rawRequest(s.sidecar.port, `GET ${upstream.origin}/range HTTP/1.1\r\nHost: x\r\nRange: bytes=100-130\r\nIf-Range: "etag"\r\nConnection: close\r\n\r\n`)
  t.equal(ranged.status, 200)
  t.match(ranged.body, /^range=undefined if-range=undefined Bearer \*+$/, 'Range and If-Range are not sent: the body comes whole, and is checked whole')
  assertNoCanary(t, s, te.raw, chunkedTwice.raw, twice.raw, ranged.raw)
})

t.test('a coding the upstream names is not quoted in the refusal: an echo there is the credential, for every injector', async (t) => {
  // Echoes the credential it was given as the body's coding: the raw Transfer-Encoding is not
  // scrubbed (undici has consumed it), and the refusal once quoted it, lower-cased.
  const upstream = await startUpstream({
    handler: (req, res) => {
      const url = new URL(req.url, 'http://x')
      const secret = url.searchParams.get('key') ?? String(req.headers.authorization ?? req.headers['x-key'] ?? '').replace(/^\w+ /, '')
      const socket = res.socket!
      if (url.pathname === '/te') socket.end(`HTTP/1.1 200 OK\r\nTransfer-Encoding: ${secret}, chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n`)
      else socket.end(`HTTP/1.1 200 OK\r\nTransfer-Encoding: ${secret}\r\n\r\nbody`)
      return true
    },
  })
  const injectors = [{ type: 'query', name: 'key' }, { type: 'bearer' }, { type: 'header', name: 'X-Key', format: 'K {token}' }]
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
    credentials: [{ id: 'echo', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: injectors[0] }],
  })
  const others = await Promise.all(
    injectors.slice(1).map((inject) =>
      startTestSidecar({
        policy: { default: 'allow' },
        network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
        credentials: [{ id: 'echo', audience: upstream.origin, source: 'static', secret: 'CANARY', inject }],
      }),
    ),
  )
  t.teardown(async () => {
    for (const x of [s, ...others]) await x.close()
    await upstream.close()
  })
  const lower = CANARY.toLowerCase()
  for (const [i, sidecar] of [s, ...others].entries()) {
    const seen: string[] = []
    for (const path of ['/te', '/te-chunked']) {
      const r = await rawRequest(sidecar.sidecar.port, `GET ${upstream.origin}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
      seen.push(r.raw)
      t.equal(r.status, 502, `${injectors[i]!.type} ${path}: refused`)
      t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /unregistered-encoded body/ }, `${injectors[i]!.type} ${path}: the coding is not quoted`)
    }
    const audit = JSON.stringify(await sidecar.audit())
    t.notOk([...seen, audit, ...sidecar.logs].some((x) => x.toLowerCase().includes(lower)), `${injectors[i]!.type}: the credential, in any case, is in no response, audit event or log line`)
    assertNoCanary(t, sidecar, ...seen)
  }
})
