// The whole-category leak check: every refusal the sidecar can be driven to from outside, caused
// for real with a canary in every place a credential lives (the four static injectors, the task
// handle, the agent's own Authorization, Cookie and X-Api-Key, userinfo and query parameters in
// the URL it sends, the upstream's echoes of what was injected), then every output grepped for
// every spelling of every one: bodies and status lines, log lines, the audit file, /metrics,
// /healthz, /readyz and the task API. One sidecar serves the whole table. The codes only a
// broker, control stream, caller check, drain, connection limit, DNS fault, audit fault or a
// fault in the sidecar can cause each get a rig of their own below, the canary held where that
// path could echo it (the token file, the broker's and authorization server's answers, the
// control token, the issued tokens), and the same outputs grepped. LK_UPSTREAM_LIMIT is not
// caused: the agents' connections are held to the same sidecar.max_connections, and each carries
// one upstream socket at a time, so a running sidecar reaches the upstream limit only in a race
// (upstream-sockets.test drives PinnedPools to it; its reason is a fixed text naming the setting).
import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { readFileSync, existsSync, mkdtempSync, writeFileSync, renameSync, symlinkSync, unlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream, startTestSidecar, startBearerRig, rawRequest, openTask, loopbackPolicy, CANARY, type RawResponse, type TestSidecar } from '../helpers/harness.js'
import { startTestBroker, API, K8S_ISSUER, USER_ISSUER } from '../helpers/broker.js'
import { startBrokerFront, type FrontMode } from '../helpers/broker-front.js'
import { AGENT } from '../helpers/tokens.js'
import { startRig, revoke, until, openRecorded, CONTROL_TOKEN } from '../control/rig.js'
import { FAILURE_HOLD_MS } from '../../proxy/credentials/broker-source.js'
import { DnsResolver, type LookupFn } from '../../proxy/resolve/resolver.js'
import { NetworkPolicy } from '../../proxy/resolve/network-policy.js'
import { parseConfig } from '../../lib/config/load.js'
import type { Resolver } from '../../proxy/context.js'
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

const spellings: Record<string, (s: string) => string> = {
  ...SPELLINGS,
  'upper-case hex': (x) => Buffer.from(x).toString('hex').toUpperCase(),
  'lower-cased': (x) => x.toLowerCase(),
  'upper-cased': (x) => x.toUpperCase(),
}

/** The agent's request headers: its task, and its own Authorization, Cookie and X-Api-Key, each a canary. */
const agentHeadersFor = (proxyAuthorization: string) =>
  `Proxy-Authorization: ${proxyAuthorization}\r\nAuthorization: Bearer ${AGENT_AUTH}\r\nCookie: session=${AGENT_COOKIE}\r\nX-Api-Key: ${AGENT_KEY}\r\n`

/** Everything the sidecar wrote that anyone could read: the answers the agent saw, log lines, the audit file and (while it runs) the admin API's pages. */
async function outputsOf(s: TestSidecar, seen: string[], running = true): Promise<Record<string, string>> {
  const admin = s.sidecar.adminUrl
  const page = async (path: string) => (running ? await (await fetch(`${admin}${path}`)).text() : '')
  await s.sidecar.audit.flush().catch(() => {})
  return {
    'log lines': s.logs.join(''),
    'audit file': existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : '',
    '/metrics': await page('/metrics'),
    '/healthz': await page('/healthz'),
    '/readyz': await page('/readyz'),
    'answers the agent saw': seen.join('\n'),
  }
}

