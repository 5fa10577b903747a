// A request head past the sidecar's limit (MAX_HEADER_BYTES, 16 KiB) is answered 431 Request Header
// Fields Too Large (RFC 6585), coded LK_HEADERS_TOO_LARGE with the JSON body of every refusal, and
// audited: on the proxy port and inside a plaintext CONNECT tunnel; on the admin port the same
// coded 431, not audited (no call was asked for). node:http counts the bytes of the URL and of header names and values, not the `: `
// and line ends between them: the cases here are over the limit by that count.
import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startBearerRig, rawRequest, parseRawResponse, type RawResponse } from '../helpers/harness.js'
import { MAX_HEADER_BYTES } from '../../proxy/listen/server.js'

/** One header whose value takes the URL, Host and header names counted to MAX_HEADER_BYTES + 1. */
function oneBigHeader(requestLine: string, url: string, host: string): string {
  const counted = url.length + 'Host'.length + host.length + 'X-Big'.length
  return `${requestLine}\r\nHost: ${host}\r\nX-Big: ${'a'.repeat(MAX_HEADER_BYTES + 1 - counted)}\r\n\r\n`
}

/** 200 headers of 90 counted bytes each: none large, together over the limit. */
function manySmallHeaders(requestLine: string, host: string): string {
  let head = `${requestLine}\r\nHost: ${host}\r\n`
  for (let i = 0; i < 200; i++) head += `X-Pad-${String(i).padStart(3, '0')}: ${'v'.repeat(81)}\r\n`
  return head + '\r\n'
}

/** A head within the limit, for contrast: the same single header, 400 bytes short of it. */
function underTheLimit(requestLine: string, host: string): string {
  return `${requestLine}\r\nHost: ${host}\r\nX-Big: ${'a'.repeat(MAX_HEADER_BYTES - 400)}\r\nConnection: close\r\n\r\n`
}

async function throughTunnel(port: number, host: string, request: string): Promise<RawResponse> {
  const sock = connect(port, '127.0.0.1')
  await once(sock, 'connect')
  sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  const [established] = (await once(sock, 'data')) as [Buffer]
  if (!established.toString('latin1').startsWith('HTTP/1.1 200')) throw new Error('tunnel refused')
  let raw = ''
  // Until the sidecar closes the tunnel, or one whole response has come (a 200 keeps it open).
  const complete = new Promise<void>((resolve) => {
    sock.on('data', (d: Buffer) => {
      raw += d.toString('latin1')
      const r = parseRawResponse(raw)
      if (r.status && Buffer.byteLength(r.body, 'latin1') >= Number(r.headers['content-length'] ?? Infinity)) resolve()
    })
    sock.once('close', () => resolve())
  })
  sock.on('error', () => {})
  sock.write(request)
  await Promise.race([complete, new Promise((r) => setTimeout(r, 3000).unref())])
  sock.destroy()
  return parseRawResponse(raw)
}

function assertRefusal(t: Test, name: string, r: RawResponse): void {
  t.equal(r.status, 431, `${name}: 431`)
  t.match(r.raw, /^HTTP\/1\.1 431 Request Header Fields Too Large \(LK_HEADERS_TOO_LARGE: /, `${name}: the status line says it`)
  t.equal(r.headers['x-latchkey-error'], 'LK_HEADERS_TOO_LARGE', `${name}: coded`)
  t.equal(r.headers['content-type'], 'application/json')
  t.equal(r.headers.connection, 'close', `${name}: the connection is closed`)
  t.same(
    JSON.parse(r.body),
    { error: 'headers_too_large', code: 'LK_HEADERS_TOO_LARGE', rule: null, reason: `request headers too large (request line and headers over ${MAX_HEADER_BYTES} bytes)`, retryable: false },
    `${name}: the JSON body of every refusal`,
  )
}

t.test('a head too large is a coded 431 on the proxy port and inside a tunnel, audited', async (t) => {
  const { upstream, s, host } = await startBearerRig(t)
  const url = `http://${host}/x`
  const cases: [string, 'absolute' | 'tunnelled', () => Promise<RawResponse>][] = [
    ['one header just over the limit', 'absolute', () => rawRequest(s.sidecar.port, oneBigHeader(`GET ${url} HTTP/1.1`, url, host))],
    ['many small headers summing over it', 'absolute', () => rawRequest(s.sidecar.port, manySmallHeaders(`GET ${url} HTTP/1.1`, host))],
    ['one header just over, in a tunnel', 'tunnelled', () => throughTunnel(s.sidecar.port, host, oneBigHeader('GET /x HTTP/1.1', '/x', host))],
    ['many small headers, in a tunnel', 'tunnelled', () => throughTunnel(s.sidecar.port, host, manySmallHeaders('GET /x HTTP/1.1', host))],
  ]
  for (const [name, via, send] of cases) {
    const auditBefore = (await s.audit()).length
    assertRefusal(t, name, await send())
    const events = (await s.audit()).slice(auditBefore).filter((e) => e.method !== 'CONNECT')
    t.match(events, [{ via, status: 431, error: 'LK_HEADERS_TOO_LARGE', reason: /request headers too large/ }], `${name}: audited`)
    t.equal(events.length, 1, `${name}: one event`)
  }
  t.equal(upstream.requests.length, 0, 'nothing reached the upstream')

  const under = await rawRequest(s.sidecar.port, underTheLimit(`GET ${url} HTTP/1.1`, host))
  t.equal(under.status, 200, 'a head within the limit is served')
  const underTunnelled = await throughTunnel(s.sidecar.port, host, underTheLimit('GET /x HTTP/1.1', host))
  t.equal(underTunnelled.status, 200, 'and inside a tunnel')
})

t.test('the admin port answers a head too large with 431 too', async (t) => {
  const { s } = await startBearerRig(t)
  const host = `127.0.0.1:${s.sidecar.adminPort}`
  for (const [name, head] of [
    ['one header just over the limit', oneBigHeader('GET /healthz HTTP/1.1', '/healthz', host)],
    ['many small headers', manySmallHeaders('GET /healthz HTTP/1.1', host)],
  ] as const) {
    assertRefusal(t, `admin port, ${name}`, await rawRequest(s.sidecar.adminPort, head))
  }
  const malformed = await rawRequest(s.sidecar.adminPort, 'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n')
  t.equal(malformed.status, 400, 'a malformed head: 400')
  t.same(JSON.parse(malformed.body), { error: 'bad_request', code: 'LK_BAD_REQUEST', rule: null, reason: 'malformed HTTP request (HPE_INVALID_HEADER_TOKEN): Invalid header token', retryable: false }, 'saying what the parser refused')
  t.equal((await rawRequest(s.sidecar.adminPort, underTheLimit('GET /healthz HTTP/1.1', host))).status, 200, 'within the limit: served')
  t.same(await s.audit(), [], 'the admin port audits none of it: no call was asked for')
})
