// Every reverse route lives on one cookie origin, the sidecar's host (cookies ignore the port).
// A cookie one route's upstream scopes to its `/` was relayed as it came, and the agent's cookie
// jar sent it on to every other route: another upstream, perhaps another company's. Now each is
// put under its own route (proxy/forward/route-cookie.ts), for real clients with real jars.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { createHash } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Socket } from 'node:net'
import { ProxyAgent, fetch as undiciFetch } from 'undici'
import { startUpstream, startTestSidecar, rawRequest, type Upstream } from '../helpers/harness.js'

const run = promisify(execFile)

const cleanEnv = (): NodeJS.ProcessEnv => {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return env
}

const SECRET = 'upstream-session-' + Math.random().toString(36).slice(2)
const LOGIN_COOKIES = [`upsess=${SECRET}; Path=/; HttpOnly`, 'pref=dark', 'wide=1; Domain=127.0.0.1; Path=/']

/** The upstream behind route `app`: `/login` sets cookies, `/bad` sets one no rewrite can trust. */
async function appUpstream(): Promise<Upstream> {
  const up = await startUpstream({
    handler: (req, res) => {
      const path = new URL(req.url, 'http://x').pathname
      if (path === '/login') res.setHeader('set-cookie', LOGIN_COOKIES)
      else if (path === '/bad') res.setHeader('set-cookie', ['ok=1; Path=/', `bad value=${SECRET}; Path=/`])
      else return false
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok')
      return true
    },
  })
  // A WebSocket handshake answered with a cookie.
  up.server.on('upgrade', (req, socket: Socket) => {
    const accept = createHash('sha1').update(`${String(req.headers['sec-websocket-key'])}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nSet-Cookie: ws=${SECRET}; Path=/\r\n\r\n`)
    socket.end()
  })
  return up
}

const cookiesAt = (up: Upstream, prefix = ''): string[] => up.requests.filter((r) => r.url.startsWith(prefix)).map((r) => String(r.headers.cookie ?? ''))