/** Every secret (of `names`) × spelling `output` holds. */
function leaksIn(secrets: Record<string, string>, output: string, names = Object.keys(secrets)): string[] {
  const found: string[] = []
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
  // The agent's own (its headers, its URL, its task handle): an upstream may echo those back to
  // it, but nothing the sidecar writes may repeat them.
  const agentOwn = new Set(['task handle', 'ended task handle', 'task pair', 'agent authorization', 'agent cookie', 'agent api key', 'url password'])
  /** Every secret × spelling `output` holds (only the injected ones, `injectedOnly`). */
  const leaks = (output: string, injectedOnly = false): string[] => leaksIn(secrets, output, Object.keys(secrets).filter((n) => !(injectedOnly && agentOwn.has(n))))

  const agentHeaders = agentHeadersFor(task.proxyAuthorization)
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
    ...(await outputsOf(s, seen)),
    'task list': await (await fetch(`${admin}/v1/tasks`)).text(),
    'task answer': await (await fetch(`${admin}/v1/tasks/${encodeURIComponent(task.handle)}`)).text(),
  }
  for (const [where, text] of Object.entries(outputs)) t.same(leaks(text), [], `${where} hold no credential in any spelling`)
})

/** Each output of `s` (seen holds the agent's answers) holds no secret in any spelling. */
async function assertNothingLeaked(t: Test, s: TestSidecar, secrets: Record<string, string>, seen: string[], running = true): Promise<void> {
  for (const [where, text] of Object.entries(await outputsOf(s, seen, running))) t.same(leaksIn(secrets, text), [], `${where} hold no credential in any spelling`)
}

/** The agent's own secrets, held on every call below; `handle` is its task's. */
const agentSecrets = (handle: string): Record<string, string> => ({
  'task handle': handle,
  'task pair': `task:${handle}`,
  'agent authorization': AGENT_AUTH,
  'agent cookie': AGENT_COOKIE,
  'agent api key': AGENT_KEY,
})

const basicOf = (handle: string) => `Basic ${Buffer.from(`task:${handle}`).toString('base64')}`

