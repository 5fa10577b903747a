// Upstream faults map to coded, retryable-or-not refusals that name no URL and no credential.
import t from 'tap'
import { createServer, type Server } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { createServer as createHttpServer } from 'node:http'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary, sidecarInFrontOf, loopbackPolicy, type Upstream } from '../helpers/harness.js'
import { testPki } from '../helpers/tls.js'
import { upstreamError } from '../../proxy/forward/upstream-errors.js'

const run = promisify(execFile)

t.test('timeouts, resets and untrusted certificates', async (t) => {
  // A server that accepts and then says nothing: the sidecar's header timeout must fire.
  const silent: Server = createServer(() => {})
  silent.listen(0, '127.0.0.1')
  await once(silent, 'listening')
  const silentPort = (silent.address() as AddressInfo).port
  // A server that hangs up on every request.
  const rude: Server = createServer((s) => s.once('data', () => s.destroy()))
  rude.listen(0, '127.0.0.1')
  await once(rude, 'listening')
  const rudePort = (rude.address() as AddressInfo).port
  // A TLS upstream whose CA the sidecar was not told to trust.
  const untrusted = await startUpstream({ tls: true })
  const ports = [silentPort, rudePort, untrusted.port]
  const s = await startTestSidecar({
    sidecar: { timeouts: { headers_ms: 300, connect_ms: 500 } },
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports }] },
    routes: { untrusted: `https://localhost:${untrusted.port}` },
    credentials: [
      { id: 'silent', audience: `http://127.0.0.1:${silentPort}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
      { id: 'untrusted', audience: `https://localhost:${untrusted.port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    silent.close()
    rude.close()
    await untrusted.close()
  })
  const get = (target: string) => rawRequest(s.sidecar.port, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)

  const timeout = await get(`http://127.0.0.1:${silentPort}/slow?token=abc`)
  t.equal(timeout.status, 504)
  t.same(JSON.parse(timeout.body), { error: 'upstream_timeout', code: 'LK_UPSTREAM_TIMEOUT', rule: null, reason: 'the upstream did not send response headers in time', retryable: true })

  const reset = await get(`http://127.0.0.1:${rudePort}/x`)
  t.equal(reset.status, 502)
  t.equal(reset.headers['x-latchkey-error'], 'LK_UPSTREAM_UNREACHABLE')
  t.equal(JSON.parse(reset.body).retryable, true)
  t.equal(reset.headers['x-should-retry'], 'true', 'said where SDKs look too')

  // The same failures after a POST went out: it may have been acted on, so it is not to be sent again.
  const post = (target: string) => rawRequest(s.sidecar.port, `POST ${target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`, 400)
  const postReset = await post(`http://127.0.0.1:${rudePort}/orders`)
  t.equal(postReset.status, 502)
  t.same(JSON.parse(postReset.body), { error: 'upstream_unreachable', code: 'LK_UPSTREAM_UNREACHABLE', rule: null, reason: 'the upstream closed the connection; the request may have reached it, and a POST is not safe to repeat', retryable: false })
  t.equal(postReset.headers['x-should-retry'], 'false', 'an SDK that retries any 5xx is told not to')
  const postTimeout = await post(`http://127.0.0.1:${silentPort}/orders`)
  t.equal(postTimeout.status, 504)
  t.match(JSON.parse(postTimeout.body), { code: 'LK_UPSTREAM_TIMEOUT', reason: /in time; the request may have reached it, and a POST is not safe to repeat$/, retryable: false })
  t.equal(postTimeout.headers['x-should-retry'], 'false')
  const patch = await rawRequest(s.sidecar.port, `PATCH http://127.0.0.1:${rudePort}/orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`, 400)
  t.match(JSON.parse(patch.body), { code: 'LK_UPSTREAM_UNREACHABLE', retryable: false }, 'PATCH is not idempotent either')
  const put = await rawRequest(s.sidecar.port, `PUT http://127.0.0.1:${rudePort}/orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`, 400)
  t.same(JSON.parse(put.body), { error: 'upstream_unreachable', code: 'LK_UPSTREAM_UNREACHABLE', rule: null, reason: 'the upstream closed the connection', retryable: true }, 'PUT is idempotent: retryable as before')

  const tls = await rawRequest(s.sidecar.port, `GET /untrusted/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`, 400)
  t.equal(tls.status, 502)
  t.equal(tls.headers['x-latchkey-error'], 'LK_UPSTREAM_TLS')
  t.match(JSON.parse(tls.body).reason, /TLS certificate was not accepted/)
  t.equal(untrusted.requests.length, 0, 'no request, and so no credential, went to the unverified upstream')

  const audit = await s.audit()
  t.same(audit.map((e) => [e.status, e.error]), [
    [504, 'LK_UPSTREAM_TIMEOUT'],
    [502, 'LK_UPSTREAM_UNREACHABLE'],
    [502, 'LK_UPSTREAM_UNREACHABLE'],
    [504, 'LK_UPSTREAM_TIMEOUT'],
    [502, 'LK_UPSTREAM_UNREACHABLE'],
    [502, 'LK_UPSTREAM_UNREACHABLE'],
    [502, 'LK_UPSTREAM_TLS'],
  ])
  t.notMatch(JSON.stringify(audit), /token=abc/, 'the query string is not audited')
  assertNoCanary(t, s, timeout.raw, reset.raw, postReset.raw, postTimeout.raw, patch.raw, put.raw, tls.raw)
})

