// A Location that holds the credential split by a tab: the scrub reads it as written, but the
// agent's client reads it as a URL, and URL parsers (fetch's WHATWG one, Python's urlsplit) drop
// tabs, CR and LF. Followed, the secret came back to the agent as the response's URL.
import t, { type Test } from 'tap'
import type { ServerResponse } from 'node:http'
import { ProxyAgent, fetch } from 'undici'
import { REMOVED } from '../../proxy/forward/scrub.js'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startUpstream, startTestSidecar, loopbackPolicy, assertNoCanary, CANARY } from '../helpers/harness.js'

const run = promisify(execFile)

const cleanEnv = (extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv => {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return { ...env, ...extra }
}

t.test('a redirect echoing the credential with a tab in it is not relayed, for the query and the bearer injector', async (t) => {
  // Echoes whatever credential it was given, as a query parameter or a bearer token, tab-split.
  const handler: NonNullable<Parameters<typeof startUpstream>[0]>['handler'] = (req, res) => {
    const url = new URL(req.url, 'http://x')
    if (url.pathname !== '/tab') return false
    const secret = url.searchParams.get('key') ?? req.headers.authorization?.slice('Bearer '.length) ?? ''
    const split = `${secret.slice(0, 4)}\t${secret.slice(4)}`
    res.writeHead(302, { location: `/landed?key=${split}`, 'content-location': `/cl?key=${split}` }).end()
    return true
  }
  const query = await startUpstream({ handler })
  const bearer = await startUpstream({ handler })
  const s = await startTestSidecar({
    ...loopbackPolicy([query.port, bearer.port]),
    credentials: [
      { id: 'query', audience: query.origin, source: 'static', secret: 'CANARY', inject: { type: 'query', name: 'key' } },
      { id: 'bearer', audience: bearer.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await query.close()
    await bearer.close()
  })
  const env = cleanEnv({ HTTP_PROXY: s.proxy, http_proxy: s.proxy })
  const seen: string[] = []
  for (const up of [query, bearer]) {
    const fetchScript = `
      const { EnvHttpProxyAgent, fetch } = await import('undici')
      const res = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent(), redirect: 'manual' })
      console.log(res.status, res.headers.get('location'), res.headers.get('content-location'))
      const followed = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() }).catch((e) => ({ url: 'failed: ' + e.message }))
      console.log(followed.url)`
    const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, `${up.origin}/tab`], { env })
    seen.push(fetched.stdout)
    t.match(fetched.stdout, /^302 \[removed by latchkey[^\n]*\[removed by latchkey/, `${up.origin}: fetch is given neither URL`)
    const py = await run('python3', ['-c', 'import sys, urllib.request\ntry:\n  print(urllib.request.urlopen(sys.argv[1]).url)\nexcept Exception as e:\n  print("failed", e)', `${up.origin}/tab`], { env })
    seen.push(py.stdout)
    t.notMatch(py.stdout, /landed/, `${up.origin}: Python's urllib follows no secret`)
    t.notOk(up.requests.some((r) => r.url.startsWith('/landed')), `${up.origin}: no client followed the split secret`)
  }
  assertNoCanary(t, s, ...seen)
  t.notOk(seen.some((o) => o.includes(CANARY.slice(4))), 'not even the part after the tab reached the agent')
})

/** An upstream answering every call with `answer`, behind a sidecar that injects the credential as its `key` query parameter. */
async function queryKeyed(t: Test, answer: (url: URL, res: ServerResponse, origin: string) => void) {
  const upstream = await startUpstream({
    handler: (req, res) => {
      answer(new URL(req.url, 'http://x'), res, upstream.origin)
      return true
    },
  })
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    credentials: [{ id: 'query', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'query', name: 'key' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  return { upstream, s }
}

t.test('a pagination Link echoing a query credential is masked in place: a client follows rel=next through the sidecar, which puts the credential back', async (t) => {
  // GitLab (private_token) and Canvas (access_token) repeat the caller's query in their Link header.
  const { upstream, s } = await queryKeyed(t, (url, res, origin) => {
    const key = url.searchParams.get('key') ?? ''
    const page = Number(url.searchParams.get('page') ?? '1')
    const next = page < 3 ? { link: `<${origin}/items?page=${page + 1}&key=${key}>; rel="next", <${origin}/items?page=3&key=${key}>; rel="last"` } : {}
    res.writeHead(200, { 'content-type': 'application/json', ...next }).end(JSON.stringify({ page, keyed: key === CANARY }))
  })
  // Octokit's paginate: rel=next by regex, followed until there is none.
  const script = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    let url = process.argv[1]
    while (url) {
      const res = await fetch(url, { dispatcher: new EnvHttpProxyAgent() })
      console.log(JSON.stringify({ body: await res.json(), link: res.headers.get('link') }))
      url = /<([^<>]+)>;\\s*rel="next"/.exec(res.headers.get('link') ?? '')?.[1]
    }`
  const out = await run(process.execPath, ['--input-type=module', '-e', script, `${upstream.origin}/items`], { env: cleanEnv({ HTTP_PROXY: s.proxy }) })
  const pages = out.stdout.trim().split('\n').map((l) => JSON.parse(l) as { body: { page: number; keyed: boolean }; link: string | null })
  t.same(pages.map((p) => p.body), [1, 2, 3].map((page) => ({ page, keyed: true })), `every page followed, each with the credential injected: ${out.stderr}`)
  const mask = '*'.repeat(CANARY.length)
  t.equal(pages[0]?.link, `<${upstream.origin}/items?page=2&key=${mask}>; rel="next", <${upstream.origin}/items?page=3&key=${mask}>; rel="last"`, 'the credential masked where it was, the rest of the Link kept')
  assertNoCanary(t, s, out.stdout)
})

t.test('a URL holding the credential in another form than itself (base64) is replaced whole: masking it would leave its edges', async (t) => {
  const { upstream, s } = await queryKeyed(t, (url, res) => {
    const key = url.searchParams.get('key') ?? ''
    res.writeHead(302, { location: `/next?t=${Buffer.from(`Bearer ${key}`).toString('base64')}`, link: `</p2?key=${key}>; rel="next"` }).end()
  })
  const r = await fetch(`${upstream.origin}/go`, { dispatcher: new ProxyAgent(s.proxy), redirect: 'manual' })
  t.equal(r.headers.get('location'), REMOVED, 'base64 of the secret: the whole Location goes (masked, "QmVhcmVyIGNh…Zg==" decoded to its first and last characters)')
  t.equal(r.headers.get('link'), `</p2?key=${'*'.repeat(CANARY.length)}>; rel="next"`, 'the secret as itself is masked in place')
  assertNoCanary(t, s, JSON.stringify([...r.headers]))
})

t.test("a pagination Link echoing the credential with a tab in it is not relayed: clients follow rel=next as a URL", async (t) => {
  // An API building its next-page link from the URL it was called with, query credential and all.
  const { upstream, s } = await queryKeyed(t, (url, res) => {
    const secret = url.searchParams.get('key') ?? ''
    if (url.pathname === '/page') res.writeHead(200, { link: `</page2?key=${secret.slice(0, 4)}\t${secret.slice(4)}>; rel="next"` }).end('[]')
    else res.writeHead(404).end()
  })
  // Octokit's paginate: the rel=next URL by regex, then fetched.
  const script = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const first = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() })
    const next = /<([^<>]+)>;\\s*rel="next"/.exec(first.headers.get('link') ?? '')?.[1]
    console.log(first.headers.get('link'))
    if (next) console.log((await fetch(new URL(next, first.url), { dispatcher: new EnvHttpProxyAgent() })).url)`
  const out = await run(process.execPath, ['--input-type=module', '-e', script, `${upstream.origin}/page`], { env: cleanEnv({ HTTP_PROXY: s.proxy }) })
  t.match(out.stdout, /^\[removed by latchkey/, 'the Link is replaced')
  t.notOk(upstream.requests.some((r) => r.url.startsWith('/page2')), 'no client followed the split secret')
  assertNoCanary(t, s, out.stdout)
  t.notOk(out.stdout.includes(CANARY.slice(4)), 'not even the part after the tab reached the agent')
})
