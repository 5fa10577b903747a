// Bodies stream both ways, intact, with back-pressure; the audit counts the bytes.
import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { createServer, type Server } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startTestSidecar, startBearerRig, sidecarInFrontOf } from '../helpers/harness.js'

const SIZE = 16 * 1024 * 1024

t.test('16 MiB up (chunked) and 16 MiB down, byte for byte', async (t) => {
  const payload = randomBytes(SIZE)
  const digest = createHash('sha256').update(payload).digest('hex')
  let uploaded = ''
  const upstream: Server = createServer((req, res) => {
    if (req.method === 'POST') {
      const h = createHash('sha256')
      let n = 0
      req.on('data', (c: Buffer) => {
        h.update(c)
        n += c.length
      })
      req.on('end', () => {
        uploaded = `${n}:${h.digest('hex')}`
        res.end('stored')
      })
      return
    }
    // Download in 64 KiB pieces, honouring back-pressure from the sidecar.
    res.writeHead(200, { 'content-type': 'application/octet-stream' })
    Readable.from(
      (function* () {
        for (let o = 0; o < SIZE; o += 65536) yield payload.subarray(o, o + 65536)
      })(),
    ).pipe(res)
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] } })
  t.teardown(async () => {
    await s.close()
    upstream.close()
  })
  const { Client } = await import('undici')
  const proxy = new Client(s.proxy)
  t.teardown(() => proxy.close())

  const up = await proxy.request({
    path: `http://127.0.0.1:${port}/upload`,
    method: 'POST',
    headers: { host: `127.0.0.1:${port}` },
    body: Readable.from(
      (function* () {
        for (let o = 0; o < SIZE; o += 100_000) yield payload.subarray(o, o + 100_000)
      })(),
    ),
  })
  t.equal(await up.body.text(), 'stored')
  t.equal(uploaded, `${SIZE}:${digest}`, 'the upstream received every byte of the chunked upload, in order')

  const down = await proxy.request({ path: `http://127.0.0.1:${port}/download`, method: 'GET', headers: { host: `127.0.0.1:${port}` } })
  const h = createHash('sha256')
  let n = 0
  // Read slowly at first so the sidecar has to hold back the upstream rather than buffer it all.
  let first = true
  for await (const chunk of down.body) {
    if (first) {
      await new Promise((r) => setTimeout(r, 200))
      first = false
    }
    h.update(chunk as Buffer)
    n += (chunk as Buffer).length
  }
  t.equal(`${n}:${h.digest('hex')}`, `${SIZE}:${digest}`, 'the agent received every byte of the download, in order')
  t.ok(s.sidecar.metrics, 'sidecar still up')

  const audit = await s.audit()
  t.same(audit.map((e) => [e.method, e.status, e.bytes_in, e.bytes_out]), [
    ['POST', 200, SIZE, 6],
    ['GET', 200, 0, SIZE],
  ])
})

t.test('an agent that hangs up mid-response is recorded as having done so, not as an upstream fault', async (t) => {
  // An upstream that streams until the agent's side goes away.
  const { s, host } = await startBearerRig(t, {
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      const timer = setInterval(() => res.write(Buffer.alloc(16 * 1024)), 5)
      res.on('close', () => clearInterval(timer))
      return true
    },
  })
  const { connect } = await import('node:net')
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.write(`GET http://${host}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`)
  await once(sock, 'data')
  sock.destroy()
  t.match(await s.audit(1), [{ path: '/stream', status: 200, error: 'LK_CLIENT_CLOSED', reason: 'the agent closed the connection before the response was complete' }])
})

t.test('an agent that hangs up mid-upload is recorded as having done so, with the bytes that went on', async (t) => {
  // startUpstream answers once the whole body is in; it never is, so nothing answers.
  const { s, host } = await startBearerRig(t)
  const { connect } = await import('node:net')
  const heads = {
    'content-length': `POST http://${host}/cl HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n`,
    chunked: `POST http://${host}/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n`,
  }
  for (const [framing, head] of Object.entries(heads)) {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    const part = Buffer.alloc(5120, 0x61)
    sock.write(head)
    sock.write(framing === 'chunked' ? Buffer.concat([Buffer.from(`${part.length.toString(16)}\r\n`), part, Buffer.from('\r\n')]) : part)
    await new Promise((r) => setTimeout(r, 200))
    sock.end()
    await new Promise((r) => setTimeout(r, 300))
    sock.destroy()
  }
  t.same(
    (await s.audit(2)).map((e) => [e.path, e.status, e.error, e.bytes_in, e.reason]).sort(),
    [
      ['/chunked', 499, 'LK_CLIENT_CLOSED', 5120, 'the agent closed the connection before its request body was complete'],
      ['/cl', 499, 'LK_CLIENT_CLOSED', 5120, 'the agent closed the connection before its request body was complete'],
    ],
    'both recorded as the agent leaving, bytes_in what was sent on rather than what was announced',
  )
})

t.test("a response head goes to the agent when it comes, not with the body's first bytes", async (t) => {
  // An API that answers 200 at once and thinks before its body (an LLM, a long poll): the agent
  // can act on the status meanwhile. The upstream sends its body only once the agent has the head.
  const bodies: (() => void)[] = []
  const upstream: Server = createServer((req, res) => {
    res.writeHead(200, req.url === '/sized' ? { 'content-type': 'text/plain', 'content-length': '4' } : { 'content-type': 'text/plain' })
    res.flushHeaders()
    bodies.push(() => res.end('late'))
  })
  const { port, s } = await sidecarInFrontOf(t, upstream)
  const { connect } = await import('node:net')
  for (const path of ['/sized', '/chunked']) {
    const socket = connect(s.sidecar.port, '127.0.0.1')
    await once(socket, 'connect')
    socket.write(`GET http://127.0.0.1:${port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    let got = ''
    socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
    const deadline = Date.now() + 5000
    while (!got.includes('\r\n\r\n') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    t.match(got, /^HTTP\/1\.1 200 OK\r\n/, `${path}: the head came before the body was sent`)
    bodies.shift()?.()
    await once(socket, 'close')
    t.match(got, /\r\n\r\n(4\r\nlate\r\n0\r\n\r\n|late)$/, `${path}: then the body`)
  }
})
