// Real clients, each its own process, through the real sidecar to a real upstream: the
// credential arrives at the upstream, and the agent never sees it.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startUpstream, startTestSidecar, startBearerRig, loopbackPolicy, assertNoCanary, rawRequest, CANARY } from '../helpers/harness.js'
import { testPki } from '../helpers/tls.js'
import { validateConfig } from '../../lib/config/load.js'
import { compileNetworkPolicy } from '../../proxy/resolve/network-policy.js'
import { DnsResolver } from '../../proxy/resolve/resolver.js'

const run = promisify(execFile)
const cleanEnv = (extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv => {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return { ...env, ...extra }
}

t.test('curl, Node fetch and Python reach the upstream with the credential injected', async (t) => {
  const upstream = await startUpstream()
  const tlsUpstream = await startUpstream({ tls: true })
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port, tlsUpstream.port]),
    sidecar: { upstream_ca_file: testPki().caFile },
    routes: { secure: `https://localhost:${tlsUpstream.port}` },
    credentials: [
      { id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
      { id: 'secure', audience: `https://localhost:${tlsUpstream.port}`, source: 'static', secret: 'CANARY', inject: { type: 'header', name: 'X-Api-Key', format: 'Key {token}' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
    await tlsUpstream.close()
  })

  const bodies: string[] = []
  const curl = await run('curl', ['-sS', '-i', '-x', s.proxy, '-H', 'Authorization: Bearer agents-own-key', `${upstream.origin}/curl?x=1`])
  bodies.push(curl.stdout)
  t.match(curl.stdout, /^HTTP\/1\.1 200/)

  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const res = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() })
    console.log(res.status, await res.text())`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, `${upstream.origin}/fetch`], {
    env: cleanEnv({ HTTP_PROXY: s.proxy }),
  })
  bodies.push(fetched.stdout)
  t.equal(fetched.stdout.trim(), '200 ok')

  const py = await run('python3', ['-c', 'import sys, urllib.request; r = urllib.request.urlopen(sys.argv[1]); print(r.status, r.read().decode())', `${upstream.origin}/python`], {
    env: cleanEnv({ HTTP_PROXY: s.proxy, http_proxy: s.proxy }),
  })
  bodies.push(py.stdout)
  t.equal(py.stdout.trim(), '200 ok')

  const viaRoute = await run('curl', ['-sS', '-i', `${s.proxy}/secure/route?y=2`])
  bodies.push(viaRoute.stdout)
  t.match(viaRoute.stdout, /^HTTP\/1\.1 200/, 'reverse route to an https upstream, verified against its CA')

  t.same(
    upstream.requests.map((r) => [r.url, r.headers.authorization]),
    [
      ['/curl?x=1', `Bearer ${CANARY}`],
      ['/fetch', `Bearer ${CANARY}`],
      ['/python', `Bearer ${CANARY}`],
    ],
    'each client arrived with the injected bearer, the agent-sent one replaced',
  )
  t.equal(upstream.requests[0]!.rawHeaders.filter((h) => h.toLowerCase() === 'authorization').length, 1, 'exactly one Authorization header')
  t.ok(upstream.requests.every((r) => r.headers['proxy-authorization'] === undefined), 'Proxy-Authorization never forwarded')
  t.equal(tlsUpstream.requests[0]?.headers['x-api-key'], `Key ${CANARY}`)
  t.equal(tlsUpstream.requests[0]?.url, '/route?y=2')
  t.equal(tlsUpstream.requests[0]?.headers.host, `localhost:${tlsUpstream.port}`)

  const audit = await s.audit()
  t.equal(audit.length, 4, 'one audit event per call')
  t.same(
    audit.map((e) => [e.via, e.status, e.decision, e.rule, (e.credential as { binding: string } | null)?.binding]),
    [
      ['absolute', 200, 'allow', 'allow-upstream', 'plain'],
      // undici's ProxyAgent tunnels http:// through CONNECT; the plain HTTP inside is still one call.
      ['tunnelled', 200, 'allow', 'allow-upstream', 'plain'],
      ['absolute', 200, 'allow', 'allow-upstream', 'plain'],
      ['reverse', 200, 'allow', 'allow-upstream', 'secure'],
    ],
  )
  t.equal(s.logs.filter((l) => l.includes('"msg":"call"')).length, 4, 'one canonical log line per call')
  assertNoCanary(t, s, ...bodies)
})

// Node 24's own fetch and http client take HTTP_PROXY when NODE_USE_ENV_PROXY=1 (no agent, no
// undici import): an agent on the image's runtime needs nothing but the environment.
const nodeMajor = Number(process.versions.node.split('.')[0])
t.test(
  "Node 24's built-in proxy support (NODE_USE_ENV_PROXY=1): fetch and http.get arrive credentialed, and a denial is readable",
  { skip: nodeMajor < 24 ? `Node ${process.version} has no NODE_USE_ENV_PROXY (the Node 24 suite runs this)` : false },
  async (t) => {
    const { upstream, s } = await startBearerRig(t, {
      fragment: (u) => ({
        policy: {
          default: 'deny',
          rules: [
            { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] },
            { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [u.port] },
          ],
        },
      }),
    })
    const script = `
      const http = await import('node:http')
      const headers = { authorization: 'Bearer agents-own-key' }
      const out = []
      for (const path of ['/fetch', '/admin/x']) {
        const res = await fetch(process.argv[1] + path, { headers })
        out.push([res.status, res.headers.get('x-latchkey-error'), await res.text()])
      }
      out.push(await new Promise((resolve, reject) => {
        http.get(process.argv[1] + '/http', { headers }, (res) => {
          let body = ''
          res.on('data', (d) => (body += d))
          res.on('end', () => resolve([res.statusCode, body]))
        }).on('error', reject)
      }))
      console.log(JSON.stringify(out))`
    const ran = await run(process.execPath, ['--input-type=module', '-e', script, upstream.origin], { env: cleanEnv({ NODE_USE_ENV_PROXY: '1', HTTP_PROXY: s.proxy }) })
    const [fetched, denied, viaHttp] = JSON.parse(ran.stdout) as [unknown[], [number, string, string], unknown[]]
    t.same(fetched, [200, null, 'ok'], 'fetch is answered')
    t.same([denied[0], denied[1], JSON.parse(denied[2]).rule], [403, 'LK_POLICY_DENIED', 'no-admin'], 'a denied path: the 403, its code and rule, readable to fetch')
    t.same(viaHttp, [200, 'ok'], 'http.get is answered')
    t.same(
      upstream.requests.map((r) => [r.url, r.headers.authorization]),
      [
        ['/fetch', `Bearer ${CANARY}`],
        ['/http', `Bearer ${CANARY}`],
      ],
      'each arrived with the injected bearer, the agent-sent one replaced; the denied one never arrived',
    )
    const audit = await s.audit()
    t.same(
      audit.filter((e) => e.path !== null).map((e) => [e.path, e.status, e.error]),
      [
        ['/fetch', 200, null],
        ['/admin/x', 403, 'LK_POLICY_DENIED'],
        ['/http', 200, null],
      ],
      'each call recorded',
    )
    assertNoCanary(t, s, ran.stdout, ran.stderr)
  },
)

t.test('HTTPS_PROXY: curl, Node fetch and Python tunnel through CONNECT, untouched', async (t) => {
  const tlsUpstream = await startUpstream({ tls: true })
  const s = await startTestSidecar({
    ...loopbackPolicy([tlsUpstream.port]),
    credentials: [{ id: 'secure', audience: `https://localhost:${tlsUpstream.port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await tlsUpstream.close()
  })
  const url = `https://localhost:${tlsUpstream.port}/tunnel`
  const curl = await run('curl', ['-sS', '-i', '--cacert', testPki().caFile, '-x', s.proxy, url])
  t.match(curl.stdout, /200 ok|^HTTP\/1\.1 200/m)
  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const res = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() })
    console.log(res.status, await res.text())`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, url], {
    env: cleanEnv({ HTTPS_PROXY: s.proxy, NODE_EXTRA_CA_CERTS: testPki().caFile }),
  })
  t.equal(fetched.stdout.trim(), '200 ok')
  // Python's http.client frames its CONNECT its own way (HTTP/1.0 on 3.11, no Host before 3.12).
  const pyScript = 'import ssl, sys, urllib.request\nr = urllib.request.urlopen(sys.argv[1], context=ssl.create_default_context(cafile=sys.argv[2]))\nprint(r.status, r.read().decode())'
  const py = await run('python3', ['-c', pyScript, url, testPki().caFile], { env: cleanEnv({ HTTPS_PROXY: s.proxy }) })
  t.equal(py.stdout.trim(), '200 ok', `python urllib through HTTPS_PROXY (${py.stderr.trim().split('\n').at(-1) ?? ''})`)
  t.equal(tlsUpstream.requests.length, 3)
  t.ok(tlsUpstream.requests.every((r) => r.headers.authorization === undefined), 'a tunnel is never given a credential')
  // Each tunnel is audited when the sidecar sees it close, which may trail the client's exit.
  const audit = await s.audit(3)
  t.same(audit.map((e) => [e.via, e.method, e.status, e.host, e.port, e.scheme]), [
    ['connect', 'CONNECT', 200, 'localhost', tlsUpstream.port, 'tunnel'],
    ['connect', 'CONNECT', 200, 'localhost', tlsUpstream.port, 'tunnel'],
    ['connect', 'CONNECT', 200, 'localhost', tlsUpstream.port, 'tunnel'],
  ])
  t.ok(audit.every((e) => (e.bytes_in as number) > 0 && (e.bytes_out as number) > 0), 'tunnel bytes counted')

  // A refused CONNECT: most clients show only its status line, so the status line says why.
  const deniedUrl = `https://localhost:${tlsUpstream.port + 1}/x`
  const pyDenied = await run('python3', ['-c', pyScript, deniedUrl, testPki().caFile], { env: cleanEnv({ HTTPS_PROXY: s.proxy }) }).catch((e: { stderr: string }) => e)
  t.match(pyDenied.stderr, /Tunnel connection failed: 403 Forbidden \(LK_(POLICY|NETWORK)_DENIED, rule [\w:-]+: [^)]+\)/, 'Python says which refusal, and which rule')
  const curlDenied = await run('curl', ['-sS', '-v', '--cacert', testPki().caFile, '-x', s.proxy, deniedUrl]).catch((e: { stderr: string }) => e)
  t.match(curlDenied.stderr, /< HTTP\/1\.1 403 Forbidden \(LK_(POLICY|NETWORK)_DENIED/, 'and curl -v shows it')
})