// Each TLS failure says what it is; none is "retry later", and no credential went out in any.
t.test('TLS failures are LK_UPSTREAM_TLS, not retryable, each with an honest reason', async (t) => {
  const pki = testPki()
  const SAN = 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n'
  const upstreams: Record<string, Upstream> = {
    // A server certificate whose extendedKeyUsage is clientAuth only: OpenSSL's INVALID_PURPOSE.
    purpose: await startUpstream({ tlsOptions: pki.leaf(SAN + 'extendedKeyUsage=clientAuth\n') }),
    // A certificate naming localhost only in its CN: Node would accept it, browsers and Go do not.
    nosan: await startUpstream({ tlsOptions: pki.leaf('basicConstraints=CA:FALSE\n') }),
    // Servers that want a client certificate: TLS 1.2 answers handshake_failure, TLS 1.3 certificate_required.
    mtls12: await startUpstream({ tlsOptions: { requestCert: true, rejectUnauthorized: true, ca: pki.ca, maxVersion: 'TLSv1.2' } }),
    mtls13: await startUpstream({ tlsOptions: { requestCert: true, rejectUnauthorized: true, ca: pki.ca, minVersion: 'TLSv1.3' } }),
    tls10: await startUpstream({ tlsOptions: { minVersion: 'TLSv1', maxVersion: 'TLSv1', ciphers: 'DEFAULT@SECLEVEL=0' } }),
    // An https:// route to a plain-HTTP server.
    plain: await startUpstream(),
  }
  for (const u of Object.values(upstreams)) u.server.on('tlsClientError', () => {})
  const routes = Object.fromEntries(Object.entries(upstreams).map(([name, u]) => [name, `https://localhost:${u.port}`]))
  const s = await startTestSidecar({
    sidecar: { upstream_ca_file: pki.caFile },
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: Object.values(upstreams).map((u) => u.port) }] },
    routes,
    credentials: Object.entries(routes).map(([id, audience]) => ({ id, audience, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } })),
  })
  t.teardown(async () => {
    await s.close()
    for (const u of Object.values(upstreams)) await u.close()
  })
  const expected: Record<string, RegExp> = {
    purpose: /^the upstream's TLS certificate was not accepted \(INVALID_PURPOSE\)$/,
    nosan: /^the upstream's TLS certificate has no subjectAltName \(a host named only in its CN is not accepted\) \(CERT_NO_SUBJECT_ALT_NAME\)$/,
    mtls12: /^the TLS handshake failed: the upstream refused it \(it may require a client certificate, or share no cipher with the sidecar\) \(ERR_SSL_(SSLV3|SSL\/TLS)_ALERT_HANDSHAKE_FAILURE\)$/,
    mtls13: /^the TLS handshake failed: the upstream requires a client certificate \(ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED\)$/,
    tls10: /^the TLS handshake failed: the upstream offers no TLS version the sidecar accepts \(1\.2 or later\) \(ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION\)$/,
    plain: /^the upstream does not speak TLS on this port \(ERR_SSL_WRONG_VERSION_NUMBER\)$/,
  }
  const json = (body: string): { reason?: string } => {
    try {
      return JSON.parse(body) as { reason?: string }
    } catch {
      return {}
    }
  }
  const seen: string[] = []
  for (const name of Object.keys(upstreams)) {
    const r = await rawRequest(s.sidecar.port, `GET /${name}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`, 300)
    seen.push(r.raw)
    t.equal(r.status, 502, `${name}: 502`)
    t.match(json(r.body), { code: 'LK_UPSTREAM_TLS', reason: expected[name], retryable: false }, `${name}: ${json(r.body).reason}`)
    t.equal(upstreams[name]!.requests.length, 0, `${name}: no request, and so no credential, reached the upstream`)
  }
  // A WebSocket handshake dials its own TLS connection: the same checks hold there.
  const ws = await rawRequest(s.sidecar.port, `GET /nosan/socket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`, 300)
  seen.push(ws.raw)
  t.match([ws.status, json(ws.body)], [502, { code: 'LK_UPSTREAM_TLS', reason: expected.nosan }], 'a WebSocket to a certificate without a SAN is refused too')
  t.same((await s.audit()).map((e) => e.error), [...Object.keys(upstreams).map(() => 'LK_UPSTREAM_TLS'), 'LK_UPSTREAM_TLS'], 'audited as TLS failures')
  assertNoCanary(t, s, ...seen)
})

