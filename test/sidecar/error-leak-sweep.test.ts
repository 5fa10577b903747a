// The whole-category leak check: every refusal the sidecar can be driven to from outside, caused
// for real with a canary in every place a credential lives (the four static injectors, the task
// handle, the agent's own Authorization, Cookie and X-Api-Key, userinfo and query parameters in
// the URL it sends, the upstream's echoes of what was injected), then every output grepped for
// every spelling of every one: bodies and status lines, log lines, the audit file, /metrics,
// /healthz, /readyz and the task API. One sidecar serves the whole table. The codes only a
// broker, control stream, caller check or a drain can cause (CREDENTIAL_REFUSED/UNAVAILABLE,
// REVOKED, CALLER_DENIED, DRAINING, UPSTREAM_LIMIT, DNS_BUSY/TIMEOUT, AUDIT_UNAVAILABLE) are
// not caused here: each needs a rig of its own (token-faults and control/faults grep theirs).
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { readFileSync, existsSync } from 'node:fs'
import { startUpstream, startTestSidecar, rawRequest, openTask, loopbackPolicy, CANARY, type RawResponse } from '../helpers/harness.js'
import { SPELLINGS, holds } from '../helpers/spellings.js'
import { clientHello } from '../helpers/client-hello.js'

// Every secret begins with the canary: a plain copy of any of them is a copy of CANARY.
const HEADER_SECRET = `${CANARY}hdr`
const QUERY_SECRET = `${CANARY}q+/=`
const BASIC_SECRET = `${CANARY}bas`
const AGENT_AUTH = `${CANARY}agentauth`
const AGENT_COOKIE = `${CANARY}cookie`
const AGENT_KEY = `${CANARY}apikey`
const URL_PASSWORD = `${CANARY}urlpw`