// An allow for http alone, on another port than 80: Node's fetch tunnels http:// there too.
t.test('an allow for plain http alone: Node fetch of http:// through its CONNECT is served, TLS there is refused', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'plain-only', action: 'allow', hosts: ['127.0.0.1'], ports: [upstream.port], schemes: ['http'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
    credentials: [{ id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const res = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() })
    console.log(res.status, (await res.text()).trim())`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, `${upstream.origin}/plain`], { env: cleanEnv({ HTTP_PROXY: s.proxy }) }).catch((e: { stdout: string; stderr: string }) => e)
  t.equal(fetched.stdout.trim(), '200 ok', 'the call goes through the tunnel')
  t.same(upstream.requests.map((r) => [r.url, r.headers.authorization]), [['/plain', `Bearer ${CANARY}`]], 'with the credential')
  const tls = await rawRequest(s.sidecar.port, `CONNECT 127.0.0.1:${upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\n\r\n\x16\x03\x01\x00\x01\x01`)
  t.match(tls.raw, /^HTTP\/1\.1 200 /, 'a tunnel opens')
  t.equal(tls.raw.charCodeAt(tls.raw.indexOf('\r\n\r\n') + 4), 0x15, 'and TLS in it gets an alert')
  const audit = await s.audit()
  t.match(audit.find((e) => e.via === 'tunnelled'), { status: 200, rule: 'plain-only', path: '/plain' }, 'the request inside is judged by the http allow')
})

// Node's fetch tunnels http:// through CONNECT. A rule that depends on method or path cannot be
// seen in a TLS tunnel, but can in plain HTTP: the tunnel opens for plain HTTP only, each request
// inside is decided on its own, and TLS to that host gets an access_denied alert, recorded.
t.test('method and path rules: Node fetch of http:// is decided per request; TLS to that host is refused', async (t) => {
  const upstream = await startUpstream()
  const tlsUpstream = await startUpstream({ tls: true })
  const ports = [upstream.port, tlsUpstream.port]
  const s = await startTestSidecar({
    policy: {
      default: 'deny',
      rules: [
        { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], ports: [upstream.port], paths: ['/admin/**'] },
        { id: 'read-only', action: 'allow', hosts: ['127.0.0.1', 'localhost'], ports, methods: ['GET'] },
        // Allowed by the policy, refused by the network floor (link-local, cloud metadata).
        { id: 'metadata', action: 'allow', hosts: ['169.254.169.254'], ports: [80] },
      ],
    },
    network: { allow: [{ cidr: '127.0.0.1/32', ports }] },
    credentials: [{ id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
    await tlsUpstream.close()
  })

  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const dispatcher = new EnvHttpProxyAgent()
    for (const [method, path] of [['GET', '/ok'], ['GET', '/admin/users'], ['POST', '/ok'], ['GET', '/ok/again']]) {
      const res = await fetch(process.argv[1] + path, { method, dispatcher, body: method === 'POST' ? 'x' : undefined })
      console.log(method, path, res.status, res.headers.get('x-latchkey-rule'), (await res.text()).trim())
    }`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, upstream.origin], { env: cleanEnv({ HTTP_PROXY: s.proxy }) })
  const lines = fetched.stdout.trim().split('\n')
  t.match(lines[0], /^GET \/ok 200 null ok$/, 'an allowed request goes through the tunnel')
  t.match(lines[1], /^GET \/admin\/users 403 no-admin \{"error":"denied","code":"LK_POLICY_DENIED","rule":"no-admin"/, 'the path deny is a readable 403 inside the tunnel')
  t.match(lines[2], /^POST \/ok 403 default /, 'a method the allow does not cover falls to the default deny')
  t.match(lines[3], /^GET \/ok\/again 200 null ok$/)
  t.same(upstream.requests.map((r) => [r.method, r.url, r.headers.authorization]), [
    ['GET', '/ok', `Bearer ${CANARY}`],
    ['GET', '/ok/again', `Bearer ${CANARY}`],
  ], 'only the allowed requests reached the upstream, each with the credential')

  // A whole-host denial on another port than 80 is the CONNECT's own 403, which fetch cannot
  // show; with proxyTunnel: false undici sends http:// in absolute-form and the agent reads the
  // denial (README, "Node's fetch"). On port 80, plain HTTP's, the tunnel opens undialled and
  // the request inside gets the readable 403: the policy's, or the network floor's.
  const deniedScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    for (const [url, proxyTunnel] of [['http://127.0.0.1:8/x', true], ['http://127.0.0.1:8/x', false], ['http://denied.example/x', true], ['http://169.254.169.254/latest/meta-data/', true]]) {
      try {
        const res = await fetch(url, { dispatcher: new EnvHttpProxyAgent({ proxyTunnel }) })
        const body = await res.json()
        console.log(proxyTunnel, res.status, res.headers.get('x-latchkey-rule'), body.code, body.retryable)
      } catch (e) { console.log(proxyTunnel, 'failed:', e.cause?.message) }
    }`
  const denied = await run(process.execPath, ['--input-type=module', '-e', deniedScript], { env: cleanEnv({ HTTP_PROXY: s.proxy }) })
  const [tunnelled, absolute, port80, floor80] = denied.stdout.trim().split('\n')
  t.match(tunnelled, /^true failed: /, 'through CONNECT to another port than 80, fetch only fails')
  t.equal(absolute, 'false 403 default LK_POLICY_DENIED false', 'in absolute-form, fetch reads the denial and its rule')
  t.equal(port80, 'true 403 default LK_POLICY_DENIED false', 'through CONNECT to port 80, fetch reads the denial inside the tunnel')
  t.equal(floor80, 'true 403 network:metadata LK_NETWORK_DENIED false', "and the network floor's")
  // TLS to a denied port 80 gets the alert; a tunnel opened and left unused is recorded refused.
  const tls80 = await run('curl', ['-sS', '-x', s.proxy, 'https://denied.example:80/']).catch((e: { stderr: string }) => e)
  t.match(tls80.stderr, /alert access denied/i, 'TLS in a denied tunnel to port 80 is refused')
  const unused = await rawRequest(s.sidecar.port, 'CONNECT denied.example:80 HTTP/1.1\r\nHost: denied.example:80\r\n\r\n')
  t.equal(unused.status, 200, 'the denied tunnel to port 80 opens, undialled')

  const curl = await run('curl', ['-sS', '--cacert', testPki().caFile, '-x', s.proxy, `https://localhost:${tlsUpstream.port}/`]).catch((e: { stderr: string }) => e)
  t.match(curl.stderr, /alert access denied/i, 'curl reads the refusal of a TLS tunnel it cannot be allowed')
  t.equal(tlsUpstream.requests.length, 0, 'the TLS upstream was never reached')

  const audit = await s.audit()
  t.same(
    audit.map((e) => [e.via, e.method, e.path, e.status, e.decision, e.rule, e.error]),
    [
      ['tunnelled', 'GET', '/ok', 200, 'allow', 'read-only', null],
      ['tunnelled', 'GET', '/admin/users', 403, 'deny', 'no-admin', 'LK_POLICY_DENIED'],
      ['tunnelled', 'POST', '/ok', 403, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['tunnelled', 'GET', '/ok/again', 200, 'allow', 'read-only', null],
      ['connect', 'CONNECT', null, 403, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['absolute', 'GET', '/x', 403, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['tunnelled', 'GET', '/x', 403, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['tunnelled', 'GET', '/latest/meta-data/', 403, 'deny', 'network:metadata', 'LK_NETWORK_DENIED'],
      ['connect', 'CONNECT', null, 403, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['connect', 'CONNECT', null, 200, 'deny', 'default', 'LK_POLICY_DENIED'],
      ['connect', 'CONNECT', null, 403, 'deny', 'default', 'LK_POLICY_DENIED'],
    ],
    'every request in the tunnel is its own call; the refused TLS tunnel is recorded as denied',
  )
  t.match((audit[10] as { reason: string }).reason, /rule read-only allows only some methods or paths on this host, which a TLS tunnel cannot show/)
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /^latchkey_calls_in_flight 0$/m, 'closed tunnels leave no call behind')
  assertNoCanary(t, s, fetched.stdout, curl.stderr)
})

// Node's fetch (undici's EnvHttpProxyAgent, and Node 24's own with NODE_USE_ENV_PROXY=1) tunnels
// an http:// URL through CONNECT, and shows a CONNECT answered 502 only as "fetch failed: Request
// was cancelled": an upstream down or a name gone, on port 80, lost its status and reason.
t.test("Node's fetch of an http:// URL on port 80 whose upstream is down or whose name is gone reads the 502 and its reason", async (t) => {
  // Nothing may listen on port 80 here: the refused dial is the upstream being down.
  const probe = connect(80, '127.0.0.1')
  const listening = await new Promise<boolean>((resolve) => {
    probe.once('connect', () => resolve(true))
    probe.once('error', () => resolve(false))
  })
  probe.destroy()
  if (listening) return t.test('the refused dial', { skip: 'something listens on 127.0.0.1:80 on this machine' }, () => {})
  const fragment = {
    policy: { default: 'deny', rules: [{ id: 'plain-80', action: 'allow', hosts: ['down.test', 'gone.test'], ports: [80] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [80] }] },
  }
  // This machine has no DNS: down.test is 127.0.0.1, where nothing listens; gone.test is no name.
  const network = compileNetworkPolicy(validateConfig({ version: 1, ...fragment }).network)
  const resolver = new DnsResolver(network, {
    cacheMs: 0,
    lookup: async (host) => {
      if (host === 'down.test') return [{ address: '127.0.0.1', family: 4 }]
      throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' })
    },
  })
  const s = await startTestSidecar(fragment, {}, { resolver })
  t.teardown(() => s.close())
  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const dispatcher = new EnvHttpProxyAgent()
    for (const url of process.argv.slice(1)) {
      try {
        const res = await fetch(url, { dispatcher })
        const body = await res.json()
        console.log(res.status, res.headers.get('x-latchkey-error'), body.reason, body.retryable)
      } catch (e) { console.log('failed:', e.cause?.message) }
    }`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, 'http://down.test/x', 'http://gone.test/y'], { env: cleanEnv({ HTTP_PROXY: s.proxy }) })
  t.same(fetched.stdout.trim().split('\n'), [
    '502 LK_UPSTREAM_UNREACHABLE the upstream refused the connection true',
    '502 LK_DNS_FAILED gone.test: name not found true',
  ], 'fetch reads each failure, its reason and that it may be retried')
  // TLS to port 80 there has no status line to read: an internal_error alert, not access_denied.
  const tls = await run('curl', ['-sS', '-x', s.proxy, 'https://down.test:80/']).catch((e: { stderr: string }) => e)
  t.match(tls.stderr, /alert internal error/i, 'TLS in that tunnel is refused with internal_error')
  t.match(await s.audit(3), [
    { via: 'tunnelled', method: 'GET', host: 'down.test', port: 80, path: '/x', status: 502, decision: 'allow', error: 'LK_UPSTREAM_UNREACHABLE' },
    { via: 'tunnelled', method: 'GET', host: 'gone.test', port: 80, path: '/y', status: 502, decision: 'allow', error: 'LK_DNS_FAILED' },
    { via: 'connect', method: 'CONNECT', host: 'down.test', port: 80, status: 502, decision: 'allow', error: 'LK_UPSTREAM_UNREACHABLE' },
  ], 'each request in the tunnels is recorded with its failure, and the TLS refused')
})

t.test('a request a plain tunnel refuses is recorded against the tunnel origin', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const sock = connect(s.sidecar.port, '127.0.0.1')
  let raw = ''
  sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
  sock.write(`CONNECT 127.0.0.1:${upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\n\r\n`)
  while (!raw.includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 10))
  sock.write(`GET http://127.0.0.2:${upstream.port}/x HTTP/1.1\r\nHost: 127.0.0.2:${upstream.port}\r\n\r\n`)
  await once(sock, 'close')
  t.match(raw, /\r\n\r\nHTTP\/1\.1 400 [^]*must be for the tunnel's own origin/)
  t.match(await s.audit(), [{ via: 'tunnelled', scheme: 'http', status: 400, error: 'LK_BAD_REQUEST', host: '127.0.0.1', port: upstream.port }], 'as the plain HTTP it was')
  t.equal(upstream.requests.length, 0)
})

t.test('a client following a redirect on a reverse route stays on the route, credential and all', async (t) => {
  const { upstream, s } = await startBearerRig(t, {
    handler: (req, res) => {
      if (req.url === '/old') res.writeHead(302, { location: '/new?x=1' }).end()
      else if (req.url === '/absolute') res.writeHead(301, { location: `http://127.0.0.1:${upstream.port}/new` }).end()
      else return false
      return true
    },
    fragment: (up) => ({ routes: { api: up.origin } }),
  })
  const followed = await run('curl', ['-sS', '-L', '-i', `${s.proxy}/api/old`])
  t.match(followed.stdout, /^HTTP\/1\.1 302 [^]*location: \/api\/new\?x=1\r\n[^]*HTTP\/1\.1 200 /i, 'the Location names the route')
  const absolute = await run('curl', ['-sS', '-L', '-o', '/dev/null', '-w', '%{http_code} %{num_redirects}', `${s.proxy}/api/absolute`])
  t.equal(absolute.stdout, '200 1', "an absolute Location on the upstream's origin is brought back under the route")
  t.same(upstream.requests.map((r) => [r.url, r.headers.authorization]), [
    ['/old', `Bearer ${CANARY}`],
    ['/new?x=1', `Bearer ${CANARY}`],
    ['/absolute', `Bearer ${CANARY}`],
    ['/new', `Bearer ${CANARY}`],
  ], 'every hop went through the sidecar, which injected the credential')
  t.match(await s.audit(), [{ via: 'reverse', path: '/old', status: 302 }, { via: 'reverse', path: '/new' }, { via: 'reverse', path: '/absolute', status: 301 }, { via: 'reverse', path: '/new' }])
  assertNoCanary(t, s, followed.stdout, absolute.stdout)
})

t.test('a client with HTTP_PROXY set calls a reverse route through the sidecar itself: it is the route', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: (up) => ({ routes: { api: up.origin } }) })
  // What README's setup gives an agent: HTTP_PROXY for its SDKs, a base URL for one API.
  const env = cleanEnv({ HTTP_PROXY: s.proxy, http_proxy: s.proxy })
  const curl = await run('curl', ['-sS', '-i', `${s.proxy}/api/curl`], { env })
  const py = await run('python3', ['-c', 'import sys, urllib.request; r = urllib.request.urlopen(sys.argv[1]); print(r.status, r.read().decode())', `${s.proxy}/api/python`], { env })
  const named = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-x', s.proxy, `http://localhost:${s.sidecar.port}/api/named`], { env })
  t.match(curl.stdout, /^HTTP\/1\.1 200 /)
  t.equal(py.stdout.trim(), '200 ok')
  t.equal(named.stdout, '200')
  t.same(upstream.requests.map((r) => [r.url, r.headers.authorization, r.headers.host]), [
    ['/curl', `Bearer ${CANARY}`, `127.0.0.1:${upstream.port}`],
    ['/python', `Bearer ${CANARY}`, `127.0.0.1:${upstream.port}`],
    ['/named', `Bearer ${CANARY}`, `127.0.0.1:${upstream.port}`],
  ])
  const unknown = await run('curl', ['-sS', '-i', `${s.proxy}/nope/x`], { env })
  t.match(unknown.stdout, /^HTTP\/1\.1 404 [^]*"code":"LK_NO_ROUTE"/, 'an unknown route is a readable 404, not a request to the sidecar as an upstream')
  t.match(await s.audit(), [{ via: 'absolute', path: '/curl', status: 200 }, { via: 'absolute', path: '/python', status: 200 }, { via: 'absolute', path: '/named', status: 200 }, { status: 404, error: 'LK_NO_ROUTE' }])
  assertNoCanary(t, s, curl.stdout, py.stdout, unknown.stdout)
})

t.test("Node's fetch with HTTP_PROXY set tunnels its call to a reverse route into the sidecar itself: it is the route", async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: (up) => ({ routes: { api: up.origin } }) })
  const env = cleanEnv({ HTTP_PROXY: s.proxy })
  // EnvHttpProxyAgent sends http:// through CONNECT 127.0.0.1:<sidecar port>: the sidecar is no upstream to dial.
  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const dispatcher = new EnvHttpProxyAgent()
    for (const url of process.argv.slice(1)) {
      const res = await fetch(url, { dispatcher })
      console.log(res.status, res.headers.get('x-latchkey-error'), await res.text())
    }`
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, `${s.proxy}/api/fetch?x=1`, `${s.proxy}/nope/x`], { env })
  const [ok, unknown] = fetched.stdout.trim().split('\n')
  t.equal(ok, '200 null ok')
  t.match(unknown, /^404 LK_NO_ROUTE \{"error":"[a-z_]+","code":"LK_NO_ROUTE"/, 'an unknown route is a readable 404 inside the tunnel too')
  t.same(upstream.requests.map((r) => [r.url, r.headers.authorization, r.headers.host]), [['/fetch?x=1', `Bearer ${CANARY}`, `127.0.0.1:${upstream.port}`]])
  // TLS to the sidecar itself has nothing to reach: refused, and recorded.
  const tls = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-x', s.proxy, `https://127.0.0.1:${s.sidecar.port}/api/tls`]).catch((err: { code: number }) => err)
  t.not((tls as { code?: number }).code ?? 0, 0, 'a TLS handshake inside a CONNECT to the sidecar fails')
  t.equal(upstream.requests.length, 1, 'and reaches no upstream')
  t.match(await s.audit(3), [
    { via: 'tunnelled', path: '/fetch', status: 200 },
    { via: 'tunnelled', status: 404, error: 'LK_NO_ROUTE' },
    { via: 'connect', method: 'CONNECT', error: 'LK_BAD_REQUEST' },
  ])
  assertNoCanary(t, s, fetched.stdout)
})