t.test('every X.509 verification code Node reports is a TLS refusal; socket failures stay retryable', async (t) => {
  // Node's complete list (src/crypto/crypto_common.cc, X509ErrorCode; UNSPECIFIED for any other).
  const verify = 'UNABLE_TO_GET_ISSUER_CERT UNABLE_TO_GET_CRL UNABLE_TO_DECRYPT_CERT_SIGNATURE UNABLE_TO_DECRYPT_CRL_SIGNATURE UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY CERT_SIGNATURE_FAILURE CRL_SIGNATURE_FAILURE CERT_NOT_YET_VALID CERT_HAS_EXPIRED CRL_NOT_YET_VALID CRL_HAS_EXPIRED ERROR_IN_CERT_NOT_BEFORE_FIELD ERROR_IN_CERT_NOT_AFTER_FIELD ERROR_IN_CRL_LAST_UPDATE_FIELD ERROR_IN_CRL_NEXT_UPDATE_FIELD OUT_OF_MEM DEPTH_ZERO_SELF_SIGNED_CERT SELF_SIGNED_CERT_IN_CHAIN UNABLE_TO_GET_ISSUER_CERT_LOCALLY UNABLE_TO_VERIFY_LEAF_SIGNATURE CERT_CHAIN_TOO_LONG CERT_REVOKED INVALID_CA PATH_LENGTH_EXCEEDED INVALID_PURPOSE CERT_UNTRUSTED CERT_REJECTED HOSTNAME_MISMATCH UNSPECIFIED'
  // A name a later Node may add, in the shape Node gives a verification error (a plain Error and its code).
  for (const code of [...verify.split(' '), 'SOME_FUTURE_X509_CODE']) {
    const mapped = upstreamError(Object.assign(new Error('verification failed'), { code }))
    t.same([mapped.code, mapped.reason], ['LK_UPSTREAM_TLS', `the upstream's TLS certificate was not accepted (${code})`], code)
  }
  const reset = upstreamError(Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET', errno: -104, syscall: 'read' }))
  t.same([reset.code, reset.reason], ['LK_UPSTREAM_UNREACHABLE', 'the upstream closed the connection'])
  const odd = upstreamError(Object.assign(new Error('x'), { code: 'ESOMETHING', errno: -1, syscall: 'connect' }))
  t.equal(odd.code, 'LK_UPSTREAM_UNREACHABLE', 'an errno failure is the network, not a certificate')
})

t.test('a broken response head is the upstream protocol failing, not the upstream being unreachable', async (t) => {
  // A raw upstream whose head outgrows any sane limit.
  const raw = (answer: string): Promise<Server> =>
    new Promise((resolve) => {
      const server = createServer((s) => {
        s.on('error', () => {}) // the sidecar hangs up on a head it will not read
        s.once('data', () => s.end(answer))
      })
      server.listen(0, '127.0.0.1', () => resolve(server))
    })
  const huge = await raw(`HTTP/1.1 200 OK\r\nX-Big: ${'a'.repeat(70_000)}\r\nContent-Length: 2\r\n\r\nok`)
  const ports = [(huge.address() as AddressInfo).port]
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports }] } })
  t.teardown(async () => {
    await s.close()
    huge.close()
  })
  const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${ports[0]}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)
  t.equal(r.status, 502)
  t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: "the upstream's response headers were too large (over 64 KiB)", retryable: false })
  t.match((await s.audit()).at(-1), { status: 502, error: 'LK_UPSTREAM_PROTOCOL' }, 'audited with its cause')
})

