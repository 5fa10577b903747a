// Upstream faults map to coded, retryable-or-not refusals that name no URL and no credential.
import t from 'tap'
import { createServer, type Server } from 'node:net'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary } from '../helpers/harness.js'

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

  const tls = await rawRequest(s.sidecar.port, `GET /untrusted/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 400)
  t.equal(tls.status, 502)
  t.equal(tls.headers['x-latchkey-error'], 'LK_UPSTREAM_TLS')
  t.match(JSON.parse(tls.body).reason, /TLS certificate was not accepted/)
  t.equal(untrusted.requests.length, 0, 'no request, and so no credential, went to the unverified upstream')

  const audit = await s.audit()
  t.same(audit.map((e) => [e.status, e.error]), [
    [504, 'LK_UPSTREAM_TIMEOUT'],
    [502, 'LK_UPSTREAM_UNREACHABLE'],
    [502, 'LK_UPSTREAM_TLS'],
  ])
  t.notMatch(JSON.stringify(audit), /token=abc/, 'the query string is not audited')
  assertNoCanary(t, s, timeout.raw, reset.raw, tls.raw)
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
  t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: /response headers were too large/, retryable: false })
  t.match((await s.audit()).at(-1), { status: 502, error: 'LK_UPSTREAM_PROTOCOL' }, 'audited with its cause')
})