t.test('a credential source that fails, refuses or answers badly: the evidence, the user token, the client secret and what was issued never shown', async (t) => {
  // The broker is real; the front before it makes up the answers a real broker will not give
  // (an echo of what it was sent, an issued token with a line break, an HTML 500).
  const broker = await startTestBroker()
  const front = await startBrokerFront(broker.url)
  const api = await startUpstream()
  const dir = mkdtempSync(join(tmpdir(), 'lk-sweep-'))
  const tokenFile = join(dir, 'token')
  const evidenceSig = `${CANARY}ev`
  const userSig = `${CANARY}ut`
  const clientSecret = `${CANARY}cs`
  const issued = `${CANARY}issued`
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const jwt = (claims: Record<string, unknown>, sig: string) => `${b64({ alg: 'RS256', kid: 'k' })}.${b64(claims)}.${sig}`
  const nowS = () => Math.floor(Date.now() / 1000)
  const evidence = (exp: number) => jwt({ iss: K8S_ISSUER, aud: broker.issuer, sub: 'system:serviceaccount:agents:summarizer', exp }, evidenceSig)
  // Replaced as the kubelet replaces it (a new inode), so the sidecar reads it again.
  const writeToken = (text: string) => {
    writeFileSync(`${tokenFile}.new`, text)
    renameSync(`${tokenFile}.new`, tokenFile)
  }
  writeToken(evidence(nowS() + 600))
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([api.port]),
      sidecar: { agent_id: AGENT, broker: { url: front.url, timeout_ms: 1000 }, attestation: { kubernetes: { token_file: tokenFile } } },
      credentials: [
        { id: 'api', audience: api.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } },
        { id: 'cc', audience: `http://localhost:${api.port}`, source: 'client_credentials', oauth: { token_url: `${front.url}/token`, client_id: 'sidecar', client_secret: 'CC' }, inject: { type: 'bearer' } },
      ],
    },
    { LATCHKEY_SECRET_CC: clientSecret },
  )
  t.teardown(async () => {
    await s.close()
    await api.close()
    await front.close()
    await broker.close()
  })
  const secrets: Record<string, string> = {
    'bearer secret': CANARY,
    'token file content': `${CANARY}file`,
    'evidence signature': evidenceSig,
    'evidence': evidence(nowS() + 600).split('.').slice(1).join('.'),
    'user token signature': userSig,
    'client secret': clientSecret,
    'client pair': `sidecar:${clientSecret}`,
    'issued token': issued,
  }
  const seen: string[] = []
  /** A call for a new task (each its own token entry: no failure held from the row before), acting for `userToken`. */
  const call = async (url: string, userToken: string | null = null) => {
    const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60, userToken })
    Object.assign(secrets, Object.fromEntries(Object.entries(agentSecrets(task.handle)).map(([k, v]) => [`${k} ${task.id}`, v])))
    return rawRequest(s.sidecar.port, `GET ${url}?key=${AGENT_AUTH} HTTP/1.1\r\nHost: x\r\n${agentHeadersFor(basicOf(task.handle))}Connection: close\r\n\r\n`)
  }
  const user = jwt({ iss: USER_ISSUER, aud: 'latchkey', sub: 'u', scope: 'read', exp: nowS() + 600 }, userSig)
  const echoEvidence = (status: number) => ({ mode: 'raw' as const, status, text: JSON.stringify({ error: 'invalid_grant', error_description: `actor_token ${evidence(nowS() + 600)} and subject_token ${user} not accepted` }) })
  const granted = (token: string) => JSON.stringify({ access_token: token, token_type: 'Bearer', issued_token_type: 'urn:ietf:params:oauth:token-type:access_token', expires_in: 600 })
  /** [case, the code it must meet, the token file's text (unchanged: null), the front's mode, on the client-credentials binding]. */
  const rows: [string, string, string | null, FrontMode, boolean][] = [
    ['a token file that holds no JWT', 'LK_CREDENTIAL_UNAVAILABLE', `${CANARY}file not a token`, { mode: 'pass' }, false],
    ['a token file whose token expired', 'LK_CREDENTIAL_UNAVAILABLE', evidence(nowS() - 60), { mode: 'pass' }, false],
    ['the real broker refusing evidence it cannot verify', 'LK_CREDENTIAL_REFUSED', evidence(nowS() + 600), { mode: 'pass' }, false],
    ['a broker refusal that quotes the evidence and the user token', 'LK_CREDENTIAL_REFUSED', null, echoEvidence(400), false],
    ['a broker 500 that quotes them', 'LK_CREDENTIAL_UNAVAILABLE', null, echoEvidence(500), false],
    ['a broker 500 in HTML that quotes them', 'LK_CREDENTIAL_UNAVAILABLE', null, { mode: 'raw', status: 500, text: `<pre>${evidence(nowS() + 600)}</pre>` }, false],
    ['a broker issuing a token with a line break', 'LK_CREDENTIAL_UNAVAILABLE', null, { mode: 'raw', text: granted(`${issued}\r\nX-Injected: 1`) }, false],
    ['a broker issuing a token padded with spaces', 'LK_CREDENTIAL_UNAVAILABLE', null, { mode: 'raw', text: granted(` ${issued} `) }, false],
    ['an authorization server quoting the client secret', 'LK_CREDENTIAL_REFUSED', null, { mode: 'raw', status: 401, text: JSON.stringify({ error: 'invalid_client', error_description: `client sidecar:${clientSecret} (Basic ${Buffer.from(`sidecar:${clientSecret}`).toString('base64')}) unknown` }) }, true],
    ['an authorization server issuing a token with a line break', 'LK_CREDENTIAL_UNAVAILABLE', null, { mode: 'raw', text: granted(`${issued}\nX: 1`) }, true],
  ]
  for (const [name, code, file, mode, cc] of rows) {
    if (file !== null) writeToken(file)
    front.mode = mode
    // The client-credentials binding has no task: its last failure is held FAILURE_HOLD_MS.
    if (cc) await new Promise((r) => setTimeout(r, FAILURE_HOLD_MS + 50))
    const r = await call(cc ? `http://localhost:${api.port}/x` : `${api.origin}/x`, cc ? null : user)
    seen.push(r.raw)
    t.equal(r.headers['x-latchkey-error'], code, `${name}: ${code}`)
    t.same(leaksIn(secrets, r.raw), [], `${name}: the answer holds no credential`)
  }
  // The broker gone altogether.
  await front.close()
  const down = await call(`${api.origin}/x`, user)
  seen.push(down.raw)
  t.equal(down.headers['x-latchkey-error'], 'LK_CREDENTIAL_UNAVAILABLE', 'a broker that is down: LK_CREDENTIAL_UNAVAILABLE')
  t.equal(api.requests.length, 0, 'nothing was forwarded')
  await assertNothingLeaked(t, s, secrets, seen)
})