t.test('a response head larger than Node\'s 16 KiB and within 64 KiB is relayed whole, as curl reads it direct', async (t) => {
  // A long Content-Security-Policy, a paginated Link, many cookies: found by a real-client probe,
  // where such a call worked direct and failed through the sidecar (undici's default was Node's 16 KiB).
  const upstream = await startUpstream({
    handler: (req, res) => {
      const kb = Number(/\/kb\/(\d+)/.exec(req.url)?.[1] ?? 0)
      res.writeHead(200, { 'x-big': 'h'.repeat(kb * 1024 - 64), 'set-cookie': ['a=1', 'b=2'], 'content-length': '2' }).end('ok')
      return true
    },
  })
  const port = upstream.port
  const s = await startTestSidecar(loopbackPolicy([port]))
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  for (const kb of [17, 40, 63]) {
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/kb/${kb} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)
    t.equal(r.status, 200, `${kb} KiB of headers: answered`)
    t.equal(r.headers['x-big']?.length, kb * 1024 - 64, `${kb} KiB of headers: the header relayed whole`)
    t.equal(r.body, 'ok')
  }
  const over = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/kb/65 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)
  t.equal(over.status, 502, 'past 64 KiB: refused, saying why')
  t.equal(JSON.parse(over.body).reason, "the upstream's response headers were too large (over 64 KiB)")
  t.same((await s.audit()).map((e) => e.status), [200, 200, 200, 502], 'each audited')
})

