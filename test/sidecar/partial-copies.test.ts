// Upstreams that quote the credential cut short (a debug page keeping a header's first N bytes,
// an error message quoting "the token eyJ…" short of its end, a log line begun mid-token), in a
// body or in the response head: a copy is overwritten (a header value replaced) once it shows all
// but 16 of a spelling's bytes (and three quarters of it), so what it leaves out cannot be guessed.
// Shorter copies (the prefix every token of a kind shares, an upstream's own `sk-…abcd` masking)
// go as they are.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { fetch, ProxyAgent } from 'undici'
import { BodyScrubber, compileNeedles, leastShown } from '../../proxy/forward/body-scrub.js'
import { REMOVED, revealsSecret } from '../../proxy/forward/scrub.js'
import { startBearerRig, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'
import { scrubParts } from '../helpers/scrub-parts.js'

const run = promisify(execFile)
const token = (n: number) => randomBytes(n).toString('base64url').slice(0, n)

/** The body through a fresh scrubber looking for `secret`, pushed in `parts`. */
const through = (secret: string, parts: readonly string[]) => scrubParts(compileNeedles([secret]), parts)

/** How many of the last bytes of `text` could begin `secret`: what the scrubber holds back at the end of a read. */
function couldBegin(secret: string, text: string): number {
  for (let k = text.length; k > 0; k--) if (secret.startsWith(text.slice(text.length - k))) return k
  return 0
}

t.test('the fewest bytes shown that are overwritten, by a spelling length', async (t) => {
  // Written out, not computed: a change to the rule has to change this table.
  const table: [number, number][] = [[4, 4], [8, 8], [9, 8], [12, 9], [20, 15], [24, 18], [30, 23], [32, 24], [48, 36], [64, 48], [100, 84], [800, 784]]
  for (const [length, least] of table) t.equal(leastShown(length), least, `${length} bytes: a copy of ${least} is overwritten`)
})

t.test('a copy cut short, begun late or both is overwritten from the fewest bytes that matter, and not below', async (t) => {
  const wrong: string[] = []
  let checked = 0
  for (const length of [12, 32, 64, 800]) {
    const secret = token(length)
    const least = leastShown(length)
    // Where the copy sits in the secret: its start, its end, or its middle.
    const cuts: Record<string, (shown: number) => string> = {
      'cut short': (shown) => secret.slice(0, shown),
      'begun late': (shown) => secret.slice(length - shown),
      'both ends cut': (shown) => secret.slice(Math.floor((length - shown) / 2), Math.floor((length - shown) / 2) + shown),
    }
    // Where the copy sits in the body: quoted in JSON, at the very end, or alone.
    const framings: Record<string, (copy: string) => [string, string]> = {
      'in JSON': (copy) => [`{"error":"invalid token ${copy}…","code":401}`, copy],
      'at the very end': (copy) => [`token=${copy}`, copy],
      'the whole body': (copy) => [copy, copy],
    }
    for (const [cutName, cut] of Object.entries(cuts)) {
      for (const shown of [length, length - 1, least, least - 1]) {
        if (shown < 1 || shown > length) continue
        const copy = cut(shown)
        for (const [frameName, frame] of Object.entries(framings)) {
          const [body] = frame(copy)
          const at = body.indexOf(copy)
          const overwritten = shown >= least
          // Whole, and cut in two at every place in and around the copy.
          for (let i = Math.max(0, at - 2); i <= Math.min(body.length, at + shown + 2); i += length > 100 ? 37 : 1) {
            // The agent gets what came before the cut of a copy that could not yet be told from
            // other text (fewer than `least` bytes, not the secret's start): the rest is overwritten.
            // (Less the end of that part that could begin the secret: it waits, as any such tail does.)
            const early = i > at && i < at + shown && i - at < least ? i - at - couldBegin(secret, copy.slice(0, i - at)) : 0
            const expected = overwritten ? body.slice(0, at + early) + '*'.repeat(shown - early) + body.slice(at + shown) : body
            const got = through(secret, [body.slice(0, i), body.slice(i)])
            checked++
            if (got.out !== expected || got.found !== (overwritten ? 1 : 0)) wrong.push(`${length}-byte secret, ${cutName}, ${shown} shown, ${frameName}, cut at ${i}: ${got.found} found, ${got.out}`)
          }
        }
      }
    }
  }
  t.same(wrong, [], `${checked} bodies: every copy of at least leastShown bytes overwritten whole, counted once; every shorter one untouched`)
  t.ok(checked > 1000)
})

t.test('what every token of a kind shares, and an upstream that masks the middle, are left as they are', async (t) => {
  const secret = `sk-proj-${token(156)}`
  const other = `sk-proj-${token(156)}`
  const jwt = (sub: string) => `${Buffer.from('{"alg":"RS256","typ":"JWT","kid":"k1"}').toString('base64url')}.${Buffer.from(JSON.stringify({ iss: 'https://broker', sub, aud: 'api' })).toString('base64url')}.${token(342)}`
  const mine = jwt('user-1')
  const cases: [string, string, string][] = [
    ['another key of the same kind', secret, `{"data":[{"key":"${other}"}]}`],
    ["the upstream's own masking of this key", secret, `Incorrect API key provided: ${secret.slice(0, 12)}${'*'.repeat(20)}${secret.slice(-4)}`],
    ["another token from the same broker, its header and payload's start shared", mine, `{"id_token":"${jwt('user-2')}"}`],
    ['another token for the same user: all but the signature shared', mine, `{"access_token":"${jwt('user-1')}"}`],
    ["a key of the same kind, its 8-byte prefix shared", `sk_live_${token(24)}`, `{"key":"sk_live_${token(24)}"}`],
  ]
  for (const [name, s, body] of cases) {
    const got = through(s, [body])
    t.equal(got.out, body, `${name}: unchanged`)
    t.equal(got.found, 0, `${name}: nothing counted`)
  }
  const signatureDropped = mine.slice(0, mine.lastIndexOf('.'))
  t.ok(signatureDropped.length < leastShown(mine.length), 'a JWT without its signature shows less than leastShown of it')
  t.equal(through(mine, [`claims: ${signatureDropped}`]).out, `claims: ${signatureDropped}`, "so a JWT's header and claims, quoted without the signature, pass")
})

t.test('a copy that reaches the end of a read waits for the next: overwritten whole however the stream is cut', async (t) => {
  const secret = token(64)
  const least = leastShown(64)
  const copy = secret.slice(0, 60)
  const body = `a ${copy} b`
  const expected = `a ${'*'.repeat(60)} b`
  const wrong: string[] = []
  for (let i = 1; i < body.length; i++) {
    for (let j = i + 1; j < body.length; j += 7) {
      const got = through(secret, [body.slice(0, i), body.slice(i, j), body.slice(j)])
      if (got.out !== expected || got.found !== 1) wrong.push(`cut at ${i} and ${j}: ${got.found} found, ${got.out}`)
    }
  }
  t.same(wrong, [], `a ${copy.length}-byte copy (${least} overwrite it) cut in three every way: overwritten whole, counted once`)

  const s = new BodyScrubber(compileNeedles([secret]))
  t.equal(s.push(Buffer.from(`x ${secret.slice(10, 10 + least)}`))?.toString(), 'x ', 'a copy long enough, begun late, reaching the end: it waits')
  t.equal(s.push(Buffer.from(`${secret.slice(10 + least, 64)}!`))?.toString(), `${'*'.repeat(64 - 10)}!`, 'and is overwritten whole, with what continued it')
})

t.test('through the sidecar: an upstream quoting the header cut short gives the agent nothing that matters', async (t) => {
  // The bearer rig's secret is CANARY, 32 bytes: copies of 16 or more are overwritten.
  const least = leastShown(CANARY.length)
  const { upstream, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const m = /^\/cut\/(\d+)(\/split)?$/.exec(req.url)
      if (!m) return false
      const shown = String(req.headers.authorization ?? '').slice(0, 'Bearer '.length + Number(m[1]))
      res.writeHead(200, { 'content-type': 'application/json' })
      if (m[2]) {
        // Two writes 30 ms apart: the copy reaches the sidecar in two reads.
        res.write(`{"seen":"${shown.slice(0, 15)}`)
        setTimeout(() => res.end(`${shown.slice(15)}"}`), 30)
      } else res.end(`{"seen":"${shown}"}`)
      return true
    },
  })
  const agent = new ProxyAgent(s.proxy)
  t.teardown(() => agent.close())
  const seen: string[] = []
  for (const shown of [CANARY.length - 1, CANARY.length - 6, least]) {
    for (const split of ['', '/split']) {
      const body = await (await fetch(`http://127.0.0.1:${upstream.port}/cut/${shown}${split}`, { dispatcher: agent })).text()
      seen.push(body)
      t.equal(body, `{"seen":"Bearer ${'*'.repeat(shown)}"}`, `${shown} of ${CANARY.length} bytes shown${split ? ', in two writes' : ''}: every one overwritten`)
    }
  }
  const short = await (await fetch(`http://127.0.0.1:${upstream.port}/cut/${least - 1}`, { dispatcher: agent })).text()
  t.equal(short, `{"seen":"Bearer ${CANARY.slice(0, least - 1)}"}`, `${least - 1} bytes shown: relayed as sent (half the secret's hex unknown)`)
  const curl = await run('curl', ['-s', '-x', s.proxy, `http://127.0.0.1:${upstream.port}/cut/${CANARY.length - 1}/split`])
  seen.push(curl.stdout)
  t.equal(curl.stdout, `{"seen":"Bearer ${'*'.repeat(CANARY.length - 1)}"}`, 'curl gets the same')
  const warned = s.logs.filter((l) => l.includes('sent the injected credential back in a response body'))
  t.equal(warned.length, 7, 'each call quoting enough of it is logged for the operator, and the short one is not')
  assertNoCanary(t, s, ...seen)
  t.notOk(seen.some((b) => b.includes(CANARY.slice(0, least))), `no body the agent saw holds ${least} of the secret's bytes in a row`)
})