t.test("a cookie from one route's upstream is sent back to that route, and to no other", async (t) => {
  const app = await appUpstream()
  const other = await startUpstream()
  const ports = [app.port, other.port]
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'loopback', action: 'allow', hosts: ['127.0.0.1'], ports }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports }] },
    // `app2`: a route whose name has `app` as a prefix; `billing`: any other.
    routes: { app: app.origin, app2: other.origin, billing: other.origin },
  })
  t.teardown(async () => {
    await s.close()
    await Promise.all([app.close(), other.close()])
  })
  const lk = `http://127.0.0.1:${s.sidecar.port}`

  // The standard library's cookie jar, the one requests.Session keeps its cookies in (requests itself is not on a fresh machine).
  await t.test("Python's http.cookiejar (urllib; requests.Session's jar)", async (t) => {
    app.requests.length = other.requests.length = 0
    const script = `
import json, sys, urllib.request, urllib.error, http.cookiejar
jar = http.cookiejar.CookieJar()
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
base = sys.argv[1]
def get(path):
    try:
        opener.open(base + path).read()
    except urllib.error.HTTPError as e:
        e.read()
get('/app/login')
for p in ('/app2/x', '/billing/x', '/billing', '/app2'):
    get(p)
get('/app/whoami')
get('/app')
print(json.dumps(sorted([c.name, c.path] for c in jar)))`
    const out = await run('python3', ['-c', script, lk], { env: cleanEnv() })
    t.same(JSON.parse(out.stdout), [['pref', '/app/'], ['upsess', '/app/'], ['wide', '/app/']], 'every cookie stored under /app/, host-only')
    t.equal(other.requests.length, 4, 'the other routes were called')
    t.same(cookiesAt(other), ['', '', '', ''], 'no route but app was sent its cookies')
    t.match(cookiesAt(app, '/whoami')[0], new RegExp(`upsess=${SECRET}`), 'sent back to app')
    t.match(cookiesAt(app, '/whoami')[0], /pref=dark/, 'a cookie that had no Path too')
  })

  await t.test("Node's fetch, with an RFC 6265 jar and with a jar matching paths by prefix alone (Java's CookieManager)", async (t) => {
    for (const match of [(req: string, path: string) => req === path || (req.startsWith(path) && (path.endsWith('/') || req[path.length] === '/')), (req: string, path: string) => req.startsWith(path)]) {
      app.requests.length = other.requests.length = 0
      const jar: Array<{ name: string; value: string; path: string }> = []
      const call = async (path: string) => {
        const cookie = jar.filter((c) => match(path, c.path)).map((c) => `${c.name}=${c.value}`).join('; ')
        const res = await fetch(lk + path, { headers: cookie ? { cookie } : {} })
        await res.arrayBuffer()
        for (const sc of res.headers.getSetCookie()) {
          const [pair, ...attrs] = sc.split(';').map((x) => x.trim())
          const [name, value] = [pair!.slice(0, pair!.indexOf('=')), pair!.slice(pair!.indexOf('=') + 1)]
          const path = attrs.find((a) => a.toLowerCase().startsWith('path='))?.slice(5) ?? '/'
          jar.push({ name, value, path })
        }
      }
      await call('/app/login')
      for (const p of ['/app2/x', '/billing/x', '/app2']) await call(p)
      await call('/app/whoami')
      t.same(cookiesAt(other), ['', '', ''], 'no other route was sent a cookie')
      t.match(cookiesAt(app, '/whoami')[0], new RegExp(`upsess=${SECRET}; pref=dark; wide=1`), 'all three sent back to app')
    }
  })

  await t.test('curl -c/-b', async (t) => {
    app.requests.length = other.requests.length = 0
    const jar = join(mkdtempSync(join(tmpdir(), 'lk-jar-')), 'jar')
    for (const p of ['/app/login', '/app2/x', '/billing/x', '/app/whoami']) await run('curl', ['-sS', '-o', '/dev/null', '-c', jar, '-b', jar, lk + p], { env: cleanEnv() })
    t.same(cookiesAt(other), ['', ''], 'no other route was sent a cookie')
    t.match(cookiesAt(app, '/whoami')[0], new RegExp(`upsess=${SECRET}`), 'sent back to app')
  })

  await t.test('an HTTP_PROXY client naming the route in absolute-form, and a WebSocket handshake, are scoped alike', async (t) => {
    const abs = await rawRequest(s.sidecar.port, `GET ${lk}/app/login HTTP/1.1\r\nHost: 127.0.0.1:${s.sidecar.port}\r\nConnection: close\r\n\r\n`)
    t.match(abs.raw, new RegExp(`\r\nset-cookie: upsess=${SECRET}; HttpOnly; Path=/app/\r\n`, 'i'))
    t.notMatch(abs.raw, /Path=\/(\r|;)/i, 'no cookie left on /')
    const ws = await rawRequest(s.sidecar.port, `GET /app/ws HTTP/1.1\r\nHost: 127.0.0.1:${s.sidecar.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`)
    t.equal(ws.status, 101)
    t.match(ws.raw, new RegExp(`\r\nSet-Cookie: ws=${SECRET}; Path=/app/\r\n`))
  })

  await t.test('a Set-Cookie that cannot be scoped is dropped, and the operator told why without its value', async (t) => {
    const r = await fetch(`${lk}/app/bad`)
    t.same(r.headers.getSetCookie(), ['ok=1; Path=/app/'])
    const line = s.logs.find((l) => l.includes('could not be scoped'))
    t.ok(line, 'a warning logged')
    t.match(line, /"route":"app"/)
    t.notOk(s.logs.some((l) => l.includes(SECRET)), 'no log line holds a cookie value')
  })

  await t.test("absolute-form to the upstream's own origin: its cookies are its own origin's, as they came", async (t) => {
    const r = await undiciFetch(`${app.origin}/login`, { dispatcher: new ProxyAgent(s.proxy) })
    t.same(r.headers.getSetCookie(), LOGIN_COOKIES)
  })
})