t.test("an SDK's own API key or token, in the header its vendor reads, is not sent beside the injected credential", async (t) => {
  // Google's GenAI SDK given a base URL: its key goes in x-goog-api-key, and the credential is
  // the route's `?key=`. Other SDKs name theirs xi-api-key (ElevenLabs), apikey (Supabase).
  const injected = await startUpstream()
  const open = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([injected.port, open.port]),
    routes: { gemini: injected.origin, open: open.origin },
    credentials: [{ id: 'gemini', audience: injected.origin, source: 'static', secret: 'CANARY', inject: { type: 'query', name: 'key' } }],
  })
  t.teardown(async () => {
    await s.close()
    await injected.close()
    await open.close()
  })
  // And the other ways APIs name a credential's header: GitLab's private-token, Azure API
  // Management's subscription key and Functions key, an AWS session token, a client secret.
  const otherCredentials = ['private-token', 'Ocp-Apim-Subscription-Key', 'x-functions-key', 'x-amz-security-token', 'x-client-secret', 'x-ms-authorization-auxiliary', 'X-Authorization', 'DD-Application-Key', 'cookie2']
  // Keys that are no credential: Stripe's idempotency key, an SDK's own descriptive headers.
  const notCredentials = { 'idempotency-key': 'idem-1', 'x-goog-api-client': 'genai-js/1', 'anthropic-version': '2023-06-01', 'x-stainless-retry-count': '0' }
  const sdkHeaders = [
    ...['x-goog-api-key: AIza-agents-own', 'xi-api-key: agents-own', 'apikey: agents-own', 'X_RapidAPI_Key: agents-own'].flatMap((h) => ['-H', h]),
    ...otherCredentials.flatMap((h) => ['-H', `${h}: agents-own`]),
    ...Object.entries(notCredentials).flatMap(([h, v]) => ['-H', `${h}: ${v}`]),
  ]
  const out = await run('curl', ['-sS', '-i', ...sdkHeaders, '-d', '{}', `${s.proxy}/gemini/v1beta/models/m:generateContent?key=agents-own&access_token=agents-own&API_KEY=agents-own&private%5Ftoken=agents-own&pageToken=p1`])
  t.match(out.stdout, /^HTTP\/1\.1 200 /)
  const seen = injected.requests[0]!
  // As in the query: RFC 6750's access_token, an API key, GitLab's private_token; a page token is no credential.
  t.equal(seen.url, `/v1beta/models/m:generateContent?pageToken=p1&key=${CANARY}`, 'the injected key alone in the query')
  t.same(Object.entries(seen.headers).filter(([, v]) => String(v).includes('agents-own')), [], "no credential header of the agent's reached the credentialed upstream")
  for (const [h, v] of Object.entries(notCredentials)) t.equal(seen.headers[h], v, `${h}, no credential, goes on`)
  await run('curl', ['-sS', ...sdkHeaders, `${s.proxy}/open/x`])
  t.equal(open.requests[0]?.headers['x-goog-api-key'], 'AIza-agents-own', 'where nothing is injected, the agent sends its own key')
  t.equal(open.requests[0]?.headers['private-token'], 'agents-own', 'nor is its token removed there')
  assertNoCanary(t, s, out.stdout)
})