// A body cut short of what its head framed (a Content-Length, or chunks with no last one) broke
// the framing the upstream chose: LK_UPSTREAM_PROTOCOL, as a bad chunk is, whether it closed or
// reset. It was recorded LK_UPSTREAM_UNREACHABLE ("closed the connection"), as if never reached.
t.test('an upstream that hangs up after a sound head, before its body ends: the agent has what came, then a cut, and the trail says the framing broke', async (t) => {
  const cut: Server = createServer((s) => {
    s.on('error', () => {})
    s.once('data', (d: Buffer) => {
      const path = /^\w+ \S*?(\/[\w-]+) /.exec(d.toString('latin1'))?.[1]
      const chunked = 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n'
      const length = 'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Up: 1\r\n\r\n'
      if (path === '/reset') return void s.write(length + 'part', () => setTimeout(() => s.resetAndDestroy(), 50))
      s.end(
        path === '/broken-chunk'
          ? chunked + 'zz\r\nhello\r\n'
          : path === '/closed-chunked'
            ? chunked
            : path === '/closed-mid-chunks'
              ? chunked + '4\r\npart\r\n'
              : path === '/closed-mid-body'
                ? length + 'part'
                : length,
      )
    })
  })
  const { port, s } = await sidecarInFrontOf(t, cut)
  for (const [path, body] of [['/closed', ''], ['/closed-mid-body', 'part'], ['/reset', 'part'], ['/closed-mid-chunks', 'part'], ['/broken-chunk', '']] as const) {
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)
    t.equal(r.status, 200, `${path}: the head, as it came`)
    t.equal(r.headers['x-up'], '1')
    t.equal(r.body.replace(/^4\r\n|\r\n$/g, ''), body, `${path}: what came of the body, then nothing: the connection is cut, no body pretends to be whole`)
    t.match((await s.audit()).at(-1), { path, status: 200, bytes_out: body.length, error: 'LK_UPSTREAM_PROTOCOL' }, `${path}: audited as the agent got it, with the cause`)
  }
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /^latchkey_calls_total\{[^}]*outcome="LK_UPSTREAM_PROTOCOL"[^}]*\} 5$/m, 'counted under the same code')
  t.notMatch(metrics, /outcome="LK_UPSTREAM_UNREACHABLE"/)
  // An HTTP/1.0 agent reads a body to the close: a close after the head would read as a whole,
  // empty 200. It gets a reset instead.
  const { connect } = await import('node:net')
  const agent = connect(s.sidecar.port, '127.0.0.1')
  await once(agent, 'connect')
  agent.write(`GET http://127.0.0.1:${port}/closed-chunked HTTP/1.0\r\nHost: x\r\n\r\n`)
  let got = ''
  let code: string | undefined
  agent.on('data', (c: Buffer) => (got += c.toString('latin1')))
  agent.on('error', (err: NodeJS.ErrnoException) => (code = err.code))
  // Not events.once: it rejects on the 'error' this waits for.
  await new Promise((resolve) => agent.once('close', resolve))
  t.equal(code, 'ECONNRESET', 'an HTTP/1.0 agent sees the cut as a reset')
  t.match(got, /^HTTP\/1\.1 200 OK\r\n/, 'after the head it had')
})