t.test('no refusal, of any code, shows a credential in any spelling anywhere', async (t) => {
  // Echoes what it was sent, everywhere an answer can carry it; /garbage answers with bytes no HTTP parser takes.
  const echo = await startUpstream({
    handler: (req, res) => {
      const said = JSON.stringify(req.headers) + req.url
      if (req.url.startsWith('/garbage')) {
        res.socket!.end(`HTTP/1.1 200 OK\r\nX-Echo: ${said.replace(/[\r\n]/g, '')}\r\nBad Header ${said}\r\n\r\n`)
        return true
      }
      if (req.url.startsWith('/hang')) return true
      const auth = String(req.headers.authorization ?? req.headers['x-api-key'] ?? '')
      res.writeHead(401, {
        'www-authenticate': `Bearer error="invalid_token", error_description="${auth}"`,
        'set-cookie': `s=${encodeURIComponent(auth)}`,
        location: `http://127.0.0.1:1/cb?${new URL(req.url, 'http://x').search.slice(1)}`,
        'content-type': 'application/json',
      })
      res.end(said)
      return true
    },
  })
  const closed = await startUpstream()
  await closed.close()
  const ports = [echo.port, closed.port]
  const env = { LATCHKEY_SECRET_HDR: HEADER_SECRET, LATCHKEY_SECRET_QRY: QUERY_SECRET, LATCHKEY_SECRET_BAS: BASIC_SECRET }
  const s = await startTestSidecar(
    {
      ...loopbackPolicy(ports),
      policy: {
        default: 'deny',
        rules: [
          { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1', 'localhost', 'nowhere.invalid'], ports: [...ports, 9] },
        ],
      },
      routes: { up: echo.origin },
      sidecar: { timeouts: { client_headers_ms: 300, body_ms: 300, headers_ms: 400 } },
      credentials: [
        { id: 'bearer', audience: echo.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
        { id: 'header', audience: `http://localhost:${echo.port}`, source: 'static', secret: 'HDR', inject: { type: 'header', name: 'X-Api-Key', format: 'Key {token}' } },
        { id: 'query', audience: closed.origin, source: 'static', secret: 'QRY', inject: { type: 'query', name: 'key' } },
        { id: 'basic', audience: `http://localhost:${closed.port}`, source: 'static', secret: 'BAS', inject: { type: 'basic', username: 'u' } },
      ],
    },
    env,
  )
  t.teardown(async () => {
    await s.close()
    await echo.close()
  })
  const task = await openTask(s, 'leak sweep')
  const ended = await openTask(s, 'ended')

  const secrets: Record<string, string> = {
    'bearer secret': CANARY,
    'header secret': HEADER_SECRET,
    'header as formatted': `Key ${HEADER_SECRET}`,
    'query secret': QUERY_SECRET,
    'basic secret': BASIC_SECRET,
    'basic pair': `u:${BASIC_SECRET}`,
    'task handle': task.handle,
    'ended task handle': ended.handle,
    'task pair': `task:${task.handle}`,
    'agent authorization': AGENT_AUTH,
    'agent cookie': AGENT_COOKIE,
    'agent api key': AGENT_KEY,
    'url password': URL_PASSWORD,
  }
  const spellings: Record<string, (s: string) => string> = {
    ...SPELLINGS,
    'upper-case hex': (x) => Buffer.from(x).toString('hex').toUpperCase(),
    'lower-cased': (x) => x.toLowerCase(),
    'upper-cased': (x) => x.toUpperCase(),
  }
  // The agent's own (its headers, its URL, its task handle): an upstream may echo those back to
  // it, but nothing the sidecar writes may repeat them.
  const agentOwn = new Set(['task handle', 'ended task handle', 'task pair', 'agent authorization', 'agent cookie', 'agent api key', 'url password'])
  /** Every secret × spelling `output` holds (only the injected ones, `injectedOnly`). */
  const leaks = (output: string, injectedOnly = false): string[] => {
    const found: string[] = []
    const names = Object.keys(secrets).filter((n) => !(injectedOnly && agentOwn.has(n)))
    for (const name of names) {
      const secret = secrets[name]!
      for (const [how, spell] of Object.entries(spellings)) if (holds(output, spell(secret))) found.push(`${name} (${how})`)
    }
    // base64 of a pair at any alignment: its middle third survives whatever precedes it.
    for (const name of names) {
      const secret = secrets[name]!
      for (let shift = 0; shift < 3; shift++) {
        const b64 = Buffer.from('x'.repeat(shift) + secret).toString('base64').slice(4 + shift, -4)
        if (b64.length >= 16 && output.includes(b64)) found.push(`${name} (base64 at offset ${shift})`)
      }
    }
    return [...new Set(found)]
  }

  const agentHeaders =
    `Proxy-Authorization: ${task.proxyAuthorization}\r\nAuthorization: Bearer ${AGENT_AUTH}\r\nCookie: session=${AGENT_COOKIE}\r\nX-Api-Key: ${AGENT_KEY}\r\n`
  const port = s.sidecar.port
  const get = (url: string, extra = '', method = 'GET') => `${method} ${url} HTTP/1.1\r\nHost: x\r\n${agentHeaders}${extra}Connection: close\r\n\r\n`
  const echoUrl = (host: string, path: string) => `http://${host}:${echo.port}${path}?key=${encodeURIComponent(QUERY_SECRET)}&token=${AGENT_AUTH}`

  /** [case, the code it must meet, how to cause it]. */
  const cases: [string, string, () => Promise<RawResponse>][] = [
    ['a host the policy denies', 'LK_POLICY_DENIED', () => rawRequest(port, get(`http://denied.invalid/admin?key=${QUERY_SECRET}&token=${AGENT_AUTH}`))],
    ['a port the network denies', 'LK_NETWORK_DENIED', () => rawRequest(port, get(`http://127.0.0.1:9/?key=${QUERY_SECRET}`))],
    ['userinfo in the URL', 'LK_BAD_REQUEST', () => rawRequest(port, get(`http://u:${URL_PASSWORD}@127.0.0.1:${echo.port}/`))],
    ['userinfo, percent-encoded', 'LK_BAD_REQUEST', () => rawRequest(port, get(`http://u:${encodeURIComponent(URL_PASSWORD)}%40@127.0.0.1:${echo.port}/`))],
    ['TRACE with the agent headers', 'LK_BAD_REQUEST', () => rawRequest(port, get(echoUrl('127.0.0.1', '/'), '', 'TRACE'))],
    ['a bad percent-encoding', 'LK_BAD_REQUEST', () => rawRequest(port, get(`http://127.0.0.1:${echo.port}/a%zz?k=${AGENT_AUTH}`))],
    ['an Upgrade that is no WebSocket, naming a secret', 'LK_BAD_REQUEST', () => rawRequest(port, get(echoUrl('127.0.0.1', '/'), `Upgrade: ${AGENT_AUTH}\r\nConnection: upgrade\r\n`))],
    ['an Upgrade to a registered protocol', 'LK_BAD_REQUEST', async () => {
      const r = await rawRequest(port, get(echoUrl('127.0.0.1', '/'), 'Upgrade: TLS/1.2\r\nConnection: upgrade\r\n'))
      t.match(JSON.parse(r.body).reason, /^upgrade to "tls\/1\.2" is not supported/, 'a registered name is named back')
      return r
    }],
    ['a Destination no policy can judge', 'LK_BAD_REQUEST', () => rawRequest(port, get(echoUrl('127.0.0.1', '/'), `Destination: http://u:${URL_PASSWORD}@127.0.0.1:${echo.port}/x\r\n`, 'COPY'))],
    ['a malformed chunked body', 'LK_BAD_REQUEST', () => rawRequest(port, `POST ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\n${agentHeaders}Transfer-Encoding: chunked\r\n\r\nzz${AGENT_AUTH}\r\n`)],
    ['a request line the parser refuses', 'LK_BAD_REQUEST', () => rawRequest(port, `GET http://127.0.0.1:${echo.port}/${AGENT_AUTH} HTTP/1.1 ${AGENT_AUTH}\r\n${agentHeaders}\r\n`)],
    ['an Expect it cannot meet', 'LK_EXPECTATION_FAILED', () => rawRequest(port, get(echoUrl('127.0.0.1', '/'), `Expect: ${AGENT_AUTH}\r\n`))],
    ['headers too large', 'LK_HEADERS_TOO_LARGE', () => rawRequest(port, get(echoUrl('127.0.0.1', '/'), `X-Big: ${AGENT_AUTH.repeat(3000)}\r\n`))],
    ['an origin-form path naming no route', 'LK_NO_ROUTE', () => rawRequest(port, `GET /${AGENT_AUTH}/v1/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: 127.0.0.1\r\n${agentHeaders}Connection: close\r\n\r\n`)],
    ['a route asked by a page on another host', 'LK_FOREIGN_ORIGIN', () => rawRequest(port, `GET /up/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n${agentHeaders}Connection: close\r\n\r\n`)],
    ['a Proxy-Authorization naming no task', 'LK_PROXY_AUTH', () => rawRequest(port, `GET ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic ${Buffer.from(`task:${AGENT_AUTH}`).toString('base64')}\r\nConnection: close\r\n\r\n`)],
    ['a Proxy-Authorization of another scheme', 'LK_PROXY_AUTH', () => rawRequest(port, `GET ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer ${AGENT_AUTH}\r\nConnection: close\r\n\r\n`)],
    ['a task ended under its call', 'LK_TASK_ENDED', async () => {
      const asked = echo.requests.length
      const answer = rawRequest(port, `GET ${echoUrl('127.0.0.1', '/hang')} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: ${ended.proxyAuthorization}\r\nConnection: close\r\n\r\n`)
      while (echo.requests.length === asked) await new Promise((r) => setTimeout(r, 5))
      await fetch(`${s.sidecar.adminUrl}/v1/tasks/${encodeURIComponent(ended.handle)}`, { method: 'DELETE' })
      return answer
    }],
    ['the ended task named again', 'LK_PROXY_AUTH', () => rawRequest(port, `GET ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: ${ended.proxyAuthorization}\r\nConnection: close\r\n\r\n`)],
    ['a host that does not resolve', 'LK_DNS_FAILED', () => rawRequest(port, get(`http://nowhere.invalid:${echo.port}/?key=${AGENT_AUTH}`))],
    ['an upstream not listening (query injected)', 'LK_UPSTREAM_UNREACHABLE', () => rawRequest(port, get(`http://127.0.0.1:${closed.port}/x?key=${AGENT_AUTH}`))],
    ['an upstream not listening (basic injected)', 'LK_UPSTREAM_UNREACHABLE', () => rawRequest(port, get(`http://localhost:${closed.port}/x?key=${AGENT_AUTH}`))],
    ['an upstream answering garbage that echoes the credential', 'LK_UPSTREAM_PROTOCOL', () => rawRequest(port, get(echoUrl('127.0.0.1', '/garbage')))],
    ['the same through the header injector', 'LK_UPSTREAM_PROTOCOL', () => rawRequest(port, get(echoUrl('localhost', '/garbage')))],
    ['an upstream that never answers', 'LK_UPSTREAM_TIMEOUT', () => rawRequest(port, get(echoUrl('127.0.0.1', '/hang')))],
    ['https to a port that speaks plain HTTP', 'LK_UPSTREAM_TLS', () => rawRequest(port, get(`https://127.0.0.1:${echo.port}/?key=${AGENT_AUTH}`))],
    ['a request head that never ends', 'LK_REQUEST_TIMEOUT', () => rawRequest(port, `GET ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\n${agentHeaders}`)],
    ['a request body that stops', 'LK_IDLE_TIMEOUT', () => rawRequest(port, `POST ${echoUrl('127.0.0.1', '/')} HTTP/1.1\r\nHost: x\r\n${agentHeaders}Content-Length: 100\r\n\r\n${AGENT_AUTH}`)],
    ['an upstream that echoes every injected credential (header injector)', '', () => rawRequest(port, get(echoUrl('localhost', '/echo')))],
    ['an upstream that echoes every injected credential (bearer, on a route)', '', () => rawRequest(port, `GET /up/echo?key=${AGENT_AUTH} HTTP/1.1\r\nHost: 127.0.0.1\r\n${agentHeaders}Connection: close\r\n\r\n`)],
  ]
  const seen: string[] = []
  for (const [name, code, cause] of cases) {
    const r = await cause()
    if (code === '') {
      // Relayed: the upstream's own answer, its echoes of what the agent sent kept, the injected masked.
      t.equal(r.status, 401, `${name}: relayed`)
      t.same(leaks(r.raw, true), [], `${name}: the answer holds no injected credential`)
      continue
    }
    seen.push(r.raw)
    // A call cut with no answer left to give (its task ended) is known by its audit event.
    t.equal(r.headers['x-latchkey-error'] ?? (await s.audit()).at(-1)?.error, code, `${name}: ${code}`)
    t.same(leaks(r.raw), [], `${name}: the answer holds no credential`)
  }

  // A tunnel whose ClientHello names a server the CONNECT did not, behind the task's handle. (A
  // server name is quoted, as a host is recorded: it crosses the network in clear, so holds no secret.)
  const before = (await s.audit()).length
  const sock = connect(port, '127.0.0.1')
  await once(sock, 'connect')
  const got: Buffer[] = []
  sock.on('data', (d: Buffer) => got.push(d))
  sock.on('error', () => {})
  sock.write(`CONNECT localhost:${echo.port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: ${task.proxyAuthorization}\r\n\r\n`)
  while (!Buffer.concat(got).includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
  sock.write(clientHello('elsewhere.example'))
  await once(sock, 'close')
  seen.push(Buffer.concat(got).toString('latin1'))

  const events = await s.audit(before + 1)
  t.ok(events.some((e) => e.error === 'LK_TLS_NAME_MISMATCH'), 'the fronted tunnel was refused as such')
  const admin = s.sidecar.adminUrl
  const outputs: Record<string, string> = {
    'log lines': s.logs.join(''),
    'audit file': existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : '',
    '/metrics': await (await fetch(`${admin}/metrics`)).text(),
    '/healthz': await (await fetch(`${admin}/healthz`)).text(),
    '/readyz': await (await fetch(`${admin}/readyz`)).text(),
    'task list': await (await fetch(`${admin}/v1/tasks`)).text(),
    'task answer': await (await fetch(`${admin}/v1/tasks/${encodeURIComponent(task.handle)}`)).text(),
    'answers the agent saw': seen.join('\n'),
  }
  for (const [where, text] of Object.entries(outputs)) t.same(leaks(text), [], `${where} hold no credential in any spelling`)
})