// aiohttp (3.8 to this day) builds its proxy headers from a ClientSession's default headers and
// moves an Authorization among them to Proxy-Authorization: a session made with
// headers={'Authorization': ...} and a proxy sends its upstream key twice, and every call was
// refused 407 as naming no open task. aiohttp is not on CI's machines: these are its bytes, as
// 3.8.4 sent them through HTTP_PROXY (captured on the wire).
t.test("aiohttp's copy of a session's Authorization into Proxy-Authorization is no proxy credential; a task handle there still is", async (t) => {
  const { upstream, s, host } = await startBearerRig(t)
  const aiohttp = (auth: string, path: string) =>
    `GET http://${host}${path} HTTP/1.1\r\nHost: ${host}\r\nAuthorization: ${auth}\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nUser-Agent: Python/3.11 aiohttp/3.8.4\r\nProxy-Authorization: ${auth}\r\nConnection: close\r\n\r\n`
  const copied = await rawRequest(s.sidecar.port, aiohttp('Bearer agents-own-key', '/aiohttp'))
  t.equal(copied.status, 200, 'the call is made, as the agent with no task')
  t.same(upstream.requests.map((r) => [r.url, r.headers.authorization, r.headers['proxy-authorization']]), [['/aiohttp', `Bearer ${CANARY}`, undefined]], 'with the injected credential, neither copy sent on')
  // Another value there is a proxy credential, judged as ever; its reason says what it lacks.
  const other = await rawRequest(s.sidecar.port, aiohttp('Bearer agents-own-key', '/other').replace('Proxy-Authorization: Bearer agents-own-key', 'Proxy-Authorization: Bearer not-a-handle'))
  t.equal(other.status, 407)
  t.match(JSON.parse(other.body).reason, /holds no task handle[^]*aiohttp/, 'a 407 for a value with no task handle says so, and names the likely cause')
  // An ended task's handle in both is refused (a handle in Authorization is), never run as no task.
  const task = s.sidecar.tasks.open({ purpose: 'ended', durationS: 60 })
  s.sidecar.tasks.end(task.handle)
  const ended = await rawRequest(s.sidecar.port, aiohttp(`Bearer ${task.handle}`, '/ended'))
  t.equal(ended.status, 400, "an ended task's handle is refused")
  t.match(JSON.parse(ended.body).reason, /the Authorization header carries a task handle/)
  t.equal(upstream.requests.length, 1, 'neither refused call reached the upstream')
  assertNoCanary(t, s, copied.raw, other.raw, ended.raw)
})