t.test('a caller the sidecar does not allow (LK_CALLER_DENIED): absolute-form, a route, a tunnel on port 80', async (t) => {
  const { s, host } = await startBearerRig(t, { fragment: (up) => ({ routes: { up: up.origin }, sidecar: { callers: { allowed_uids: [process.getuid!() + 4242] } } }) })
  const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60 })
  const headers = agentHeadersFor(basicOf(task.handle))
  const port = s.sidecar.port
  const seen: string[] = []
  const cases: [string, string][] = [
    ['absolute-form', `GET http://${host}/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: ${host}\r\n${headers}Connection: close\r\n\r\n`],
    ['a route', `GET /up/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: 127.0.0.1\r\n${headers}Connection: close\r\n\r\n`],
    ['inside a tunnel to port 80', `CONNECT api.example:80 HTTP/1.1\r\nHost: api.example:80\r\n${headers}\r\nGET http://api.example/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: api.example\r\n${headers}Connection: close\r\n\r\n`],
    ['a TLS tunnel', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n${headers}\r\n`],
  ]
  for (const [name, request] of cases) {
    const r = await rawRequest(port, request)
    seen.push(r.raw)
    t.match(r.raw, /"code":"LK_CALLER_DENIED"/, `${name}: LK_CALLER_DENIED`)
  }
  await assertNothingLeaked(t, s, { 'bearer secret': CANARY, ...agentSecrets(task.handle) }, seen)
})

t.test('a call arriving during the drain (LK_DRAINING): answered on a kept-alive connection, or pipelined and never sent', async (t) => {
  // /stream's head goes before the drain and its end after: the connection is still open then.
  const { upstream, s, host } = await startBearerRig(t, {
    handler: (req, res) => {
      if (req.url !== '/stream') return false
      res.writeHead(200, { 'content-type': 'text/plain' }).write('first ')
      setTimeout(() => res.end('last'), 300)
      return true
    },
    fragment: () => ({ sidecar: { timeouts: { drain_ms: 3000 } } }),
  })
  const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60 })
  const headers = agentHeadersFor(basicOf(task.handle))
  const stream = `GET http://${host}/stream HTTP/1.1\r\nHost: ${host}\r\n${headers}\r\n`
  const after = `GET http://${host}/after?key=${AGENT_AUTH} HTTP/1.1\r\nHost: ${host}\r\n${headers}\r\n`
  const kept = openRecorded(t, s.sidecar.port, stream)
  const piped = openRecorded(t, s.sidecar.port, stream + after)
  await until('both streams begun', () => kept.received().includes('first') && piped.received().includes('first'))
  const closing = s.close()
  await until('the stream ended', () => kept.received().includes('last'))
  kept.sock.write(after)
  await until('the call after it answered', () => kept.closed())
  await closing
  t.match(kept.received(), /HTTP\/1\.1 503 [^]*"code":"LK_DRAINING"/, 'the call after: 503 LK_DRAINING')
  t.same(upstream.requests.map((r) => r.url), ['/stream', '/stream'], 'nothing new reached the upstream')
  t.same((await s.audit()).filter((e) => e.error === 'LK_DRAINING').length, 2, 'both recorded as LK_DRAINING')
  await assertNothingLeaked(t, s, { 'bearer secret': CANARY, ...agentSecrets(task.handle) }, [kept.received(), piped.received()], false)
})

