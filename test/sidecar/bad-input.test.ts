// Framing tricks on a raw socket: each is refused with a coded 400 and an audit event, and the
// upstream receives nothing; or, where the issue says to normalise, it is normalised.
import t from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { startUpstream, startTestSidecar, loopbackPolicy, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

t.test('refused framings', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    credentials: [{ id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const port = s.sidecar.port
  const target = `http://127.0.0.1:${upstream.port}/x`
  const host = `127.0.0.1:${upstream.port}`
  const table: [string, string, RegExp][] = [
    ['duplicate Host', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nHost: evil.example\r\n\r\n`, /duplicate Host/],
    ['duplicate Proxy-Authorization', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nProxy-Authorization: Basic dGFzazph\r\nproxy-authorization: Basic dGFzazpi\r\n\r\n`, /duplicate Proxy-Authorization/],
    // The password is the canary: what the refusal records must not hold it.
    ['absolute URI with userinfo', `GET http://user:${CANARY}@127.0.0.1:${upstream.port}/x?q=1 HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /userinfo/],
    ['an empty authority hiding userinfo', `GET http:///127.0.0.1:1@127.0.0.1:${upstream.port}/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /empty authority/],
    ['an encoded NUL in the path', `GET http://${host}/admin%00/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /control character/],
    ['an encoded CR ending a path segment', `GET http://${host}/admin%0d/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /control character/],
    ['an overlong UTF-8 dot in the path', `GET http://${host}/%C0%AE%C0%AE/admin HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /not UTF-8/],
    ['userinfo hiding the real host', `GET http://127.0.0.1:${upstream.port}@169.254.169.254/ HTTP/1.1\r\nHost: x\r\n\r\n`, /userinfo/],
    ['TE gzip, chunked', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n`, /exactly "chunked"|malformed/],
    ['TE twice', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, /exactly "chunked"|malformed/],
    ['TE identity', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: identity\r\n\r\n`, /exactly "chunked"|malformed/],
    ['TE on HTTP/1.0', `POST ${target} HTTP/1.0\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, /HTTP\/1\.0|malformed/],
    // llhttp refuses these before checkFraming sees them: its own reason is given after its code, which stands for several faults.
    ['CL and TE together', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_TRANSFER_ENCODING\): Transfer-Encoding can't be present with Content-Length$/],
    ['TE before CL', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_CONTENT_LENGTH\): Content-Length can't be present with Transfer-Encoding$/],
    ['two agreeing Content-Lengths in one line', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 5, 5\r\n\r\nhello`, /^malformed HTTP request \(HPE_INVALID_CONTENT_LENGTH\): Invalid character in Content-Length$/],
    ['a signed Content-Length', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: +5\r\n\r\nhello`, /^malformed HTTP request \(HPE_INVALID_CONTENT_LENGTH\): Invalid character in Content-Length$/],
    ['TE ending in a comma', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_TRANSFER_ENCODING\): Invalid `Transfer-Encoding` header value$/],
    ['a NUL in a header value', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-A: a\x00b\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Invalid header value char$/],
    ['a bare CR in a header value', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-A: a\rb\r\n\r\n`, /^malformed HTTP request \(HPE_LF_EXPECTED\): Missing expected LF after header value$/],
    // Sent on, it would be written again from a JavaScript number: 9007199254740992, one byte less.
    ['a Content-Length past 2^53', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 9007199254740993\r\n\r\nhello`, /^Content-Length is larger than a body this sidecar can forward \(2\^53 - 1 bytes\)$/],
    ['a Content-Length of 2^64 - 1', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 18446744073709551615\r\n\r\nhello`, /^Content-Length is larger than/],
    ['two different Content-Lengths', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab`, /Content-Length|malformed/],
    ['request line claiming HTTP/2', `GET ${target} HTTP/2.0\r\nHost: ${host}\r\n\r\n`, /HTTP\/2|malformed/],
    ['HTTP/2 preface', `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, /^an HTTP\/2 connection preface \(prior knowledge\): this sidecar serves HTTP\/1\.1 only/],
    ['CONNECT without a port', `CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, /explicit port/],
    ['CONNECT with two Hosts', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\nHost: 169.254.169.254:80\r\n\r\n`, /duplicate Host/],
    ['CONNECT with two Proxy-Authorizations', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\nProxy-Authorization: Basic dGFzazph\r\nProxy-Authorization: Basic dGFzazpi\r\n\r\n`, /duplicate Proxy-Authorization/],
    ['CONNECT with a path', `CONNECT 127.0.0.1:${upstream.port}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, /no path/],
    ['CONNECT with a body', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 28\r\n\r\nDELETE /x HTTP/1.1\r\nHost: a\r\n`, /CONNECT carries no body/],
    ['CONNECT with a chunked body', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, /CONNECT carries no body|malformed/],
    ['CONNECT to port 0', `CONNECT 127.0.0.1:000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, /port out of range/],
    ['port 0', `GET http://127.0.0.1:0/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /port 0/],
    // Not sent to DNS, to come back a retryable 502 quoting all of it.
    ['a host name longer than DNS allows', `GET http://${'a'.repeat(5000)}.example/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /^request target host name is longer than DNS allows \(253 characters, 63 a label\)$/],
    ['CONNECT to a host name longer than DNS allows', `CONNECT ${'a.'.repeat(150)}example:443 HTTP/1.1\r\nHost: x\r\n\r\n`, /^request target host name is longer than DNS allows/],
    ['control character in a header', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-A: a\x01b\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Invalid header value char$/],
    ['space before the colon', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-A : b\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Invalid header token$/],
    ['a space in a header name', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nAuthor ization: b\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Invalid header token$/],
    ['bare LF line endings', `GET ${target} HTTP/1.1\nHost: ${host}\nX: y\n\n`, /malformed/],
    ['obsolete line folding', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-A: a\r\n b\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Unexpected whitespace after header value$/],
    ['a folded Host', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\n evil.example\r\n\r\n`, /^malformed HTTP request \(HPE_INVALID_HEADER_TOKEN\): Unexpected whitespace after header value$/],
    ['non-http scheme', `GET ftp://127.0.0.1/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /http:\/\/ or https:\/\//],
    ['asterisk form', `OPTIONS * HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /asterisk-form/],
    // curl sends a proxy raw UTF-8 (`?q=café`) that it percent-encodes for a server: told how to send it.
    ['raw UTF-8 in the request target', `GET http://${host}/search?q=caf\xc3\xa9 HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /HPE_INVALID_URL\): the request target holds a byte .* percent-encode its UTF-8 bytes \(U\+00E9 is %C3%A9\)$/],
    // Other targets the parser refuses, each told what is wrong with it, not that it holds such a byte.
    ['a fragment straight after the authority', `GET http://${host}#x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /HPE_INVALID_URL\): the request target holds a fragment \(#\.\.\.\), which is never sent/],
    ['one slash after the scheme', `GET http:/${host}/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /HPE_INVALID_URL\): the request target must be a path \(\/\.\.\.\) or an absolute URL beginning http:\/\/ or https:\/\/$/],
    ['no slashes after the scheme', `GET http:${host}/x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /HPE_INVALID_URL\): the request target must be a path/],
    ['backslashes after the scheme', `GET http:\\\\${host}\\x HTTP/1.1\r\nHost: ${host}\r\n\r\n`, /HPE_INVALID_URL\): the request target must be a path/],
    // What the body is read by, dropped on the way: a typeless `_method=DELETE` POST is a form to Rack.
    ['Connection naming Content-Type', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\nConnection: content-type\r\nContent-Length: 14\r\n\r\n_method=DELETE`, /Connection header names content-type/],
    ['Connection naming Content-Encoding among others', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Encoding: gzip\r\nConnection: keep-alive , Content-Encoding\r\nContent-Length: 1\r\n\r\nx`, /Connection header names content-encoding/],
    ['Connection naming Content-Length, in a second Connection line', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nConnection: keep-alive\r\nConnection: CONTENT-LENGTH\r\nContent-Length: 1\r\n\r\nx`, /Connection header names content-length/],
    // Spaces JavaScript's trim() takes away, as the forward's reading of Connection does (headers.ts).
    ['Connection naming Content-Type after a no-break space', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\nConnection: keep-alive,\xa0content-type\r\nContent-Length: 14\r\n\r\n_method=DELETE`, /Connection header names content-type/],
    ['Connection naming Content-Type before a no-break space', `POST ${target} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\nConnection: content-type\xa0\r\nContent-Length: 14\r\n\r\n_method=DELETE`, /Connection header names content-type/],
    ['Connection listing what is no header name', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nConnection: keep-alive, x\xa0y\r\n\r\n`, /not a header name/],
    ['h2c offered with another protocol', `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket, h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n`, /h2c/],
  ]
  for (const [name, request, reason] of table) {
    // Each character one byte, as written (a no-break space is the byte 0xA0, not UTF-8's two).
    const res = await rawRequest(port, [...request].every((c) => c.charCodeAt(0) <= 0xff) ? Buffer.from(request, 'latin1') : request)
    t.equal(res.status, 400, `${name}: 400`)
    t.equal(res.headers['x-latchkey-error'], 'LK_BAD_REQUEST', `${name}: coded`)
    const body = JSON.parse(res.body || '{}') as { error?: string; reason?: string; retryable?: boolean }
    t.equal(body.error, 'bad_request', `${name}: JSON body`)
    t.equal(body.retryable, false)
    t.match(body.reason, reason, `${name}: says what was wrong`)
  }
  t.equal(upstream.requests.length, 0, 'nothing was forwarded')
  const audit = await s.audit()
  t.equal(audit.filter((e) => e.error === 'LK_BAD_REQUEST' && e.status === 400).length, table.length, 'every refusal audited')
  // A path refused once its host was read: the trail says where the agent was probing.
  t.match(audit.find((e) => e.reason === 'request path contains an encoded control character'), { host: '127.0.0.1', port: upstream.port, path: '/admin%00/x' }, 'a refused path is recorded with the host and port it was for')
  t.match(audit.find((e) => String(e.reason).includes('not UTF-8')), { host: '127.0.0.1', path: '/%C0%AE%C0%AE/admin' })
  // A target refused for its userinfo: recorded with the host, port and path it names, never the userinfo.
  const userinfo = audit.filter((e) => e.reason === 'request target must not contain userinfo')
  t.same(
    userinfo.map((e) => [e.scheme, e.host, e.port, e.path]),
    [
      ['http', '127.0.0.1', upstream.port, '/x'],
      ['http', '169.254.169.254', 80, '/'],
    ],
    'a refused userinfo is recorded with the host it named: here, once, the metadata address',
  )
  assertNoCanary(t, s)
})

t.test('normalised, never trusted', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    policy: {
      default: 'deny',
      rules: [
        { id: 'no-post', action: 'deny', hosts: ['127.0.0.1'], methods: ['POST'] },
        { id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [upstream.port] },
      ],
    },
    credentials: [{ id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const port = s.sidecar.port

  await t.test('an @ in the query of a URI with no path is no userinfo: forwarded, credential injected', async (t) => {
    for (const [uri, sent] of [
      [`http://127.0.0.1:${upstream.port}?to=a@b.example`, '/?to=a@b.example'],
      [`http://127.0.0.1:0${upstream.port}?x=1`, '/?x=1'],
    ] as const) {
      const res = await rawRequest(port, `GET ${uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
      t.equal(res.status, 200, uri)
      t.match(upstream.requests.at(-1), { url: sent, headers: { host: `127.0.0.1:${upstream.port}`, authorization: `Bearer ${CANARY}` } }, `${uri}: reached the upstream as ${sent}`)
    }
  })

  await t.test('an h2c upgrade offer is declined and the request served in HTTP/1.1, on every entry path, the offer never sent on', async (t) => {
    // As Java's HttpClient (HTTP/2 by default) and `curl --http2` send every http:// request.
    const offer = 'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n'
    const routed = await startTestSidecar({ ...loopbackPolicy([upstream.port]), routes: { up: upstream.origin }, credentials: [{ id: 'plain', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }] })
    t.teardown(() => routed.close())
    const host = `127.0.0.1:${upstream.port}`
    for (const [name, request, path] of [
      ['absolute-form', `GET http://${host}/h2c-abs HTTP/1.1\r\nHost: ${host}\r\n${offer}Connection: close\r\n\r\n`, '/h2c-abs'],
      ['a reverse route, with a body', `PUT /up/h2c-route HTTP/1.1\r\nHost: 127.0.0.1\r\n${offer}Content-Length: 5\r\nConnection: close\r\n\r\nhello`, '/h2c-route'],
      ['inside a plaintext tunnel', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nGET /h2c-tunnel HTTP/1.1\r\nHost: ${host}\r\n${offer}Connection: close\r\n\r\n`, '/h2c-tunnel'],
    ] as const) {
      const res = await rawRequest(routed.sidecar.port, request)
      t.match(res.raw, /HTTP\/1\.1 200 OK\r\n(?![^]*HTTP\/1\.1 101)/, `${name}: answered 200 in HTTP/1.1, no 101`)
      const got = upstream.requests.at(-1)
      t.equal(got?.url, path, `${name}: reached the upstream`)
      t.equal(got?.headers.authorization, `Bearer ${CANARY}`, `${name}: with the credential`)
      t.notOk(got && ('upgrade' in got.headers || 'http2-settings' in got.headers), `${name}: without the offer`)
      t.notMatch(String(got?.headers.connection), /upgrade|http2-settings/i, `${name}: nor a Connection token naming it`)
    }
    t.equal(upstream.requests.at(-2)?.body, 'hello', 'the body went with it')
    // Keep-alive: the request after an offer on the same connection is served too.
    const two = await rawRequest(routed.sidecar.port, `GET http://${host}/h2c-first HTTP/1.1\r\nHost: ${host}\r\n${offer}\r\nGET http://${host}/h2c-second HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)
    t.equal(two.raw.match(/HTTP\/1\.1 200 OK/g)?.length, 2, 'a request pipelined behind an offer is answered as well')
    t.same(upstream.requests.slice(-2).map((r) => r.url), ['/h2c-first', '/h2c-second'])
    // Pipelined behind a call still being answered, the offer waits its turn: read again at once,
    // two parsers on one socket answered out of order, and the next request crashed the process.
    const socket = connect(routed.sidecar.port, '127.0.0.1')
    await once(socket, 'connect')
    let got = ''
    socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
    socket.write(`GET http://${host}/h2c-1 HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://${host}/h2c-2 HTTP/1.1\r\nHost: ${host}\r\n${offer}\r\n`)
    for (let i = 0; i < 100 && (got.match(/HTTP\/1\.1 200 OK/g)?.length ?? 0) < 2; i++) await new Promise((resolve) => setTimeout(resolve, 20))
    socket.write(`GET http://${host}/h2c-3 HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)
    await once(socket, 'close')
    t.equal(got.match(/HTTP\/1\.1 200 OK/g)?.length, 3, 'three answers, in order')
    t.same(upstream.requests.slice(-3).map((r) => r.url), ['/h2c-1', '/h2c-2', '/h2c-3'])
    t.equal((await rawRequest(routed.sidecar.port, `GET http://${host}/after HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)).status, 200, 'and the sidecar is still up')
    assertNoCanary(t, routed, two.raw, got)
  })

  await t.test('an absolute URI that disagrees with Host: the URI wins', async (t) => {
    const res = await rawRequest(port, `GET http://127.0.0.1:${upstream.port}/uri HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n`)
    t.equal(res.status, 200)
    t.equal(upstream.requests.at(-1)?.headers.host, `127.0.0.1:${upstream.port}`)
  })

  await t.test('Expect: 100-continue is decided before any 100 is sent', async (t) => {
    const denied = await rawRequest(port, `POST http://127.0.0.1:${upstream.port}/e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n`)
    t.notMatch(denied.raw, /100 Continue/, 'no 100 before a denial')
    t.equal(denied.status, 403)
    t.equal(denied.headers['x-latchkey-rule'], 'no-post')
    const before = upstream.requests.length
    const allowed = await rawRequest(port, `PUT http://127.0.0.1:${upstream.port}/e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n`)
    t.match(allowed.raw, /^HTTP\/1\.1 100 Continue/, '100 once policy allows')
    t.equal(upstream.requests.length, before, 'nothing forwarded before the body is sent')
  })

  await t.test('forwarding headers, Latchkey headers and method or path overrides from the agent are stripped', async (t) => {
    const spoofed = ['X-Forwarded-For: 10.0.0.1', 'X-Forwarded-Host: admin', 'Forwarded: for=1.2.3.4', 'X-Real-IP: 1.1.1.1', 'X-Latchkey-Rule: allow-all', 'X_Forwarded_For: 10.0.0.2', 'X-Forwarded_Host: admin', 'X-HTTP-Method-Override: DELETE', 'X-HTTP-Method: DELETE', 'X-Method-Override: DELETE', 'X-Original-URL: /admin/x', 'X-Rewrite-URL: /admin/x', 'X_Original_URL: /admin/x', 'X-Method: DELETE', 'X-Original-URI: /admin/x', 'X-Original-Path: /admin/x', 'X-Envoy-Original-Path: /admin/x', 'X-Override-URL: /admin/x', 'SCRIPT_NAME: /h', 'Script-Name: /h', 'PATH_INFO: /admin/x', 'X-Script-Name: /h', 'X-Invoke-Path: /admin/x', 'X-Invoke-Query: %7B%7D', 'X-Invoke-Output: /admin/x', 'X-Matched-Path: /admin/x', 'X-Middleware-Subrequest: middleware:middleware:middleware:middleware:middleware', 'X-Original-Host: admin.internal', 'X-Host: admin.internal']
    await rawRequest(port, `GET http://127.0.0.1:${upstream.port}/h HTTP/1.1\r\nHost: x\r\n${spoofed.join('\r\n')}\r\nX-Keep: yes\r\nConnection: close\r\n\r\n`)
    const h = upstream.requests.at(-1)!.headers
    t.same(spoofed.map((line) => line.split(':')[0]!.toLowerCase()).filter((name) => name in h), [], 'none reaches the upstream')
    t.equal(h['x-keep'], 'yes', 'ordinary headers pass')
  })

  await t.test('a framing header past the thousandth header still frames the request', async (t) => {
    const filler = Array.from({ length: 1000 }, (_, i) => `X-F${i}: 1`).join('\r\n')
    const r = await rawRequest(port, `PUT http://127.0.0.1:${upstream.port}/many HTTP/1.1\r\nHost: x\r\n${filler}\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world`)
    t.equal(r.status, 200)
    const got = upstream.requests.at(-1)!
    t.equal(got.url, '/many')
    t.equal(got.body, 'hello world', 'the body is forwarded, not dropped with a header node:http stopped counting')
  })

  await t.test('Connection-listed headers are dropped before injection, so the credential survives', async (t) => {
    await rawRequest(port, `GET http://127.0.0.1:${upstream.port}/c HTTP/1.1\r\nHost: x\r\nConnection: authorization, x-drop, close\r\nAuthorization: Bearer agent\r\nX-Drop: 1\r\n\r\n`)
    const h = upstream.requests.at(-1)!.headers
    t.equal(h.authorization, `Bearer ${CANARY}`)
    t.equal(h['x-drop'], undefined)
  })

  await t.test("the agent's credentials spelled with underscores are removed too", async (t) => {
    await rawRequest(port, `GET http://127.0.0.1:${upstream.port}/u HTTP/1.1\r\nHost: x\r\nX-Api_Key: agent-key\r\nX_Auth_Token: agent-token\r\nX-Custom_Name: kept\r\nConnection: close\r\n\r\n`)
    const h = upstream.requests.at(-1)!.headers
    t.same([h['x-api_key'], h.x_auth_token], [undefined, undefined], 'a server folding _ into - would otherwise read the agent\'s value')
    t.equal(h['x-custom_name'], 'kept', 'other underscored headers pass')
    t.equal(h.authorization, `Bearer ${CANARY}`)
  })
  assertNoCanary(t, s)
})

t.test('an injected header named with underscores: the agent\'s dashed spelling of it is removed', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    credentials: [{ id: 'svc', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'header', name: 'X_Svc_Token' } }],
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/u HTTP/1.1\r\nHost: x\r\nX-Svc-Token: agent-dashed\r\nX-Svc_Token: agent-mixed\r\nConnection: close\r\n\r\n`)
  const raw = upstream.requests.at(-1)!.rawHeaders
  const names = raw.filter((_, i) => i % 2 === 0).map((n) => n.toLowerCase())
  t.same(names.filter((n) => n.replace(/_/g, '-') === 'x-svc-token'), ['x_svc_token'], 'only the injected header, which a server folding _ into - could not tell from the agent\'s')
  t.equal(upstream.requests.at(-1)!.headers.x_svc_token, CANARY)
  assertNoCanary(t, s)
})

t.test('a chunked body\'s trailers never reach the upstream: not an Authorization beside the injected one, nor a Host', async (t) => {
  // node:http, which hands a handler the trailers it was sent (startUpstream records headers only).
  const got: { headers: Record<string, unknown>; trailers: string[]; body: string }[] = []
  const upstream = createServer((req, res) => {
    let body = ''
    req.on('data', (c: Buffer) => (body += c.toString()))
    req.on('end', () => {
      got.push({ headers: req.headers, trailers: req.rawTrailers, body })
      res.end('ok')
    })
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const host = `127.0.0.1:${port}`
  const s = await startTestSidecar({ ...loopbackPolicy([port]), routes: { up: `http://${host}` }, credentials: [{ id: 'plain', audience: `http://${host}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }] })
  t.teardown(async () => {
    await s.close()
    upstream.closeAllConnections()
    upstream.close()
  })
  const trailers = 'Authorization: Bearer agent\r\nHost: evil.example\r\nX-Api-Key: agent\r\nX-Latchkey-Rule: x\r\n'
  const body = `5\r\nhello\r\n0\r\n${trailers}\r\n`
  for (const [name, request] of [
    ['absolute-form', `POST http://${host}/t HTTP/1.1\r\nHost: ${host}\r\nTrailer: Authorization, Host\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body}`],
    ['a reverse route', `POST /up/t HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body}`],
    ['inside a plaintext tunnel', `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\nPOST /t HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${body}`],
  ] as const) {
    const before = got.length
    const r = await rawRequest(s.sidecar.port, request)
    t.match(r.raw, /HTTP\/1\.1 200 OK/, `${name}: forwarded`)
    t.equal(got.length, before + 1, `${name}: one request upstream`)
    t.match(got.at(-1), { headers: { authorization: `Bearer ${CANARY}`, host }, trailers: [], body: 'hello' }, `${name}: the body, the injected credential, no trailer`)
    t.notOk('trailer' in got.at(-1)!.headers || 'te' in got.at(-1)!.headers, `${name}: nor a Trailer or TE announcing one`)
  }
  assertNoCanary(t, s)
})