t.test('many credentials held (the one-pass scan): a copy cut short of any of them is overwritten the same way', async (t) => {
  const secrets = Array.from({ length: 120 }, () => token(64))
  const n = compileNeedles(secrets)
  t.not(n.index, null, `${n.needles.length} needles: scanned in one pass`)
  const least = leastShown(64)
  const wrong: string[] = []
  for (const secret of [secrets[0]!, secrets[57]!, secrets[119]!]) {
    for (const [copy, overwritten] of [[secret.slice(0, 63), true], [secret.slice(64 - least), true], [secret.slice(3, 3 + least), true], [secret.slice(0, least - 1), false]] as const) {
      const body = `{"seen":"${copy}"}`
      const expected = overwritten ? `{"seen":"${'*'.repeat(copy.length)}"}` : body
      for (let i = 1; i < body.length; i += 5) {
        // As above: what came before a cut inside a copy not yet long enough goes, less what could begin a secret.
        const { out, found } = scrubParts(n, [body.slice(0, i), body.slice(i)])
        const first = copy.slice(0, Math.max(0, i - 9))
        const early = overwritten && first.length > 0 && first.length < Math.min(least, copy.length) ? first.length - Math.max(...secrets.map((x) => couldBegin(x, first))) : 0
        const want = overwritten ? `{"seen":"${copy.slice(0, early)}${'*'.repeat(copy.length - early)}"}` : expected
        if (out !== want || found !== (overwritten ? 1 : 0)) wrong.push(`${copy.length} shown, cut at ${i}: ${found} found, ${out}`)
      }
    }
  }
  t.same(wrong, [], 'every copy of leastShown bytes or more of any held token overwritten, however cut; a shorter one untouched')
})

