// Domain fronting through CONNECT: a tunnel is decided by its host, so the TLS server name (SNI)
// its ClientHello asks the upstream for must be that host (or none, to an address). Real
// clients, and the framings an evasion would use, each through the real sidecar.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { connect as tlsConnect, createServer as createTlsServer, type SecureContext } from 'node:tls'
import { connect as netConnect, type AddressInfo } from 'node:net'
import { once } from 'node:events'
import { createECDH } from 'node:crypto'
import { startTestSidecar, startUpstream, startTcpUpstream, openTunnel, loopbackPolicy, type TestSidecar } from '../helpers/harness.js'
import { testPki } from '../helpers/tls.js'
import { clientHello, extension, handshake, helloBody, records, serverNameExtension } from '../helpers/client-hello.js'
import { validateConfig } from '../../lib/config/load.js'
import { compileNetworkPolicy } from '../../proxy/resolve/network-policy.js'
import { DnsResolver } from '../../proxy/resolve/resolver.js'

const run = promisify(execFile)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
/** The fatal access_denied alert the sidecar answers refused TLS with. */
const ACCESS_DENIED = Buffer.from([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31])
const named = (...names: string[]) => handshake(helloBody([serverNameExtension(...names)]))

async function rig(t: { teardown(fn: () => unknown): void }) {
  const tlsUpstream = await startUpstream({ tls: true })
  const raw = await startTcpUpstream(t)
  // This machine has no DNS: svc.lk.test, a name with a dot, is 127.0.0.1 here.
  const fragment = loopbackPolicy([tlsUpstream.port, raw.port])
  ;(fragment.policy as { rules: { hosts: string[] }[] }).rules[0]!.hosts.push('svc.lk.test')
  const network = compileNetworkPolicy(validateConfig({ version: 1, ...fragment }).network)
  const resolver = new DnsResolver(network, {
    cacheMs: 0,
    lookup: async (host) => {
      if (host === 'svc.lk.test' || host === 'localhost') return [{ address: '127.0.0.1', family: 4 }]
      throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' })
    },
  })
  const s = await startTestSidecar(fragment, {}, { resolver })
  t.teardown(async () => {
    await s.close()
    await tlsUpstream.close()
  })
  return { s, tlsUpstream, raw }
}

/**
 * Sends `writes` (a pause between them) in a tunnel to `host`:raw.port and, once the sidecar has
 * closed the tunnel, what came back and the upstream's byte count; the tunnel's audit event.
 */
async function refusedTunnel(s: TestSidecar, raw: Awaited<ReturnType<typeof startTcpUpstream>>, host: string, writes: Buffer[], eventsBefore: number) {
  const { sock, received } = await openTunnel(s.sidecar.port, raw.port, host)
  const closed = new Promise((r) => sock.once('close', r))
  for (const [i, w] of writes.entries()) {
    if (i > 0) await sleep(30)
    sock.write(w)
  }
  await Promise.race([closed, sleep(1500)])
  const events = await s.audit(eventsBefore + 1)
  return { closed: sock.destroyed, answer: received(), upstreamBytes: raw.bytes(), event: events[eventsBefore] }
}