t.test('DNS that never answers (LK_DNS_TIMEOUT, then LK_DNS_BUSY), on a name a credential is bound to', async (t) => {
  // A lookup that never answers cannot be caused on this machine (its resolver is the system's):
  // injected, as test/dns-faults.test.ts does, through the resolver's own `lookup`.
  const lookup: LookupFn = () => new Promise(() => {})
  const resolver = new DnsResolver(new NetworkPolicy(parseConfig('version: 1\n').network), { cacheMs: 30_000, timeoutMs: 200, maxRunning: 1, lookup })
  const s = await startTestSidecar(
    {
      policy: { default: 'deny', rules: [{ id: 'examples', action: 'allow', hosts: ['*.example.com'] }] },
      credentials: [{ id: 'dead', audience: 'http://dead.example.com', source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
    },
    {},
    { resolver },
  )
  t.teardown(() => s.close())
  const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60 })
  const headers = agentHeadersFor(basicOf(task.handle))
  const seen: string[] = []
  const cases: [string, string, string][] = [
    ['a name that never answers', 'LK_DNS_TIMEOUT', `GET http://dead.example.com/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: dead.example.com\r\n${headers}Connection: close\r\n\r\n`],
    ['a name while the one lookup thread is held', 'LK_DNS_BUSY', `GET http://other.example.com/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: other.example.com\r\n${headers}Connection: close\r\n\r\n`],
    ['a CONNECT to another', 'LK_DNS_BUSY', `CONNECT third.example.com:443 HTTP/1.1\r\nHost: third.example.com:443\r\n${headers}\r\n`],
  ]
  for (const [name, code, request] of cases) {
    const r = await rawRequest(s.sidecar.port, request)
    seen.push(r.raw)
    t.equal(r.headers['x-latchkey-error'], code, `${name}: ${code}`)
  }
  await assertNothingLeaked(t, s, { 'bearer secret': CANARY, ...agentSecrets(task.handle) }, seen)
})

t.test('an audit file that cannot be written (LK_AUDIT_UNAVAILABLE), and the events kept while it could not', async (t) => {
  const { s, host } = await startBearerRig(t)
  const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60 })
  const call = () => rawRequest(s.sidecar.port, `GET http://${host}/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: ${host}\r\n${agentHeadersFor(basicOf(task.handle))}Connection: close\r\n\r\n`)
  t.equal((await call()).status, 200)
  await s.sidecar.audit.flush()
  // A real fault, as audit-file-faults.test makes it: rotated away, the path now /dev/full (every write ENOSPC).
  renameSync(s.auditPath, `${s.auditPath}.1`)
  symlinkSync('/dev/full', s.auditPath)
  await new Promise((r) => setTimeout(r, 1100))
  const seen: string[] = []
  let refused = await call()
  for (let i = 0; i < 40 && refused.status !== 503; i++) {
    await new Promise((r) => setTimeout(r, 50))
    refused = await call()
  }
  seen.push(refused.raw)
  t.equal(refused.headers['x-latchkey-error'], 'LK_AUDIT_UNAVAILABLE')
  const readyz = await (await fetch(`${s.sidecar.adminUrl}/readyz`)).text()
  // Writable again: what was kept is written.
  unlinkSync(s.auditPath)
  await until('ready again', async () => (await fetch(`${s.sidecar.adminUrl}/readyz`)).status === 200, 6000)
  await assertNothingLeaked(t, s, { 'bearer secret': CANARY, ...agentSecrets(task.handle) }, [...seen, readyz, readFileSync(`${s.auditPath}.1`, 'utf8')])
})