t.test('through the sidecar: a response head quoting the header cut short has that value replaced, the rest kept', async (t) => {
  const least = leastShown(CANARY.length)
  const { upstream, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const m = /^\/head\/(\d+)$/.exec(req.url)
      if (!m) return false
      const cut = CANARY.slice(0, Number(m[1]))
      res.statusMessage = `Refused ${cut}`
      res.writeHead(401, {
        'x-debug-auth': `Bearer ${cut}`,
        'www-authenticate': `Bearer error="invalid_token", error_description="the token ${cut}... has expired"`,
        'x-debug-pct': encodeURIComponent(`"${cut}"`),
        location: `https://login.example/retry?last=${cut}`,
        'x-plain': 'kept',
      }).end()
      return true
    },
  })
  const seen: string[] = []
  for (const shown of [CANARY.length - 1, least]) {
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/head/${shown} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    seen.push(r.raw)
    t.match(r.raw, /^HTTP\/1\.1 401 Unauthorized\r\n/, `${shown} shown: the reason phrase quoting it is replaced by the standard one`)
    for (const h of ['x-debug-auth', 'www-authenticate', 'x-debug-pct', 'location']) t.equal(r.headers[h], REMOVED, `${shown} shown: ${h} replaced`)
    t.equal(r.headers['x-plain'], 'kept')
  }
  const short = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/head/${least - 1} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(short.headers['x-debug-auth'], `Bearer ${CANARY.slice(0, least - 1)}`, `${least - 1} shown: relayed as sent`)
  t.match(short.raw, /^HTTP\/1\.1 401 Refused /, 'the reason phrase too')
  assertNoCanary(t, s, ...seen)
  t.notOk(seen.some((b) => b.includes(CANARY.slice(0, least))), `no head the agent saw holds ${least} of the secret's bytes in a row`)
})