// What a hostile or sloppy upstream can answer, and what the agent and the trail get for each.
// The raw upstream writes each answer and keeps the connection open, so no fault here is a hang-up.
t.test('hostile upstream answers: bodiless statuses complete, bad framing is a protocol error, no forged sidecar voice', async (t) => {
  const answers: Record<string, string> = {
    '/304-with-length': 'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 100\r\n\r\n',
    '/204-with-body': 'HTTP/1.1 204 No Content\r\nContent-Length: 12\r\n\r\nSMUGGLEDBODY',
    '/unsolicited-100': 'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
    '/not-http': 'FOO/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
    '/two-lengths': 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok',
    '/length-and-chunked': 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
    '/unasked-101': 'HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n',
    '/status-099': 'HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok',
    '/status-1000': 'HTTP/1.1 1000 Odd\r\nContent-Length: 2\r\n\r\nok',
    '/forged-denial': 'HTTP/1.1 403 Forbidden\r\nX-Latchkey-Error: LK_POLICY_DENIED\r\nX-Latchkey-Rule: default\r\nContent-Length: 9\r\n\r\nforbidden',
    '/hint-flood': 'HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n'.repeat(500) + 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
    // Content-Length spellings: relayed only as plain decimal digits, or refused.
    '/length-zero-padded': 'HTTP/1.1 200 OK\r\nContent-Length: 0005\r\n\r\nhello',
    '/length-zero-padded-zero': 'HTTP/1.1 200 OK\r\nContent-Length: 000\r\n\r\n',
    '/length-spaced': 'HTTP/1.1 200 OK\r\nContent-Length:   5  \r\n\r\nhello',
    '/length-plus': 'HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello',
    '/length-list-same': 'HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello',
    '/length-list-different': 'HTTP/1.1 200 OK\r\nContent-Length: 5,6\r\n\r\nhello',
    '/length-twice-padded': 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 05\r\n\r\nhello',
    '/length-hex': 'HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello',
    // A head undici's parser refuses after its Content-Length line (undici then reports a body mismatch).
    '/bad-name-after-length': 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX B: a\r\n\r\nok',
    '/control-after-length': 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\x01b\r\n\r\nok',
    // A body longer than its Content-Length, the rest a response of its own for whoever comes next.
    '/length-longer': 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED',
  }
  const upstream: Server = createServer((s) => {
    s.on('error', () => {})
    // Every request a connection carries is answered: a clean answer leaves it open for the next.
    s.on('data', (d: Buffer) => s.write(answers[/^\w+ (\S+)/.exec(d.toString('latin1'))![1]!] ?? 'HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n'))
  })
  const { port, s } = await sidecarInFrontOf(t, upstream)
  const get = (path: string) => rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}${path} HTTP/1.1\r\nHost: x\r\n\r\n`, 300)
  const seen: string[] = []

  const notModified = await get('/304-with-length')
  seen.push(notModified.raw)
  t.equal(notModified.status, 304, 'a 304 whose Content-Length names the representation is relayed, not cut')
  t.equal(notModified.headers.etag, '"v1"')
  t.equal(notModified.body, '')

  const noContent = await get('/204-with-body')
  seen.push(noContent.raw)
  t.equal(noContent.status, 204, 'a 204 is relayed without the body an upstream tacked on')
  t.equal(noContent.headers['content-length'], undefined, 'and without a Content-Length a 204 must not carry')
  t.equal(noContent.body, '')

  // A client reading `0005` otherwise than undici did (a strict parser refusing it, an old one
  // reading octal) frames the body differently: the agent is told the number undici framed by.
  for (const [path, body] of [
    ['/length-zero-padded', 'hello'],
    ['/length-zero-padded-zero', ''],
    ['/length-spaced', 'hello'],
  ] as const) {
    const r = await get(path)
    seen.push(r.raw)
    t.equal(r.status, 200, `${path}: relayed`)
    t.match(r.raw, new RegExp(`\r\ncontent-length: ${body.length}\r\n`, 'i'), `${path}: with a canonical decimal Content-Length`)
    t.notMatch(r.raw, /content-length: *0\d/i, `${path}: never as the upstream padded it`)
    t.equal(r.body, body, `${path}: the whole body, framed by it`)
  }

  // What the agent is told is what was wrong: a bad head is never called a body that fell short.
  const invalid = 'the upstream sent an invalid HTTP response'
  const reasons: Record<string, string | RegExp> = {
    '/unsolicited-100': 'the upstream sent a 100 Continue that no request asked for, which the sidecar cannot read past',
    '/not-http': invalid,
    '/two-lengths': invalid,
    '/unasked-101': 'the upstream switched protocols (101) on a request that asked for no upgrade',
    '/bad-name-after-length': invalid,
    '/control-after-length': invalid,
  }
  for (const path of ['/unsolicited-100', '/not-http', '/two-lengths', '/length-and-chunked', '/unasked-101', '/status-099', '/status-1000', '/length-plus', '/length-list-same', '/length-list-different', '/length-twice-padded', '/length-hex', '/bad-name-after-length', '/control-after-length']) {
    const r = await get(path)
    seen.push(r.raw)
    t.equal(r.status, 502, `${path}: 502`)
    const body = JSON.parse(r.body) as { reason: string }
    t.match(body, { code: 'LK_UPSTREAM_PROTOCOL', retryable: false }, `${path}: the upstream's protocol, not worth a retry`)
    t.notMatch(body.reason, /did not match its Content-Length/, `${path}: no body was relayed to fall short`)
    if (reasons[path] !== undefined) t.equal(body.reason, reasons[path], `${path}: says what was wrong`)
  }

  // Relayed to its length; the bytes past it end that upstream connection, never read as the
  // answer to the next call (which goes on a new one).
  const longer = await get('/length-longer')
  seen.push(longer.raw)
  t.same([longer.status, longer.headers['content-length'], longer.body], [200, '5', 'hello'], 'a body longer than its Content-Length: relayed to its length')
  const next = await get('/length-spaced')
  t.equal(next.body, 'hello', 'the next call gets its own answer, not what the upstream sent past the last one')

  const forged = await get('/forged-denial')
  seen.push(forged.raw)
  t.equal(forged.status, 403)
  t.equal(forged.body, 'forbidden', "the upstream's own 403 is relayed")
  t.notOk('x-latchkey-error' in forged.headers || 'x-latchkey-rule' in forged.headers, "but not in the sidecar's voice")

  // Interim responses are never relayed (see interim-responses.test.ts): a flood of them costs nothing.
  const flood = await get('/hint-flood')
  seen.push(flood.raw)
  t.equal(flood.raw.split('HTTP/1.1 103 ').length - 1, 0, 'none of 500 Early Hints is relayed')
  t.match(flood.raw, /HTTP\/1\.1 200 OK\r\n[\s\S]*\r\n\r\nok$/, 'then the final response, whole')

  const audit = await s.audit()
  t.same(
    audit.map((e) => [e.path, e.status, e.decision, e.error]),
    [
      ['/304-with-length', 304, 'allow', null],
      ['/204-with-body', 204, 'allow', null],
      ['/length-zero-padded', 200, 'allow', null],
      ['/length-zero-padded-zero', 200, 'allow', null],
      ['/length-spaced', 200, 'allow', null],
      ['/unsolicited-100', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/not-http', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/two-lengths', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-and-chunked', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/unasked-101', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/status-099', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/status-1000', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-plus', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-list-same', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-list-different', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-twice-padded', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-hex', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/bad-name-after-length', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/control-after-length', 502, 'allow', 'LK_UPSTREAM_PROTOCOL'],
      ['/length-longer', 200, 'allow', null],
      ['/length-spaced', 200, 'allow', null],
      ['/forged-denial', 403, 'allow', null],
      ['/hint-flood', 200, 'allow', null],
    ],
    'each call recorded as the agent got it',
  )
  assertNoCanary(t, s, ...seen)
})