t.test('a task and an agent revoked over the control stream (LK_REVOKED): the issued token and the control token never shown', async (t) => {
  const { broker, api, s } = await startRig(t, 'agent:summarizer:prod:sweep', (api) => ({ routes: { api: api.origin } }))
  const [revoked, other] = [await s.openTask(), await s.openTask()]
  const call = (handle: string, path: string) =>
    rawRequest(s.sidecar.port, `GET http://127.0.0.1:${api.port}${path}?key=${AGENT_AUTH} HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\n${agentHeadersFor(basicOf(handle))}Connection: close\r\n\r\n`)
  const viaRoute = (handle: string) => rawRequest(s.sidecar.port, `GET /api/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: 127.0.0.1\r\n${agentHeadersFor(basicOf(handle))}Connection: close\r\n\r\n`)
  for (const task of [revoked, other]) t.equal((await call(task.handle, '/a')).status, 200, 'a token is issued and used')
  const seen: string[] = []
  t.equal((await revoke(broker, 'task', revoked.id)).status, 201)
  await until('task revocation applied', () => s.sidecar.control!.state.has('task', revoked.id))
  for (const r of [await call(revoked.handle, '/b'), await viaRoute(revoked.handle)]) {
    seen.push(r.raw)
    t.match(r.raw, /"code":"LK_REVOKED"/, 'the revoked task: LK_REVOKED')
  }
  t.equal((await revoke(broker, 'agent', s.agent)).status, 201)
  await until('agent revocation applied', () => s.sidecar.control!.state.agentRevoked)
  for (const r of [await call(other.handle, '/c'), await viaRoute(other.handle)]) {
    seen.push(r.raw)
    t.match(r.raw, /"code":"LK_REVOKED"/, 'the revoked agent: LK_REVOKED')
  }
  const secrets: Record<string, string> = { 'control token': CONTROL_TOKEN, ...agentSecrets(revoked.handle), ...Object.fromEntries(Object.entries(agentSecrets(other.handle)).map(([k, v]) => [`${k} (other)`, v])) }
  api.tokens.forEach((token, i) => (secrets[`issued token ${i}`] = token))
  t.equal(api.tokens.length, 2, 'each task was issued its token')
  await assertNothingLeaked(t, s, secrets, seen)
})

t.test('a fault in the sidecar (LK_INTERNAL) whose message quotes the request over several lines', async (t) => {
  // No stage is known to throw (test/internal-errors.test.ts): the fault is injected, a resolver
  // that throws what no stage meant to, its message quoting the agent's request line by line as a
  // parser's or a library's message can. Only its type and frames may be logged.
  const resolver: Resolver = {
    resolve: (target) => {
      throw new TypeError(`cannot resolve ${target.host}, asked by:\nGET /x?key=${AGENT_AUTH} HTTP/1.1\nAuthorization: Bearer ${AGENT_AUTH}\nCookie: session=${AGENT_COOKIE}`)
    },
  }
  const up = await startUpstream()
  const s = await startTestSidecar(
    { ...loopbackPolicy([up.port]), credentials: [{ id: 'up', audience: `http://localhost:${up.port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }] },
    {},
    { resolver },
  )
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const task = s.sidecar.tasks.open({ purpose: 'sweep', durationS: 60 })
  const r = await rawRequest(s.sidecar.port, `GET http://localhost:${up.port}/x?key=${AGENT_AUTH} HTTP/1.1\r\nHost: localhost\r\n${agentHeadersFor(basicOf(task.handle))}Connection: close\r\n\r\n`)
  t.equal(r.headers['x-latchkey-error'], 'LK_INTERNAL')
  t.ok(s.logs.some((l) => l.includes('internal error in pipeline') && l.includes('TypeError')), 'the fault is logged, by its type')
  await assertNothingLeaked(t, s, { 'bearer secret': CANARY, ...agentSecrets(task.handle) }, [r.raw])
})