t.test("a server's error text quoting a secret the sidecar sent, cut short, is withheld like a whole one", async (t) => {
  const secret = token(48)
  const least = leastShown(48)
  t.ok(revealsSecret(`invalid_client: secret ${secret.slice(0, 47)}`, [secret]), 'short of one character')
  t.ok(revealsSecret(`{"error":"bad secret ${secret.slice(48 - least)}"}`, [secret]), `begun late, ${least} shown`)
  t.ok(revealsSecret(`bad credentials ${Buffer.from(`svc:${secret}`).toString('base64').slice(0, 60)}`, [{ value: secret, within: [`svc:${secret}`] }]), 'the base64 of the text it was sent in, cut short')
  t.notOk(revealsSecret(`invalid_client: secret ${secret.slice(0, least - 1)}…`, [secret]), `${least - 1} shown: not a reveal`)
})

/** The longest run of `secret`'s bytes, in order, anywhere in `text`: what the agent could read of it. */
function longestRun(text: string, secret: string): number {
  let best = 0
  for (let i = 0; i < text.length; i++) {
    for (let j = 0; j < secret.length; j++) {
      let k = 0
      while (i + k < text.length && j + k < secret.length && text[i + k] === secret[j + k]) k++
      if (k > best) best = k
    }
  }
  return best
}

t.test('a tail that continues a copy begun late is never let go by the pause timer', async (t) => {
  const least = leastShown(32)
  // A random token whose copy's start ends in no beginning of the token (`…Hri` for `ie1K…`): such
  // a last byte would rightly wait as a copy that may begin there, not go with the chunk.
  let secret = token(32)
  const beginsAgain = (x: string) => [...Array(x.length).keys()].some((k) => secret.startsWith(x.slice(k)))
  while (beginsAgain(`echo: ${secret.slice(1, least)}`)) secret = token(32)
  const s = new BodyScrubber(compileNeedles([secret]))
  // The start of the copy is one short of mattering, and not the secret's start: it goes.
  t.equal(s.push(Buffer.from(`echo: ${secret.slice(1, least)}`))?.toString(), `echo: ${secret.slice(1, least)}`)
  t.equal(s.push(Buffer.from(secret.slice(least, least + 3))), null, 'the bytes that make it long enough wait')
  t.notOk(s.releasable, 'and are not let go when the body pauses, though fewer than RELEASE_MAX')
  t.equal(s.release(), null)
  t.equal(s.end()?.toString(), '***', 'at the end they are overwritten')

  // Through the sidecar, a model-like stream: the secret from its second byte, one byte every 30 ms.
  const { upstream, s: sidecar } = await startBearerRig(t, {
    handler: (req, res) => {
      if (req.url !== '/drip') return false
      const auth = String(req.headers.authorization ?? '').slice('Bearer '.length)
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write('echo: ')
      let i = 1
      const drip = setInterval(() => {
        if (i < auth.length) res.write(auth[i++]!)
        else {
          clearInterval(drip)
          res.end(' done')
        }
      }, 30)
      res.once('close', () => clearInterval(drip))
      return true
    },
  })
  const agent = new ProxyAgent(sidecar.proxy)
  t.teardown(() => agent.close())
  const body = await (await fetch(`http://127.0.0.1:${upstream.port}/drip`, { dispatcher: agent })).text()
  const shown = longestRun(body, CANARY)
  t.ok(shown < leastShown(CANARY.length), `the agent read ${shown} of the secret's bytes in a row, fewer than ${leastShown(CANARY.length)}`)
  t.match(body, / done$/, 'and the body ends as sent')
  assertNoCanary(t, sidecar, body)
})

t.test('a header name holding a copy cut short, in any letter case, is dropped', async (t) => {
  const least = leastShown(CANARY.length)
  const { upstream, s } = await startBearerRig(t, {
    handler: (req, res) => {
      const m = /^\/name\/(\d+)$/.exec(req.url)
      if (!m) return false
      // CANARY is `LKCANARY` and lower-case hex: node:http lower-cases the name the sidecar reads.
      res.writeHead(200, { [`X-${CANARY.slice(0, Number(m[1]))}`]: '1', 'x-plain': 'kept' }).end()
      return true
    },
  })
  for (const shown of [CANARY.length - 1, least]) {
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/name/${shown} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    t.same(Object.keys(r.headers).filter((h) => h.startsWith('x-')), ['x-plain'], `${shown} bytes of it in a name: that header is dropped, the rest kept`)
    t.notOk(r.raw.toLowerCase().includes(CANARY.slice(0, least).toLowerCase()), 'nothing of it in the head')
  }
  const short = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/name/${least - 1} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.ok(`x-${CANARY.slice(0, least - 1).toLowerCase()}` in short.headers, `${least - 1} bytes: relayed`)
})
