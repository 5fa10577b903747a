// WebSocket upgrades pass on allowed routes with the credential injected; denied ones get the
// same structured 403 as any request.
import t from 'tap'
import { createServer, type IncomingMessage } from 'node:http'
import { Duplex, PassThrough } from 'node:stream'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { once } from 'node:events'
import { createHash } from 'node:crypto'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startTestSidecar, rawRequest, parseRawResponse, assertNoCanary, CANARY } from '../helpers/harness.js'
import { serverFrame, clientFrame, closeOf, framePayloads } from '../helpers/websocket-frames.js'
import { WebSocket } from 'undici'
import { WebSocketScrubber } from '../../proxy/listen/websocket-scrub.js'
import { ClosableWebSocket, cutWebSocket } from '../../proxy/listen/websocket-close.js'
import { compileNeedles } from '../../proxy/forward/body-scrub.js'

t.test('websocket through a reverse route and through absolute-form', async (t) => {
  const seen: Record<string, string | undefined>[] = []
  const { port, s } = await startWsRig(
    t,
    (req, socket) => {
      seen.push({ url: req.url, authorization: req.headers.authorization, host: req.headers.host })
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
      socket.on('data', (d: Buffer) => socket.write(serverFrame(Buffer.concat([Buffer.from('echo:'), d]))))
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` } }) },
  )
  const handshake = (target: string) =>
    `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer agent-own\r\n\r\n`

  // A route, absolute-form, ws:// as aiohttp sends it through a proxy, and a route addressed in
  // absolute form to the sidecar itself, as any client with HTTP_PROXY set sends it.
  for (const target of ['/live/feed?x=1', `http://127.0.0.1:${port}/feed?x=1`, `ws://127.0.0.1:${port}/feed?x=1`, `http://127.0.0.1:${s.sidecar.port}/live/feed?x=1`]) {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    await once(sock, 'connect')
    sock.write(handshake(target))
    const [head] = (await once(sock, 'data')) as [Buffer]
    t.match(head.toString(), /^HTTP\/1\.1 101 Switching Protocols/, `${target}: switched`)
    t.match(head.toString(), /Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=/)
    sock.write('ping')
    const [echo] = (await once(sock, 'data')) as [Buffer]
    t.equal(framePayloads(echo)[0]?.payload.toString(), 'echo:ping', 'frames flow both ways')
    sock.destroy()
  }
  const reached = { url: '/feed?x=1', authorization: `Bearer ${CANARY}`, host: `127.0.0.1:${port}` }
  t.same(seen, [reached, reached, reached, reached])
  const denied = await rawRequest(s.sidecar.port, handshake('/live/admin/x'))
  t.equal(denied.status, 403)
  t.equal(denied.headers['x-latchkey-rule'], 'no-admin')
  const deniedOwn = await rawRequest(s.sidecar.port, handshake(`http://localhost:${s.sidecar.port}/live/admin/x`))
  t.equal(deniedOwn.headers['x-latchkey-rule'], 'no-admin', 'the sidecar addressed as itself is the same route, with the same rules')
  const notUpgrade = await rawRequest(s.sidecar.port, `GET ws://127.0.0.1:${port}/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  t.equal(notUpgrade.status, 400, 'ws:// names a WebSocket handshake, nothing else')
  t.equal(seen.length, 4, 'the denied upgrades never reached the upstream')
  const audit = await s.audit(7)
  t.same(audit.map((e) => [e.via, e.status]).sort(), [['absolute', 400], ['upgrade', 101], ['upgrade', 101], ['upgrade', 101], ['upgrade', 101], ['upgrade', 403], ['upgrade', 403]])
  assertNoCanary(t, s, denied.raw, deniedOwn.raw, notUpgrade.raw)
})

t.test('only a 101 to websocket opens the relay; its head is scrubbed; a handshake is a bodiless GET', async (t) => {
  // One upstream that answers handshakes every way an upstream might, and records every byte it
  // receives on each connection after its answer.
  const afterAnswer: string[] = []
  const { port, s } = await startWsRig(
    t,
    (req, socket, head) => {
      // Bytes the client sent after its handshake arrive with it, as `head`.
      if (head.length) afterAnswer.push(head.toString('latin1'))
      const auth = String(req.headers.authorization ?? '')
      const accept = acceptFor(req)
      switch (req.url) {
        case '/reflect':
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nX-Echo-Auth: ${auth}\r\n\r\n`)
          break
        case '/names': {
          // The credential in header names: percent-encoded in upper-case hex, and as base64url.
          const secret = auth.slice(7)
          const pct = [...secret].map((c) => '%' + c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')).join('')
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nX-${pct}: 1\r\nX-${Buffer.from(secret).toString('base64url')}: 2\r\nX-Plain: kept\r\nX-Latchkey-Error: LK_POLICY_DENIED\r\n\r\n`)
          break
        }
        case '/latin1':
          // A header byte past 0x7f, read as latin1 (as node:http reads a head), answered with another.
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nX-Back: ${req.headers['x-t'] === 'caf\xe9' ? 'intact' : 'mangled'} r\xe9sum\xe9\r\n\r\n`, 'latin1')
          break
        case '/plain':
          // Not a WebSocket server: an ordinary keep-alive answer, echoing the credential.
          socket.write(`HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo-Auth: ${auth}\r\n\r\nok`)
          break
        case '/unauthorized':
          socket.write(`HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer error="${auth}"\r\nContent-Length: 0\r\n\r\n`)
          break
        case '/wrong-protocol':
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n`)
          break
        // A 101 that did not read the key (a server reflecting any status, a mock): it has not
        // switched, and would parse what follows as HTTP.
        case '/no-accept':
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n`)
          break
        case '/wrong-accept':
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n`)
          break
      }
      socket.on('data', (d: Buffer) => afterAnswer.push(d.toString('latin1')))
      socket.on('error', () => {})
    },
    { plainStatus: 404 },
  )
  const handshake = (path: string, method = 'GET', extra = '') =>
    `${method} http://127.0.0.1:${port}${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n${extra}\r\n`
  const seen: string[] = []

  // Header bytes past 0x7f cross as the same bytes both ways, not re-encoded as UTF-8.
  const latin1 = await rawRequest(s.sidecar.port, Buffer.from(handshake('/latin1', 'GET', 'X-T: caf\xe9\r\n'), 'latin1'))
  t.equal(latin1.status, 101)
  t.equal(latin1.headers['x-back'], 'intact r\xe9sum\xe9', 'the upstream got the byte 0xE9, and the agent got it back')

  const reflected = await rawRequest(s.sidecar.port, handshake('/reflect'))
  seen.push(reflected.raw)
  t.equal(reflected.status, 101)
  t.equal(reflected.headers['sec-websocket-accept'], 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=', 'the handshake answer is intact')
  t.equal(reflected.headers['x-echo-auth'], '[removed by latchkey: it contained the injected credential]', 'a 101 echoing the credential is scrubbed')

  const names = await rawRequest(s.sidecar.port, handshake('/names'))
  seen.push(names.raw)
  t.equal(names.status, 101)
  t.same(Object.keys(names.headers).filter((h) => h.startsWith('x-')), ['x-plain'], 'header names revealing the credential, and the sidecar\'s own namespace, are dropped from a 101')

  for (const [path, why] of [
    ['/plain', /answered 200 instead of 101/],
    ['/unauthorized', /answered 401 instead of 101/],
    ['/wrong-protocol', /without `Upgrade: websocket`/],
    ['/no-accept', /Sec-WebSocket-Accept does not answer the handshake's key/],
    ['/wrong-accept', /Sec-WebSocket-Accept does not answer the handshake's key/],
  ] as const) {
    const before = afterAnswer.length
    // The agent tries to use the connection as a channel once the upstream has answered.
    const r = await rawRequest(s.sidecar.port, handshake(path) + `DELETE /admin/users/1 HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`)
    seen.push(r.raw)
    t.equal(r.status, 502, `${path}: refused`)
    t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_PROTOCOL', reason: why }, `${path}: says what the upstream did`)
    t.notMatch(r.raw, /X-Echo-Auth|WWW-Authenticate/i, `${path}: nothing of the upstream's answer is relayed`)
    t.notOk(afterAnswer.slice(before).join('').includes('/admin'), `${path}: nothing after the handshake reached the upstream`)
  }

  for (const [name, request, why] of [
    ['TRACE with Upgrade', handshake('/reflect', 'TRACE'), /a WebSocket handshake is a GET, not TRACE/],
    ['POST with Upgrade', handshake('/reflect', 'POST', 'Content-Length: 4\r\n') + 'body', /GET, not POST/],
    ['a chunked body', handshake('/reflect', 'GET', 'Transfer-Encoding: chunked\r\n') + '4\r\nbody\r\n0\r\n\r\n', /carries no body/],
    ['Expect', handshake('/reflect', 'GET', 'Expect: 100-continue\r\n'), /Expect is not supported/],
    ['no key', handshake('/reflect').replace(/Sec-WebSocket-Key: [^\r]*\r\n/, ''), /exactly one Sec-WebSocket-Key/],
    ['a key that is not a 16-byte nonce', handshake('/reflect').replace('dGhlIHNhbXBsZSBub25jZQ==', 'x'), /exactly one Sec-WebSocket-Key/],
    ['two keys', handshake('/reflect', 'GET', 'Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n'), /exactly one Sec-WebSocket-Key/],
  ] as const) {
    const r = await rawRequest(s.sidecar.port, request)
    seen.push(r.raw)
    t.equal(r.status, 400, `${name}: 400`)
    t.match(JSON.parse(r.body).reason, why, `${name}: says why`)
  }
  const audit = await s.audit(15)
  t.equal(audit.filter((e) => e.via === 'upgrade').length, 15, 'every handshake audited')
  const refusedByUpstream = audit.filter((e) => e.via === 'upgrade' && e.status === 502 && e.error === 'LK_UPSTREAM_PROTOCOL')
  t.same(
    refusedByUpstream.map((e) => [e.path, e.bytes_in, e.bytes_out]),
    [['/plain', 0, 0], ['/unauthorized', 0, 0], ['/wrong-protocol', 0, 0], ['/no-accept', 0, 0], ['/wrong-accept', 0, 0]],
    'nothing was relayed either way, and the trail says so',
  )
  t.match(audit.filter((e) => e.via === 'upgrade' && e.status === 400), [
    { method: 'TRACE', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'POST', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'GET', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'GET', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'GET', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'GET', host: '127.0.0.1', port, path: '/reflect' },
    { method: 'GET', host: '127.0.0.1', port, path: '/reflect' },
  ], 'a refused handshake is recorded with what it was for')
  assertNoCanary(t, s, ...seen)
})

// A browser's WebSocket cannot set headers, so SDKs carry a token as a subprotocol. On an origin
// the sidecar injects into, the agent's went on beside the injected bearer: the upstream had two
// credentials to act on, the audit named one.
t.test("the agent's own credential offered as a subprotocol is removed where the sidecar injects; other subprotocols pass", async (t) => {
  const offered: (string | undefined)[] = []
  const rig = (credentialed: boolean) =>
    startWsRig(
      t,
      (req, socket) => {
        const protocols = req.headers['sec-websocket-protocol'] ?? req.headers['sec_websocket_protocol']
        offered.push(Array.isArray(protocols) ? protocols.join(', ') : protocols)
        // The upstream chooses the first subprotocol it was offered, as most do.
        const chosen = typeof protocols === 'string' ? `Sec-WebSocket-Protocol: ${protocols.split(',')[0]}\r\n` : ''
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n${chosen}\r\n`)
      },
      { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, ...(credentialed ? {} : { credentials: [] }) }) },
    )
  const jwt = `eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.agent-own-jwt-signature-0000`
  const cases: [string, string, string | undefined][] = [
    ['Sec-WebSocket-Protocol', 'Authorization, agent-own-1', 'Authorization'],
    ['Sec-WebSocket-Protocol', `v4.channel.k8s.io, base64url.bearer.authorization.k8s.io.${Buffer.from('agent-own-2').toString('base64url')}`, 'v4.channel.k8s.io'],
    ['Sec-WebSocket-Protocol', 'realtime, openai-insecure-api-key.sk-agent-own-3, openai-beta.realtime-v1', 'realtime, openai-beta.realtime-v1'],
    ['Sec-WebSocket-Protocol', `graphql-transport-ws, ${jwt}`, 'graphql-transport-ws'],
    ['Sec-WebSocket-Protocol', 'access_token, bearer, agent-own-5', 'access_token'],
    // The `_` spelling a server folding `_` into `-` reads as the same header.
    ['Sec_WebSocket_Protocol', 'token, agent-own-6', 'token'],
    ['Sec-WebSocket-Protocol', `base64url.bearer.authorization.k8s.io.${Buffer.from('agent-own-7').toString('base64url')}`, undefined],
  ]
  // The handshake with `header` added, and the sidecar's answer once its head is whole.
  const answerTo = async (port: number, header: string) => {
    const sock = connect(port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    let raw = ''
    sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
    sock.write(`GET /live/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n${header}\r\n\r\n`)
    await Promise.race([once(sock, 'close'), (async () => { while (!raw.includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5)) })()])
    sock.destroy()
    return parseRawResponse(raw)
  }
  const seen: string[] = []
  const injected = await rig(true)
  for (const [name, value, reached] of cases) {
    const before = offered.length
    const r = await answerTo(injected.s.sidecar.port, `${name}: ${value}`)
    seen.push(r.raw)
    t.equal(r.status, 101, `${value}: switched`)
    t.equal(offered[before], reached, `${value}: the upstream was offered only what carries no credential`)
    t.equal(r.headers['sec-websocket-protocol'], reached?.split(',')[0], `${value}: and chose one the agent offered`)
  }
  const logged = injected.s.logs.join('') + JSON.stringify(await injected.s.audit(cases.length))
  t.notOk(/agent-own|YWdlbnQtb3du/.test(logged), 'the agent\'s tokens are in no log line or audit event')
  assertNoCanary(t, injected.s, ...seen)
  // Where nothing is injected the agent's offer is its own business, and goes as it came.
  const plain = await rig(false)
  const before = offered.length
  await answerTo(plain.s.sidecar.port, 'Sec-WebSocket-Protocol: Authorization, agent-own-8')
  t.equal(offered[before], 'Authorization, agent-own-8', 'an origin without a credential gets the offer unchanged')
})

t.test("undici's WebSocket through EnvHttpProxyAgent: ws:// in a CONNECT tunnel, decided and injected", async (t) => {
  const seen: (string | undefined)[] = []
  const { port, s } = await startWsRig(t, (req, socket) => {
    seen.push(req.headers.authorization)
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
    // One unmasked text frame, "hello", from server to client.
    socket.write(Buffer.from([0x81, 5, ...Buffer.from('hello')]))
  })
  const script = `
    const { WebSocket, EnvHttpProxyAgent } = await import('undici')
    const open = (url) => new Promise((resolve) => {
      const sock = new WebSocket(url, { dispatcher: new EnvHttpProxyAgent() })
      sock.onmessage = (m) => { resolve('message ' + m.data); sock.close() }
      sock.onerror = () => resolve('error')
    })
    console.log(await open(process.argv[1]))
    console.log(await open(process.argv[2]))
    // The test upstream never answers a close frame: leave without waiting for one.
    process.exit(0)`
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script, `ws://127.0.0.1:${port}/feed`, `ws://127.0.0.1:${port}/admin/feed`], {
    env: proxyEnv(`http://127.0.0.1:${s.sidecar.port}`),
  })
  t.same(stdout.trim().split('\n'), ['message hello', 'error'], 'the allowed WebSocket opens and talks; the one a path rule denies does not')
  t.same(seen, [`Bearer ${CANARY}`], 'the handshake carried the injected credential; the denied one never arrived')
  const upgrades = (await s.audit(2)).filter((e) => e.via === 'upgrade')
  t.same(upgrades.map((e) => [e.path, e.status, e.rule]).sort(), [['/admin/feed', 403, 'no-admin'], ['/feed', 101, 'ws']])
  assertNoCanary(t, s, stdout)
})

t.test('inside a plaintext tunnel a WebSocket may name its target ws://, as outside one', async (t) => {
  const { port, s } = await startWsRig(t, (req, socket) => {
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
    socket.write(Buffer.from([0x81, 5, ...Buffer.from('hello')]))
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  let got = ''
  sock.on('data', (d: Buffer) => (got += d.toString('latin1')))
  sock.write(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`)
  while (!got.includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 10))
  t.match(got, /^HTTP\/1\.1 200 /)
  got = ''
  sock.write(`GET ws://127.0.0.1:${port}/feed HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
  for (let i = 0; i < 200 && !got.includes('hello') && !got.includes('\r\n\r\n{'); i++) await new Promise((r) => setTimeout(r, 10))
  sock.destroy()
  t.match(got, /^HTTP\/1\.1 101 /, 'the WebSocket opens')
  t.ok(got.includes('hello'), 'and talks')
})

/** The environment with HTTP_PROXY set to `proxy` and every other proxy variable removed (an empty http_proxy would win over it). */
function proxyEnv(proxy: string): NodeJS.ProcessEnv {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return { ...env, HTTP_PROXY: proxy }
}

t.test("an upstream's WebSocket messages are checked for the credential: whole, across fragments and control frames, never compressed", async (t) => {
  const offered: (string | undefined)[] = []
  const sent = new Map<string, Buffer>()
  const { s } = await startWsRig(t, (req, socket) => {
    offered.push(req.headers['sec-websocket-extensions'])
    const secret = String(req.headers.authorization ?? '').slice('Bearer '.length)
    const url = req.url ?? ''
    const ext = url === '/deflate' ? 'Sec-WebSocket-Extensions: permessage-deflate\r\n' : ''
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n${ext}\r\n`)
    let frames: Buffer
    if (url === '/reflect') {
      frames = Buffer.concat([
        serverFrame(JSON.stringify({ you_sent: `Bearer ${secret}` })),
        // One message in three fragments, the secret cut across the first two, with a ping
        // between them (RFC 6455 §5.4) that carries the secret too.
        serverFrame(`part one ${secret.slice(0, 9)}`, { fin: false }),
        serverFrame(`ping ${secret}`, { opcode: 0x9 }),
        serverFrame(`${secret.slice(9)} part two`, { opcode: 0x0, fin: false }),
        serverFrame(' and the end', { opcode: 0x0 }),
        serverFrame(Buffer.alloc(70_000, 'a')),
        serverFrame(`${encodeURIComponent('token=' + secret)}`, { opcode: 0x2 }),
      ])
      // Byte by byte for the first 40, then the rest: frame headers cut anywhere.
      for (let i = 0; i < 40; i++) socket.write(frames.subarray(i, i + 1))
      socket.end(frames.subarray(40))
    } else if (url === '/masked') {
      frames = Buffer.from([0x81, 0x85, 1, 2, 3, 4, 0x69, 0x67, 0x6f, 0x68, 0x6e])
      socket.write(frames)
    } else if (url === '/reserved') {
      frames = Buffer.from([0xc1, 0x02, 0x68, 0x69])
      socket.write(frames)
    } else return
    sent.set(url, frames)
  }, { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` } }) })
  const open = async (path: string) => {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    await once(sock, 'connect')
    const chunks: Buffer[] = []
    sock.on('data', (c: Buffer) => chunks.push(c))
    const closed = once(sock, 'close')
    sock.write(`GET /live${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n`)
    await closed
    const all = Buffer.concat(chunks)
    const headEnd = all.indexOf('\r\n\r\n')
    return { head: all.subarray(0, headEnd).toString('latin1'), frames: all.subarray(headEnd + 4) }
  }

  const reflected = await open('/reflect')
  t.match(reflected.head, /^HTTP\/1\.1 101 /)
  t.equal(offered[0], undefined, 'no extension is offered upstream on a credentialed WebSocket, whatever the agent offered')
  t.notOk(reflected.frames.includes(CANARY), 'the secret reached the agent in no frame')
  t.notOk(reflected.frames.includes(CANARY.slice(0, 9)) && reflected.frames.includes(CANARY.slice(9)), 'nor in pieces')
  t.equal(reflected.frames.length, sent.get('/reflect')!.length, 'every frame keeps its length')
  const got = framePayloads(reflected.frames)
  const want = framePayloads(sent.get('/reflect')!)
  t.same(got.map((f) => [f.opcode, f.fin, f.payload.length]), want.map((f) => [f.opcode, f.fin, f.payload.length]), 'the same frames, in the same order')
  t.match(got[0]!.payload.toString(), /^\{"you_sent":"Bearer [^"]+"\}$/, 'around the match the message is as sent')
  t.equal(Buffer.concat([got[1]!.payload, got[3]!.payload, got[4]!.payload]).toString().replace(/[^ a-z]/g, ''), 'part one  part two and the end', 'the fragmented message is intact but for the secret')
  t.equal(got[5]!.payload.toString(), 'a'.repeat(70_000), 'a long message passes as it was')

  const deflate = await rawRequest(s.sidecar.port, 'GET /live/deflate HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  t.equal(deflate.status, 502, 'an upstream that turns compression on anyway is refused')
  t.match(deflate.body, /LK_UPSTREAM_PROTOCOL/)
  for (const path of ['/masked', '/reserved']) {
    const cut = await open(path)
    t.match(cut.head, /^HTTP\/1\.1 101 /)
    t.equal(cut.frames.length, 0, `${path}: a frame the sidecar cannot read is not relayed; the connection is closed`)
  }
  const events = await s.audit(4)
  t.match(events.filter((e) => e.path === '/masked' || e.path === '/reserved').map((e) => e.error), ['LK_UPSTREAM_PROTOCOL', 'LK_UPSTREAM_PROTOCOL'], 'and is recorded as the upstream failing the protocol')
  t.ok(s.logs.some((l) => l.includes('sent the injected credential back')), 'the operator is told')
  assertNoCanary(t, s, reflected.frames.toString('latin1'), deflate.raw)
})

// A message left mid-fragment on bytes that could begin the credential holds them back, and
// every frame after them waits behind them (a control frame cannot go inside the frame they end).
// An upstream that then floods pings, or empty fragments, grew that queue without end, each frame
// re-summing it: the sidecar's one event loop spun, none of it reached the agent, and the call ran
// until tunnel_idle_ms, recorded as "no bytes either way".
t.test('frames behind a held fragment end: relayed in order once the message goes on, a flood of them cut LK_UPSTREAM_PROTOCOL', async (t) => {
  const ping = (i: number) => serverFrame(`ping ${i}`.padEnd(120, '.'), { opcode: 0x9 })
  const sent = new Map<string, Buffer>()
  const seen: Buffer[] = []
  const { port, s } = await startWsRig(
    t,
    (req, socket) => {
      socket.on('error', () => {})
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
      const opening = serverFrame(`hello ${CANARY.slice(0, 1)}`, { fin: false })
      let frames: Buffer
      if (req.url === '/goes-on') {
        // The held bytes grow ("L", then "LK") and the frames behind them come in between, then
        // the message goes on with bytes that are no credential, releasing them all.
        const pongs = Array.from({ length: 400 }, (_, i) => serverFrame(`pong ${i}`, { opcode: 0xa }))
        frames = Buffer.concat([
          opening,
          ...Array.from({ length: 400 }, (_, i) => ping(i)),
          serverFrame(CANARY.slice(1, 2), { opcode: 0x0, fin: false }),
          ...pongs,
          serverFrame('', { opcode: 0x0, fin: false }),
          ping(400),
          serverFrame('-not-it', { opcode: 0x0 }),
          serverFrame('after'),
        ])
        socket.end(frames)
      } else {
        // 20,000 pings (2.5 MB), or 20,000 empty fragments, and the message never goes on.
        const flood = req.url === '/pings' ? Buffer.concat(Array.from({ length: 20_000 }, (_, i) => ping(i))) : Buffer.alloc(40_000)
        frames = Buffer.concat([opening, flood])
        socket.write(frames)
      }
      sent.set(req.url ?? '', frames)
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` } }) },
  )
  const open = async (path: string) => {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    await once(sock, 'connect')
    const chunks: Buffer[] = []
    sock.on('data', (c: Buffer) => chunks.push(c))
    sock.on('error', () => {})
    const closed = once(sock, 'close').then(() => true)
    sock.write(`GET /live${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
    const frames = () => {
      const all = Buffer.concat(chunks)
      seen.push(all)
      return all.subarray(all.indexOf('\r\n\r\n') + 4)
    }
    return { sock, closed, frames }
  }
  // The timer is not left to run out once `p` wins: it held the test's process 13 s past its last check.
  const within = (p: Promise<boolean>, ms: number) => {
    let timer: NodeJS.Timeout | undefined
    return Promise.race([p, new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]).finally(() => clearTimeout(timer))
  }

  const on = await open('/goes-on')
  t.ok(await within(on.closed, 15_000), 'the upstream closed after its frames, and so did the agent side')
  t.ok(on.frames().equals(sent.get('/goes-on')!), 'every frame reached the agent, byte for byte and in order: the 801 control frames and 3 fragment headers that waited behind the held bytes went once the message went on')

  for (const path of ['/pings', '/empty-fragments']) {
    const flood = await open(path)
    // Another call, while the flood comes in.
    const other = rawRequest(s.sidecar.port, `GET http://127.0.0.1:${port}/other HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`)
    t.ok(await within(flood.closed, 15_000), `${path}: the connection is cut, not held until tunnel_idle_ms`)
    t.equal((await other).status, 426, `${path}: an unrelated call through the sidecar is answered`)
    const got = flood.frames()
    t.ok(got.equals(sent.get(path)!.subarray(0, 2 + 'hello '.length)), `${path}: the agent got the fragment's header and the bytes before the held one, and nothing after them`)
  }
  const events = (await s.audit(4)).filter((e) => e.via === 'upgrade')
  t.match(
    events.map((e) => [e.path, e.status, e.error]),
    [['/goes-on', 101, undefined], ['/pings', 101, 'LK_UPSTREAM_PROTOCOL'], ['/empty-fragments', 101, 'LK_UPSTREAM_PROTOCOL']],
    'the floods are recorded as the upstream failing the protocol',
  )
  for (const e of events.slice(1)) t.match(e.reason, /more than 1024 frames or 64 KiB after a message fragment that ended on bytes that could begin the credential/, `${String(e.path)}: and says why`)
  assertNoCanary(t, s, ...seen.map((b) => b.toString('latin1')))
})

t.test('an idle WebSocket whose upstream frames wait behind a held fragment end says so, not "no bytes either way"', async (t) => {
  const { s } = await startWsRig(
    t,
    (req, socket) => {
      socket.on('error', () => {})
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
      // The fragment's last byte is held (1), three 4-byte pings wait behind it (3 × 6).
      socket.write(Buffer.concat([serverFrame(`hello ${CANARY.slice(0, 1)}`, { fin: false }), ...[1, 2, 3].map((i) => serverFrame(`png${i}`, { opcode: 0x9 }))]))
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { tunnel_idle_ms: 300 } } }) },
  )
  const sock = connect(s.sidecar.port, '127.0.0.1')
  await once(sock, 'connect')
  sock.on('error', () => {})
  const chunks: Buffer[] = []
  sock.on('data', (c: Buffer) => chunks.push(c))
  sock.write('GET /live/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  await once(sock, 'close')
  const got = Buffer.concat(chunks)
  t.equal(got.subarray(got.indexOf('\r\n\r\n') + 4).toString('latin1'), '\x01\x07hello ', 'the agent got the fragment up to the held byte, and nothing behind it')
  const [event] = await s.audit(1)
  t.match(event, { via: 'upgrade', status: 101, error: 'LK_IDLE_TIMEOUT', bytes_out: 9 + 18, reason: /^no bytes to or from the agent for 300 ms \(sidecar\.timeouts\.tunnel_idle_ms\), while 19 bytes from the upstream waited/ })
  t.notMatch(String(event?.reason), /either way/, 'bytes did come from the upstream')
  assertNoCanary(t, s, got.toString('latin1'))
})

/** The Sec-WebSocket-Accept an upstream answers a handshake with (RFC 6455 §4.2.2). */
t.test('a WebSocket with no frames either way for tunnel_idle_ms is closed, recorded LK_IDLE_TIMEOUT', async (t) => {
  const upstreamEnded: Promise<unknown>[] = []
  const { s } = await startWsRig(
    t,
    (req, socket) => {
      upstreamEnded.push(once(socket, 'end'))
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
      socket.on('data', (d: Buffer) => socket.write(serverFrame(d)))
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { tunnel_idle_ms: 300 } } }) },
  )
  const sock = connect(s.sidecar.port, '127.0.0.1')
  await once(sock, 'connect')
  sock.write('GET /live/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  const [head] = (await once(sock, 'data')) as [Buffer]
  t.match(head.toString(), /^HTTP\/1\.1 101 /)
  // Frames every 100 ms keep it open past the idle time.
  for (let i = 0; i < 6; i++) {
    await new Promise((r) => setTimeout(r, 100))
    sock.write('ping')
    await once(sock, 'data')
  }
  t.notOk(sock.destroyed, 'open while frames flow')
  const quietFrom = performance.now()
  await once(sock, 'close')
  const quiet = performance.now() - quietFrom
  t.ok(quiet >= 280 && quiet < 2000, `closed once quiet for the idle time (${Math.round(quiet)} ms)`)
  await upstreamEnded[0]
  t.pass('the upstream side is ended with it')
  // Frames only, each way: six 4-byte pings sent and echoed; neither handshake counts.
  t.match(await s.audit(1), [{ via: 'upgrade', status: 101, error: 'LK_IDLE_TIMEOUT', bytes_in: 24, bytes_out: 36 }], 'six frames of 4 bytes each way: the echo adds each its 2-byte frame header')
})

t.test('an upstream that never answers the handshake: 504 after timeouts.headers_ms, both sockets closed', async (t) => {
  const upstreamEnded: Promise<unknown>[] = []
  const { s } = await startWsRig(
    t,
    (_req, socket) => {
      // Accepts the connection, reads the handshake, says nothing.
      upstreamEnded.push(once(socket, 'end'))
      socket.on('error', () => {})
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { headers_ms: 300 } } }) },
  )
  const started = performance.now()
  const r = await rawRequest(s.sidecar.port, 'GET /live/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  const waited = performance.now() - started
  t.equal(r.status, 504)
  t.match(JSON.parse(r.body), { code: 'LK_UPSTREAM_TIMEOUT', reason: /did not answer the WebSocket handshake within 300 ms/, retryable: true })
  t.ok(waited >= 280 && waited < 2000, `answered after the headers timeout (${Math.round(waited)} ms)`)
  t.equal(upstreamEnded.length, 1, 'the handshake reached the upstream')
  await upstreamEnded[0]
  t.pass('the sidecar closed its connection to the upstream, not left waiting')
  t.match(await s.audit(1), [{ via: 'upgrade', status: 504, error: 'LK_UPSTREAM_TIMEOUT', bytes_in: 0, bytes_out: 0 }])
  assertNoCanary(t, s, r.raw)
})

/** Waits until `ok`, at most 3 s; the checks after it say what did not come. */
async function until(ok: () => boolean): Promise<void> {
  for (let i = 0; i < 300 && !ok(); i++) await new Promise((r) => setTimeout(r, 10))
}

function acceptFor(req: IncomingMessage): string {
  return createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
}

/**
 * A WebSocket upstream (`onUpgrade` answers its handshakes; a plain request gets `plainStatus`)
 * behind a sidecar that allows it, denies /admin/**, and injects the canary as its bearer: both
 * torn down with the test. `fragment` adds to the sidecar's config, given the upstream's port.
 */
async function startWsRig(
  t: { teardown(fn: () => unknown): void },
  onUpgrade: (req: IncomingMessage, socket: Duplex, head: Buffer) => void,
  o: { plainStatus?: number; fragment?: (port: number) => Record<string, unknown> } = {},
) {
  const up = createServer((_req, res) => res.writeHead(o.plainStatus ?? 426).end())
  up.on('upgrade', onUpgrade)
  up.listen(0, '127.0.0.1')
  await once(up, 'listening')
  const port = (up.address() as AddressInfo).port
  const s = await startTestSidecar({
    policy: { default: 'deny', rules: [{ id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], paths: ['/admin/**'] }, { id: 'ws', action: 'allow', hosts: ['127.0.0.1'], ports: [port] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] },
    credentials: [{ id: 'ws', audience: `http://127.0.0.1:${port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
    ...o.fragment?.(port),
  })
  t.teardown(async () => {
    await s.close()
    up.closeAllConnections()
    up.close()
  })
  return { port, s }
}

t.test('a credentialed WebSocket passes on what each read lets go in one piece, however many frames it holds', async (t) => {
  // A flood of empty frames: one write to the agent per frame piece cost a write call per 2 bytes,
  // and held the other agents' calls for seconds (the resource probe).
  const secret = 'LKCANARY-ws-flood-5e1d0c2b'
  const s = new WebSocketScrubber(compileNeedles([secret]))
  const pieces: Buffer[] = []
  s.on('data', (d: Buffer) => pieces.push(d))
  const flood = Buffer.concat([...Array.from({ length: 1000 }, () => Buffer.from([0x81, 0x00])), serverFrame(Buffer.from(`token ${secret}`)), Buffer.from([0x89, 0x00])])
  s.write(flood)
  await new Promise((r) => setImmediate(r))
  t.equal(pieces.length, 1, 'one piece for the one chunk read')
  const out = Buffer.concat(pieces)
  t.equal(out.length, flood.length, 'every frame, at its length')
  t.equal(out.indexOf(secret), -1, 'the credential overwritten')
  t.equal(out.subarray(0, 2000).toString('hex'), '8100'.repeat(1000), 'the empty frames as they were')
  t.equal(s.found, 1)
})

t.test('on drain a relayed WebSocket is closed with 1001 Going Away each way, at once, not cut at the deadline', async (t) => {
  // Credentialed (the upstream's bytes pass the scrubber) and not (they pass as read).
  for (const credentialed of [true, false]) {
    const fromAgent: Buffer[] = []
    const { s } = await startWsRig(
      t,
      (req, socket) => {
        socket.on('error', () => {})
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
        socket.write(serverFrame('hello'))
        // A server answers a Close with its own, then ends the connection (RFC 6455 §5.5.1).
        socket.on('data', (d: Buffer) => {
          fromAgent.push(d)
          const close = framePayloads(Buffer.concat(fromAgent)).find((f) => f.opcode === 0x8)
          if (close) socket.end(serverFrame(close.payload, { opcode: 0x8 }))
        })
      },
      { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { drain_ms: 10_000 } }, ...(credentialed ? {} : { credentials: [] }) }) },
    )
    const ws = new WebSocket(`ws://127.0.0.1:${s.sidecar.port}/live/feed`)
    const closed = new Promise<{ code: number; reason: string; wasClean: boolean }>((resolve) => (ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, wasClean: e.wasClean })))
    const message = await new Promise<unknown>((resolve) => (ws.onmessage = (m) => resolve(m.data)))
    t.equal(message, 'hello', `credentialed ${credentialed}: open and relaying`)
    const started = Date.now()
    const drained = s.close()
    t.same(await closed, { code: 1001, reason: 'proxy shutting down', wasClean: true }, `credentialed ${credentialed}: the agent's client read 1001 Going Away, a clean close`)
    await drained
    const took = Date.now() - started
    t.ok(took < 3000, `credentialed ${credentialed}: the drain ended in ${took} ms, not at drain_ms (10 s)`)
    const upstreamGot = framePayloads(Buffer.concat(fromAgent))
    t.same(upstreamGot.map((f) => f.opcode), [0x8], `credentialed ${credentialed}: the upstream got one Close, and nothing of the agent's answer`)
    t.same(upstreamGot[0] && closeOf(upstreamGot[0].payload), { code: 1001, reason: 'proxy shutting down' }, `credentialed ${credentialed}: 1001 to the upstream too`)
    const event = (await s.audit(1)).find((e) => e.via === 'upgrade')
    t.match(event, { status: 101, error: 'LK_DRAINING', reason: /closed with 1001 \(Going Away\), and the agent answered the close/ }, `credentialed ${credentialed}: the audit says how it ended`)
    assertNoCanary(t, s, String(message))
  }
})

t.test('a frame half-relayed when the drain starts goes whole, each way, and the Close after it', async (t) => {
  for (const credentialed of [true, false]) {
    let upstreamSocket: Duplex | null = null
    const fromAgent: Buffer[] = []
    const { s } = await startWsRig(
      t,
      (req, socket) => {
        socket.on('error', () => {})
        upstreamSocket = socket
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`)
        socket.on('data', (d: Buffer) => fromAgent.push(d))
      },
      { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { drain_ms: 10_000 } }, ...(credentialed ? {} : { credentials: [] }) }) },
    )
    const agent = connect(s.sidecar.port, '127.0.0.1')
    agent.on('error', () => {})
    await once(agent, 'connect')
    const toAgent: Buffer[] = []
    agent.on('data', (d: Buffer) => toAgent.push(d))
    agent.write(`GET /live/feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
    await until(() => Buffer.concat(toAgent).includes('\r\n\r\n'))
    // Each side sends a frame's header and half its payload (past 125 bytes: a 2-byte length)...
    const down = serverFrame(Buffer.alloc(300, 'd'), { opcode: 0x2 })
    const up = clientFrame(Buffer.alloc(300, 'u'), { opcode: 0x2 })
    upstreamSocket!.write(down.subarray(0, 150))
    agent.write(up.subarray(0, 150))
    const headBytes = Buffer.concat(toAgent).indexOf('\r\n\r\n') + 4
    await until(() => Buffer.concat(toAgent).length >= headBytes + 150 && Buffer.concat(fromAgent).length >= 150)
    // ...the drain starts, then the rest comes.
    const drained = s.close()
    await new Promise((r) => setTimeout(r, 50))
    upstreamSocket!.write(down.subarray(150))
    agent.write(up.subarray(150))
    await until(() => framePayloads(Buffer.concat(toAgent).subarray(headBytes)).length >= 2 && framePayloads(Buffer.concat(fromAgent)).length >= 2)
    const agentGot = framePayloads(Buffer.concat(toAgent).subarray(headBytes))
    t.same(agentGot.map((f) => f.opcode), [0x2, 0x8], `credentialed ${credentialed}: the agent got the frame, then a Close`)
    t.ok(agentGot[0]?.payload.equals(Buffer.alloc(300, 'd')), `credentialed ${credentialed}: the frame to the agent whole and unchanged`)
    t.same(agentGot[1] && closeOf(agentGot[1].payload), { code: 1001, reason: 'proxy shutting down' })
    const upstreamGot = framePayloads(Buffer.concat(fromAgent))
    t.same(upstreamGot.map((f) => f.opcode), [0x2, 0x8], `credentialed ${credentialed}: the upstream got the frame, then a Close`)
    t.ok(upstreamGot[0]?.payload.equals(Buffer.alloc(300, 'u')), `credentialed ${credentialed}: the frame to the upstream whole and unchanged`)
    t.same(upstreamGot[1] && closeOf(upstreamGot[1].payload), { code: 1001, reason: 'proxy shutting down' })
    // Whatever either side sends after the Close goes nowhere; the agent's own Close ends its connection.
    upstreamSocket!.write(serverFrame('late'))
    agent.write(clientFrame(Buffer.from([0x03, 0xe9]), { opcode: 0x8 }))
    await Promise.race([once(agent, 'close'), new Promise((r) => setTimeout(r, 3000))])
    t.ok(agent.destroyed, `credentialed ${credentialed}: the agent's connection ended once it answered`)
    t.equal(framePayloads(Buffer.concat(toAgent).subarray(headBytes)).length, 2, 'nothing reached the agent after the Close')
    t.equal(framePayloads(Buffer.concat(fromAgent)).length, 2, "nor the upstream: the agent's answer is the sidecar's to read")
    await drained
    const event = (await s.audit(1)).find((e) => e.via === 'upgrade')
    t.match(event, { status: 101, error: 'LK_DRAINING', reason: /1001/ }, `credentialed ${credentialed}: recorded as closed by the drain`)
    assertNoCanary(t, s, Buffer.concat(toAgent).toString('latin1'))
  }
})

t.test('on drain: a WebSocket in a plaintext tunnel and one whose 101 comes late are closed with 1001; a frame never finished is cut after the grace', async (t) => {
  let answerLate: (() => void) | null = null
  const { port, s } = await startWsRig(
    t,
    (req, socket) => {
      socket.on('error', () => {})
      const head = `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(req)}\r\n\r\n`
      // The late one's 101 and a frame in one write: the frame is relayed, then the Close.
      if (req.url === '/late') answerLate = () => socket.write(Buffer.concat([Buffer.from(head), serverFrame('hi')]))
      else socket.write(head)
      // Stuck mid-frame: a header and part of its payload, never the rest.
      if (req.url === '/stuck') socket.write(serverFrame(Buffer.alloc(300, 's')).subarray(0, 100))
    },
    { fragment: (port) => ({ routes: { live: `http://127.0.0.1:${port}` }, sidecar: { timeouts: { drain_ms: 10_000 } } }) },
  )
  const handshake = (target: string) => `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`
  const open = async (first: string) => {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    const got: Buffer[] = []
    sock.on('data', (d: Buffer) => got.push(d))
    sock.write(first)
    return { sock, got: () => Buffer.concat(got) }
  }
  const afterHead = (b: Buffer) => {
    const at = b.lastIndexOf('\r\n\r\n')
    return at < 0 ? Buffer.alloc(0) : b.subarray(at + 4)
  }
  const tunnelled = await open(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`)
  await until(() => tunnelled.got().includes('\r\n\r\n'))
  tunnelled.sock.write(handshake(`ws://127.0.0.1:${port}/feed`))
  await until(() => tunnelled.got().includes('101 Switching'))
  const late = await open(handshake('/live/late'))
  const stuck = await open(handshake('/live/stuck'))
  await until(() => answerLate !== null && afterHead(stuck.got()).length >= 100)
  t.match(tunnelled.got().toString('latin1'), /101 Switching/, 'the tunnelled WebSocket opened')
  const started = Date.now()
  const drained = s.close()
  await new Promise((r) => setTimeout(r, 50))
  answerLate!()
  await until(() => framePayloads(afterHead(tunnelled.got())).length >= 1 && framePayloads(afterHead(late.got())).length >= 2)
  const closeIn = (b: Buffer) => {
    const frames = framePayloads(afterHead(b))
    const last = frames[frames.length - 1]
    return last?.opcode === 0x8 ? closeOf(last.payload) : null
  }
  t.same(closeIn(tunnelled.got()), { code: 1001, reason: 'proxy shutting down' }, 'the WebSocket inside a plaintext tunnel got 1001')
  t.match(late.got().toString('latin1'), /^HTTP\/1\.1 101 /, 'the late 101 went to its agent')
  t.same(framePayloads(afterHead(late.got())).map((f) => f.opcode), [0x1, 0x8], 'then the frame that came with it, then the Close')
  t.same(closeIn(late.got()), { code: 1001, reason: 'proxy shutting down' }, 'a WebSocket opened during the drain is closed at once, 1001')
  // The stuck one: no Close can go into the middle of a frame; cut once the grace is over.
  await Promise.race([once(stuck.sock, 'close'), new Promise((r) => setTimeout(r, 5000))])
  t.ok(stuck.sock.destroyed, 'the WebSocket stuck mid-frame was cut')
  t.equal(afterHead(stuck.got()).length, 100, 'nothing was written into the frame under way')
  tunnelled.sock.destroy()
  late.sock.destroy()
  await drained
  const took = Date.now() - started
  t.ok(took >= 900 && took < 5000, `the drain waited out the grace (1 s) for the stuck one, not drain_ms: ${took} ms`)
  const events = (await s.audit(4)).filter((e) => e.via === 'upgrade')
  t.match(events.find((e) => e.path === '/stuck'), { status: 101, error: 'LK_DRAINING', reason: /a frame to the agent was under way, not whole within 1000 ms: cut without a close frame/ }, 'the stuck one recorded as cut mid-frame')
  t.match(events.find((e) => e.path === '/late'), { status: 101, error: 'LK_DRAINING', reason: /closed with 1001/ }, 'the late one recorded as closed by the drain')
  t.match(events.find((e) => e.path === '/feed'), { status: 101, error: 'LK_DRAINING', reason: /closed with 1001/ }, 'the tunnelled one too')
  assertNoCanary(t, s, tunnelled.got().toString('latin1'), late.got().toString('latin1'), stuck.got().toString('latin1'))
})

t.test("the drain's Close goes after the frame under way, whatever its length's encoding and wherever a read cut its header", async (t) => {
  // In memory: an agent socket whose writes are kept, an upstream, and what the upstream sends piped to the agent as relay.ts does.
  for (const size of [0, 125, 126, 65_535, 65_536, 70_000]) {
    for (const cut of [1, 2, 3, 5, 9]) {
      const agent = fakeSocket()
      const upstream = fakeSocket()
      const fromUpstream = new PassThrough()
      const ws = new ClosableWebSocket(agent.sock, upstream.sock, fromUpstream)
      fromUpstream.pipe(agent.sock)
      agent.sock.pipe(upstream.sock)
      const before = serverFrame('before')
      const frame = serverFrame(Buffer.alloc(size, 'x'), { opcode: 0x2 })
      fromUpstream.write(Buffer.concat([before, frame.subarray(0, cut)]))
      await new Promise((r) => setImmediate(r))
      ws.goAway()
      fromUpstream.write(Buffer.concat([frame.subarray(cut), serverFrame('late')]))
      await new Promise((r) => setImmediate(r))
      const close = Buffer.concat([Buffer.from([0x88, 21, 0x03, 0xe9]), Buffer.from('proxy shutting down')])
      t.ok(agent.written().equals(Buffer.concat([before, frame, close])), `${size} bytes, header cut after ${cut}: the frame whole, the Close, nothing after`)
      agent.sock.destroy()
    }
  }
})

/** In memory, a socket whose writes are kept. */
function fakeSocket() {
  const written: Buffer[] = []
  const sock = new Duplex({ read() {}, write(c: Buffer, _e, cb) { written.push(c); cb() } })
  return { sock: sock as unknown as Socket, written: () => Buffer.concat(written) }
}

t.test('a cut (a revocation, a policy denial) closes at once, 1008: no Close into a frame under way, nothing after, each side ended, destroyed after 1 s if its peer stays', async (t) => {
  const relays: Socket[][] = []
  // How much of the next frame the agent had been sent when the cut came: none (a frame boundary), part of its header, all of it and some payload.
  for (const begun of [0, 1, 2, 5]) {
    const agent = fakeSocket()
    const upstream = fakeSocket()
    const fromUpstream = new PassThrough()
    new ClosableWebSocket(agent.sock, upstream.sock, fromUpstream)
    fromUpstream.pipe(agent.sock)
    agent.sock.pipe(upstream.sock)
    const before = serverFrame('before')
    const frame = serverFrame(Buffer.alloc(200, 'x'), { opcode: 0x2 })
    fromUpstream.write(Buffer.concat([before, frame.subarray(0, begun)]))
    await new Promise((r) => setImmediate(r))
    t.ok(cutWebSocket(agent.sock, 'LK_POLICY_DENIED', 'no-ws'), `${begun}: a relayed WebSocket takes its cut over`)
    // A tunnel's CONNECT and the WebSocket in it are cut alike: the second finds it cut, and sends nothing.
    t.ok(cutWebSocket(agent.sock, 'LK_REVOKED', null), `${begun}: cut again, still its own`)
    // Both sides go on sending.
    fromUpstream.write(Buffer.concat([frame.subarray(begun), serverFrame('late')]))
    ;(agent.sock as unknown as Duplex).push(clientFrame('late'))
    await new Promise((r) => setImmediate(r))
    const close = serverFrame(Buffer.concat([Buffer.from([0x03, 0xf0]), Buffer.from('LK_POLICY_DENIED, rule no-ws')]), { opcode: 0x8 })
    const want = begun === 0 ? Buffer.concat([before, close]) : Buffer.concat([before, frame.subarray(0, begun)])
    t.ok(agent.written().equals(want), begun === 0 ? '0: the agent got the Close, and nothing after it' : `${begun}: the frame under way cut short, no Close in it, nothing after`)
    t.same(
      framePayloads(upstream.written()).map((f) => ({ opcode: f.opcode, masked: f.masked, ...closeOf(f.payload), end: f.end })),
      [{ opcode: 0x8, masked: true, code: 1008, reason: 'LK_POLICY_DENIED', end: upstream.written().length }],
      `${begun}: the upstream got one masked Close, the code alone, and nothing of what the agent sent after`,
    )
    t.ok(agent.sock.writableEnded && upstream.sock.writableEnded && !agent.sock.destroyed && !upstream.sock.destroyed, `${begun}: both ended, not destroyed: what either peer sends is read`)
    relays.push([agent.sock, upstream.sock])
  }
  t.notOk(cutWebSocket(fakeSocket().sock, 'LK_REVOKED', null), 'a socket that is no relayed WebSocket is left to the caller')
  await new Promise((r) => setTimeout(r, 1100))
  t.ok(relays.flat().every((s) => s.destroyed), 'peers that never closed their side: destroyed after 1 s')
})