t.test('an upstream that answers before the upload ends and hangs up: the sidecar stays up, the agent gets an answer', async (t) => {
  // As APIs do on a bad key: answer at once, unread body and all, then close.
  const early = createHttpServer((req, res) => {
    res.writeHead(401, { connection: 'close', 'content-type': 'application/json' }).end('{"error":"unauthorized"}')
  })
  const { port, s } = await sidecarInFrontOf(t, early)
  const file = join(mkdtempSync(join(tmpdir(), 'lk-upload-')), 'body.bin')
  writeFileSync(file, Buffer.alloc(8_000_000))
  const seen: string[] = []
  for (const framing of [['-H', 'Transfer-Encoding: chunked'], []]) {
    for (let i = 0; i < 3; i++) {
      const r = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-x', `http://127.0.0.1:${s.sidecar.port}`, '-H', 'Expect:', ...framing, '--data-binary', `@${file}`, `http://127.0.0.1:${port}/upload`]).catch((e: { stdout?: string; stderr?: string }) => ({ stdout: e.stdout ?? '', stderr: e.stderr ?? '' }))
      seen.push(r.stdout, r.stderr)
      t.match(r.stdout, /^(401|502)$/, `${framing.length ? 'chunked' : 'Content-Length'} upload ${i + 1}: the upstream's 401, or a coded 502, never a bare reset`)
    }
  }
  const after = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 300)
  t.equal(after.status, 401, 'the sidecar is still up and forwarding')
  const audit = await s.audit()
  t.comment(`uploads answered: ${audit.slice(0, 6).map((e) => `${e.status} (${e.bytes_in} bytes sent on)`).join(', ')}`)
  t.equal(audit.length, 7, 'every call recorded')
  for (const e of audit.slice(0, 6)) t.ok(e.status === 401 || (e.status === 502 && e.error === 'LK_UPSTREAM_UNREACHABLE'), `recorded as the agent got it: ${e.status} ${e.error}`)
  assertNoCanary(t, s, ...seen)
})