t.test('the ClientHello framings a fronting agent would try are refused with an alert, nothing sent upstream, audited with why', async (t) => {
  const { s, raw } = await rig(t)
  const huge = handshake(helloBody([serverNameExtension('localhost'), extension(21, Buffer.alloc(17000))]))
  const cases: [string, string, Buffer[], string, RegExp][] = [
    ['another name', 'localhost', [clientHello('other.example')], 'LK_TLS_NAME_MISMATCH', /^the TLS server name "other\.example" is not the CONNECT's host "localhost"$/],
    ['another name, split across two records', 'localhost', [records(named('other.example'), [20])], 'LK_TLS_NAME_MISMATCH', /"other\.example" is not the CONNECT's host "localhost"/],
    ['another name, split across two TCP writes with a pause', 'localhost', [clientHello('other.example').subarray(0, 30), clientHello('other.example').subarray(30)], 'LK_TLS_NAME_MISMATCH', /"other\.example"/],
    ['no name, to a host name with a dot', 'svc.lk.test', [clientHello(null)], 'LK_TLS_NAME_MISMATCH', /names no server; the CONNECT's host is "svc\.lk\.test"/],
    ['another name, to a host name with a dot', 'svc.lk.test', [clientHello('other.lk.test')], 'LK_TLS_NAME_MISMATCH', /"other\.lk\.test" is not the CONNECT's host "svc\.lk\.test"/],
    ['a name, to an address', '127.0.0.1', [clientHello('localhost')], 'LK_TLS_NAME_MISMATCH', /"localhost" is not the CONNECT's host "127\.0\.0\.1", an address/],
    ['two server_name extensions, the allowed one first', 'localhost', [records(handshake(helloBody([serverNameExtension('localhost'), serverNameExtension('other.example')])))], 'LK_BAD_REQUEST', /extension of type 0 twice/],
    ['two names in one list', 'localhost', [records(named('localhost', 'other.example'))], 'LK_BAD_REQUEST', /names more than one server/],
    ['a length that overruns', 'localhost', [records(handshake(Buffer.concat([helloBody(null), Buffer.from([0, 60]), serverNameExtension('localhost')])))], 'LK_BAD_REQUEST', /extensions length that does not end/],
    ['a ClientHello bigger than the bound', 'localhost', [records(huge, [16384])], 'LK_BAD_REQUEST', /longer than the 16384 bytes read/],
    ['a handshake record that is not a ClientHello', 'localhost', [records(handshake(helloBody([]), 2))], 'LK_BAD_REQUEST', /first handshake message is of type 2/],
    ['a name with control characters, thousands long', 'localhost', [records(named(`localhost\r\n{"forged":1}${'x'.repeat(5000)}`))], 'LK_BAD_REQUEST', /^the tunnel's TLS ClientHello names the server "localhost\\x0d\\x0a\{\\x22forged\\x22:1\}x+\.\.\.", not a DNS host name/],
  ]
  let before = 0
  for (const [name, host, writes, code, reason] of cases) {
    const got = await refusedTunnel(s, raw, host, writes, before)
    before++
    t.ok(got.closed, `${name}: the tunnel is closed`)
    t.same(got.answer, ACCESS_DENIED, `${name}: the agent gets the access_denied alert, nothing else`)
    t.equal(got.upstreamBytes, 0, `${name}: the upstream was sent nothing`)
    t.match(got.event, { via: 'connect', host, port: raw.port, status: code === 'LK_BAD_REQUEST' ? 400 : 403, error: code, reason }, `${name}: audited with the code and why`)
    t.ok(String(got.event?.reason).length < 300, `${name}: the reason is bounded`)
  }
  t.equal(raw.sockets.length, cases.length, 'each was dialled (the CONNECT was allowed) and closed unsent')
  t.ok(s.logs.some((l) => l.includes('"error":"LK_TLS_NAME_MISMATCH"') && l.includes(`not the CONNECT's host \\"localhost\\"`)), 'and logged for the operator, code and reason')
  t.ok(
    s.logs.join('').split('\n').filter(Boolean).every((l) => !l.includes('forged":1') && JSON.parse(l) !== null),
    'every log line is whole JSON; the agent-chosen name forged nothing into one',
  )
})

t.test('framings of the right name go through, bytes untouched: split records, split writes, case and a trailing dot', async (t) => {
  const { s, raw } = await rig(t)
  const cases: [string, string, Buffer[]][] = [
    ['split across two records', 'localhost', [records(named('localhost'), [20])]],
    ['split across two TCP writes with a pause', 'localhost', [clientHello('localhost').subarray(0, 3), clientHello('localhost').subarray(3)]],
    ['upper case and a trailing dot', 'localhost', [clientHello('LocalHost.')]],
    ['the CONNECT upper case and dotted, the name plain', 'LOCALHOST.', [clientHello('localhost')]],
    ['no name, to an address', '127.0.0.1', [clientHello(null)]],
    // Java's JSSE (HttpsURLConnection, Apache's client) sends SNI only for names with a dot.
    ['no name, to a host name without a dot', 'localhost', [clientHello(null)]],
    ['the name, to a host name with a dot', 'svc.lk.test', [clientHello('SVC.lk.test.')]],
  ]
  let sent = 0
  for (const [name, host, writes] of cases) {
    const { sock } = await openTunnel(s.sidecar.port, raw.port, host)
    for (const [i, w] of writes.entries()) {
      if (i > 0) {
        await sleep(30)
        t.equal(raw.bytes(), sent, `${name}: nothing reached the upstream before the ClientHello was whole`)
      }
      sock.write(w)
    }
    sent += writes.reduce((n, w) => n + w.length, 0)
    for (let i = 0; i < 100 && raw.bytes() < sent; i++) await sleep(10)
    t.equal(raw.bytes(), sent, `${name}: every byte reached the upstream`)
    sock.destroy()
  }
  const events = await s.audit(cases.length)
  t.same(events.map((e) => [e.via, e.error]), cases.map(() => ['connect', null]), 'each recorded as an allowed tunnel')
})

t.test('real clients: curl and Node naming the host go through; Node and openssl naming another get the alert, nothing sent', async (t) => {
  const { s, tlsUpstream, raw } = await rig(t)
  const ca = testPki().ca

  const curl = await run('curl', ['-sS', '--cacert', testPki().caFile, '-x', s.proxy, `https://localhost:${tlsUpstream.port}/curl`])
  t.equal(curl.stdout, 'ok', 'curl through -x (SNI localhost) is answered')

  /** Node's TLS over a tunnel; resolves with the response, or the error TLS ended on. */
  const nodeTls = async (host: string, port: number, servername: string | undefined) => {
    const { sock } = await openTunnel(s.sidecar.port, port, host)
    return new Promise<string>((resolve) => {
      setTimeout(() => resolve('timeout'), 1500).unref()
      const tls = tlsConnect({ socket: sock, ca, host, ...(servername === undefined ? {} : { servername }) })
      let body = ''
      tls.on('secureConnect', () => tls.write(`GET /node HTTP/1.1\r\nHost: ${host}:${port}\r\nConnection: close\r\n\r\n`))
      tls.on('data', (d: Buffer) => (body += d.toString()))
      tls.on('end', () => resolve(body))
      tls.on('error', (err: Error) => resolve(`error: ${err.message}`))
    })
  }
  t.match(await nodeTls('localhost', raw.port, 'other.example'), /^error: .*alert access denied/, "Node's tls.connect naming another server gets access_denied")
  t.equal(raw.bytes(), 0, 'and the upstream was sent nothing')
  t.match(await nodeTls('127.0.0.1', tlsUpstream.port, undefined), /^HTTP\/1\.1 200 [\s\S]*\r\n\r\n2\r\nok\r\n/, 'Node to an address sends no server name, and is answered')
  t.match(await nodeTls('localhost', tlsUpstream.port, 'localhost'), /^HTTP\/1\.1 200 [\s\S]*\r\n\r\n2\r\nok\r\n/, 'Node naming the host is answered (given a socket, it sends a name only when told one)')

  const which = await run('which', ['openssl']).catch(() => null)
  if (which === null) t.comment('SKIP: openssl is not installed: s_client -proxy not tried')
  else {
    const openssl = await run('openssl', ['s_client', '-proxy', `127.0.0.1:${s.sidecar.port}`, '-connect', `localhost:${raw.port}`, '-servername', 'evil.example'], { timeout: 2000 }).catch((e: { stdout: string; stderr: string }) => e)
    t.match(openssl.stdout + openssl.stderr, /alert access denied/, 'openssl s_client -servername evil.example gets access_denied')
    t.equal(raw.bytes(), 0, 'and the upstream was sent nothing')
  }
  const events = await s.audit(5)
  t.same(
    events.filter((e) => e.error === 'LK_TLS_NAME_MISMATCH').map((e) => e.reason),
    [`the TLS server name "other.example" is not the CONNECT's host "localhost"`, ...(which === null ? [] : [`the TLS server name "evil.example" is not the CONNECT's host "localhost"`])],
    'each refusal is audited naming both names',
  )
})

t.test('in report mode too: the policy lets a denied host through as "report", but not a tunnel naming another server', async (t) => {
  const raw = await startTcpUpstream(t)
  const s = await startTestSidecar({ policy: { mode: 'report', default: 'deny' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [raw.port] }] } })
  t.teardown(() => s.close())
  const got = await refusedTunnel(s, raw, 'localhost', [clientHello('other.example')], 0)
  t.same(got.answer, ACCESS_DENIED, 'the alert')
  t.equal(got.upstreamBytes, 0, 'nothing sent upstream')
  t.match(got.event, { host: 'localhost', decision: 'report', error: 'LK_TLS_NAME_MISMATCH', reason: /"other\.example" is not the CONNECT's host "localhost"/ }, 'recorded with the policy\'s report decision and the refusal')
})

/**
 * A real TLS server (Node's OpenSSL) behind a counting relay: what reached it, and every server
 * name its TLS stack was asked for. `ecdhCurve` P-384 alone, so a client whose key share is
 * X25519's is asked to retry (a HelloRetryRequest).
 */
async function retryingServer(t: { teardown(fn: () => unknown): void }) {
  const pki = testPki()
  const asked: string[] = []
  const server = createTlsServer({
    key: pki.key,
    cert: pki.cert,
    ecdhCurve: 'P-384',
    SNICallback: (name, done) => {
      asked.push(name)
      done(null, null as unknown as SecureContext)
    },
  }, (s) => s.end('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok'))
  server.on('tlsClientError', () => {})
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const relay = await startTcpUpstream(t, (s) => {
    const up = netConnect((server.address() as AddressInfo).port, '127.0.0.1')
    up.on('error', () => s.destroy())
    s.pipe(up).pipe(s)
  })
  const s = await startTestSidecar(loopbackPolicy([relay.port]))
  t.teardown(async () => {
    await s.close()
    server.close()
  })
  return { s, relay, asked }
}

/**
 * A TLS 1.3 ClientHello naming `name`, offering X25519 and P-384, with a P-384 key share or
 * (`share` false) none, which asks the server to pick: a HelloRetryRequest for P-384.
 */
const tls13Hello = (name: string, share: boolean) => {
  const p384 = share ? createECDH('secp384r1').generateKeys() : Buffer.alloc(0)
  const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff])
  const keyShare = share ? Buffer.concat([u16(4 + p384.length), Buffer.from([0, 0x18]), u16(p384.length), p384]) : Buffer.from([0, 0])
  return records(
    handshake(
      helloBody([
        serverNameExtension(name),
        extension(43, Buffer.from([2, 3, 4])), // supported_versions: TLS 1.3
        extension(10, Buffer.from([0, 4, 0, 0x1d, 0, 0x18])), // supported_groups: x25519, secp384r1
        extension(13, Buffer.from([0, 4, 0x04, 0x03, 0x08, 0x04])), // signature_algorithms
        extension(51, keyShare), // key_share
      ]),
    ),
  )
}
const HELLO_RETRY_RANDOM = Buffer.from('cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c', 'hex')

t.test("a second ClientHello after the server's HelloRetryRequest is held to the CONNECT's host as the first is", async (t) => {
  const { s, relay, asked } = await retryingServer(t)
  const { sock, received } = await openTunnel(s.sidecar.port, relay.port, 'localhost')
  const first = tls13Hello('localhost', false)
  sock.write(first)
  for (let i = 0; i < 200 && received().length < 43; i++) await sleep(5)
  t.same(received().subarray(11, 43), HELLO_RETRY_RANDOM, 'the real server asked for another ClientHello (a HelloRetryRequest), relayed to the agent')
  const retryAnswer = received().length
  const closed = once(sock, 'close')
  sock.write(tls13Hello('other.example', true))
  await Promise.race([closed, sleep(1500)])
  t.same(received().subarray(retryAnswer), ACCESS_DENIED, 'the second ClientHello naming another server gets the access_denied alert')
  t.equal(relay.bytes(), first.length, 'the server got the first ClientHello and not a byte of the second')
  t.same(asked, ['localhost'], "the server's TLS stack was never asked for the other name")
  const [event] = await s.audit(1)
  t.match(event, { via: 'connect', host: 'localhost', status: 403, error: 'LK_TLS_NAME_MISMATCH', reason: /^in the ClientHello after the server's HelloRetryRequest, the TLS server name "other\.example" is not the CONNECT's host "localhost"$/ }, 'audited with why')

  // The second ClientHello sent unasked, in the same write as the first: held until the server answered.
  const ahead = await openTunnel(s.sidecar.port, relay.port, 'localhost')
  const aheadClosed = once(ahead.sock, 'close')
  ahead.sock.write(Buffer.concat([first, tls13Hello('other.example', true)]))
  await Promise.race([aheadClosed, sleep(1500)])
  t.same(ahead.received().subarray(11, 43), HELLO_RETRY_RANDOM, 'sent ahead: the server still asked for a retry')
  t.same(ahead.received().subarray(-ACCESS_DENIED.length), ACCESS_DENIED, 'and the second ClientHello, held till then, got the alert')
  t.equal(relay.bytes(), 2 * first.length, 'the server got only the first ClientHello of it')
  t.same(asked, ['localhost', 'localhost'], 'and was never asked for the other name')
})

t.test('a real client asked to retry completes its handshake through the tunnel, its second ClientHello passed', async (t) => {
  const { s, relay, asked } = await retryingServer(t)
  const { sock } = await openTunnel(s.sidecar.port, relay.port, 'localhost')
  const tls = tlsConnect({ socket: sock, ca: testPki().ca, servername: 'localhost', ecdhCurve: 'X25519:P-384' })
  tls.on('error', () => {})
  await once(tls, 'secureConnect')
  t.match(tls.getEphemeralKeyInfo(), { name: /384/ }, 'P-384 was agreed: the client offered a key share for X25519 alone, so the server asked it to retry')
  tls.write('GET / HTTP/1.1\r\nHost: localhost\r\n\r\n')
  let body = ''
  tls.on('data', (d: Buffer) => (body += d.toString()))
  await once(tls, 'end')
  t.match(body, /^HTTP\/1\.1 200 OK[\s\S]*\r\n\r\nok$/, 'and its request was answered')
  t.same(asked, ['localhost'], 'the server was asked for the host')
  const [event] = await s.audit(1)
  t.match(event, { via: 'connect', host: 'localhost', status: 200, error: null }, 'recorded as an allowed tunnel')
})
