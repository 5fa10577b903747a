// A chunked body of many tiny chunks is coalesced (forward.ts): a request's on its way upstream
// (`coalesced`), a response's on its way to the agent (ResponseRelay.onResponseData). Either
// arrives whole, in order, counted, in a few writes rather than one per chunk; a large one still
// streams, with back-pressure; a stalled one is still cut; a lone chunk is not held back.
import t from 'tap'
import { createServer, type IncomingMessage, type ServerResponse, type Server } from 'node:http'
import { connect, createServer as createNetServer, type Socket } from 'node:net'
import { once } from 'node:events'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import type { AddressInfo } from 'node:net'
import { startTestSidecar, parseRawResponse, assertNoCanary, CANARY, type TestSidecar } from '../helpers/harness.js'

/** A plain upstream (node:http) running `handler` for every request, and a sidecar allowing it. */
async function rig(t: { teardown(fn: () => unknown): void }, handler: (req: IncomingMessage, res: ServerResponse) => void, sidecar: Record<string, unknown> = {}): Promise<{ s: TestSidecar; host: string }> {
  const upstream: Server = createServer(handler)
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] }, sidecar })
  t.teardown(async () => {
    await s.close()
    upstream.closeAllConnections()
    upstream.close()
  })
  return { s, host: `127.0.0.1:${port}` }
}

/** `count` chunks of `size` bytes each, byte i of the body being i % 251 (so order shows), framed. */
function framed(count: number, size: number, from = 0): Buffer {
  const out = Buffer.allocUnsafe(count * (size.toString(16).length + size + 4))
  let o = 0
  let n = from
  for (let i = 0; i < count; i++) {
    o += out.write(`${size.toString(16)}\r\n`, o, 'latin1')
    for (let j = 0; j < size; j++) out[o++] = n++ % 251
    o += out.write('\r\n', o, 'latin1')
  }
  return out.subarray(0, o)
}

function ordered(body: Buffer): boolean {
  for (let i = 0; i < body.length; i++) if (body[i] !== i % 251) return false
  return true
}

/** Writes `data` on `sock` in 64 KiB writes, waiting for drain. */
async function writeAll(sock: Socket, data: Buffer): Promise<void> {
  for (let o = 0; o < data.length; o += 65536) {
    if (!sock.write(data.subarray(o, o + 65536))) await once(sock, 'drain')
  }
}

/** This process's Buffer memory once what earlier tests left is collected. */
async function settled(gc: () => void): Promise<number> {
  for (let i = 0; i < 3; i++) {
    gc()
    await new Promise((r) => setTimeout(r, 50))
  }
  return process.memoryUsage().arrayBuffers
}

function rawClient(port: number): { sock: Socket; response: Promise<string> } {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  let raw = ''
  const response = new Promise<string>((resolve) => {
    sock.on('data', (d: Buffer) => {
      raw += d.toString('latin1')
      if (/content-length: (\d+)\r\n[^]*\r\n\r\n/i.test(raw)) {
        const r = parseRawResponse(raw)
        if (Buffer.byteLength(r.body) >= Number(r.headers['content-length'])) resolve(raw)
      }
    })
    sock.on('close', () => resolve(raw))
  })
  return { sock, response }
}

t.test('200,000 one-byte chunks arrive whole and in order, counted, in a few upstream writes rather than one each', async (t) => {
  let got: { bytes: Buffer; dataEvents: number } | null = null
  const { s, host } = await rig(t, (req, res) => {
    const parts: Buffer[] = []
    // Each 'data' event on the upstream is (at least) one chunk frame the sidecar wrote.
    req.on('data', (c: Buffer) => parts.push(c))
    req.on('end', () => {
      got = { bytes: Buffer.concat(parts), dataEvents: parts.length }
      res.end('stored')
    })
  })
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  sock.write(`POST http://${host}/tiny HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n`)
  await writeAll(sock, framed(200_000, 1))
  sock.write('0\r\n\r\n')
  const r = parseRawResponse(await response)
  sock.destroy()
  t.equal(r.status, 200)
  t.equal(r.body, 'stored')
  t.equal(got!.bytes.length, 200_000, 'every byte arrived')
  t.ok(ordered(got!.bytes), 'in order')
  // Without coalescing each chunk was its own write and frame: some 180,000 'data' events here.
  t.ok(got!.dataEvents < 2_000, `the upstream read the body in ${got!.dataEvents} pieces, not one per chunk`)
  t.match(await s.audit(), [{ path: '/tiny', status: 200, bytes_in: 200_000 }], 'bytes_in counts every byte sent on')
})

t.test('a small chunked body in one chunk goes on as it came, and at once', async (t) => {
  const seen: string[] = []
  const { s, host } = await rig(t, (req, res) => {
    const parts: string[] = []
    req.on('data', (c: Buffer) => parts.push(c.toString()))
    req.on('end', () => {
      seen.push(...parts)
      res.end('ok')
    })
  })
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  sock.write(`POST http://${host}/one HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n`)
  t.equal(parseRawResponse(await response).status, 200)
  sock.destroy()
  t.same(seen, ['hello'])
  t.match(await s.audit(), [{ path: '/one', bytes_in: 5 }])
})

t.test('a chunk sent alone is forwarded without waiting for more (a streaming agent waits on the answer)', async (t) => {
  // The upstream answers as soon as it has the first chunk; the agent sends nothing more until then.
  const { s, host } = await rig(t, (req, res) => {
    req.once('data', (c: Buffer) => {
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write(`got ${c.toString()}\n`)
      req.on('data', (c2: Buffer) => res.write(`got ${c2.toString()}\n`))
      req.on('end', () => res.end())
    })
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  let raw = ''
  sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
  sock.write(`POST http://${host}/duplex HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n`)
  const waitFor = async (text: string): Promise<boolean> => {
    for (let i = 0; i < 100 && !raw.includes(text); i++) await new Promise((r) => setTimeout(r, 20))
    return raw.includes(text)
  }
  t.ok(await waitFor('got abc'), 'the first chunk reached the upstream while the agent waited')
  sock.write('3\r\ndef\r\n')
  t.ok(await waitFor('got def'), 'and the second')
  sock.write('0\r\n\r\n')
  await waitFor('\r\n0\r\n\r\n')
  sock.destroy()
  t.match(await s.audit(), [{ path: '/duplex', status: 200, bytes_in: 6 }])
})

t.test('a 32 MiB body of small chunks streams: the upstream has its first part before the agent sends the second half', async (t) => {
  const HALF = 16 * 1024 * 1024
  const CHUNK = 1024
  let received = 0
  let firstHalfSeen!: () => void
  const firstHalfIn = new Promise<void>((r) => (firstHalfSeen = r))
  const { s, host } = await rig(t, (req, res) => {
    req.on('data', (c: Buffer) => {
      received += c.length
      if (received >= 1024 * 1024) firstHalfSeen()
    })
    req.on('end', () => res.end(`stored ${received}`))
  })
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  sock.write(`POST http://${host}/big HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n`)
  await writeAll(sock, framed(HALF / CHUNK, CHUNK))
  // A sidecar that gathered the whole body before sending it on would leave the upstream empty here.
  const streamed = await Promise.race([firstHalfIn.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000).unref())])
  t.ok(streamed, `the upstream had ${received} bytes while the agent held back the second half`)
  await writeAll(sock, framed(HALF / CHUNK, CHUNK, HALF))
  sock.write('0\r\n\r\n')
  const r = parseRawResponse(await response)
  sock.destroy()
  t.equal(r.body, `stored ${2 * HALF}`)
  t.match(await s.audit(), [{ path: '/big', status: 200, bytes_in: 2 * HALF }])
})

t.test('back-pressure: an upstream that stops reading stops the sidecar reading the agent, with little held in between', async (t) => {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  let upstreamReq: IncomingMessage | null = null
  let received = 0
  const { s, host } = await rig(t, (req, res) => {
    upstreamReq = req
    // Reads nothing until told to.
    req.pause()
    req.on('data', (c: Buffer) => (received += c.length))
    req.on('end', () => res.end(`stored ${received}`))
  })
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  sock.write(`POST http://${host}/held HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n`)
  // 100-byte chunks in 64 KiB writes until the agent cannot write for half a second (up to 256 MiB).
  const piece = framed(600, 100)
  let sent = 0
  let blocked = false
  const before = await settled(gc)
  while (sent < 256 * 1024 * 1024) {
    const ok = sock.write(piece)
    sent += piece.length - 600 * 6
    if (!ok) {
      const drained = await Promise.race([once(sock, 'drain').then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 500))])
      if (!drained) {
        blocked = true
        break
      }
    }
  }
  gc()
  const held = process.memoryUsage().arrayBuffers - before
  t.ok(blocked, `the agent was held back after ${(sent / 1048576).toFixed(1)} MiB`)
  t.ok(upstreamReq !== null, 'the upstream has the request')
  // Node holds what it was given in buffers of its own on both sockets: a sidecar reading without
  // bound would hold everything the agent sent past the kernels' socket buffers.
  t.ok(held < 4 * 1024 * 1024, `buffers in this process grew by ${(held / 1048576).toFixed(2)} MiB while the upstream read nothing`)
  // Let it all through: the body arrives whole.
  upstreamReq!.resume()
  await once(sock, 'drain')
  sock.write('0\r\n\r\n')
  const r = parseRawResponse(await response)
  sock.destroy()
  t.equal(r.body, `stored ${sent}`, 'the upstream got every byte once it read again')
  t.match(await s.audit(), [{ path: '/held', status: 200, bytes_in: sent }])
})

t.test('a chunked body of tiny chunks that stops is still cut after body_ms, with the bytes sent on', async (t) => {
  let got = 0
  const { s, host } = await rig(
    t,
    (req, res) => {
      req.on('data', (c: Buffer) => (got += c.length))
      req.on('end', () => res.end('ok'))
      req.on('error', () => {})
    },
    { timeouts: { body_ms: 300 } },
  )
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  const started = performance.now()
  sock.write(`POST http://${host}/stalls HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n`)
  sock.write(framed(1000, 1))
  const r = parseRawResponse(await Promise.race([response, new Promise<string>((res) => setTimeout(() => res(''), 4_000).unref())]))
  sock.destroy()
  t.equal(r.status, 408, 'answered 408')
  t.match(r.body, /LK_IDLE_TIMEOUT/)
  t.ok(performance.now() - started < 4_000, 'within two gaps or so')
  t.match(await s.audit(), [{ path: '/stalls', status: 408, error: 'LK_IDLE_TIMEOUT', bytes_in: 1000 }], 'audited with the 1,000 bytes sent on')
  t.equal(got, 1000, 'the upstream had them')
})

t.test('an upstream slow to take a body of tiny chunks is not the agent stalling', async (t) => {
  let got = 0
  const { s, host } = await rig(
    t,
    (req, res) => {
      // Takes nothing for three gaps, then everything.
      req.pause()
      setTimeout(() => req.resume(), 1_000)
      req.on('data', (c: Buffer) => (got += c.length))
      req.on('end', () => res.end(`stored ${got}`))
    },
    { timeouts: { body_ms: 300 } },
  )
  const { sock, response } = rawClient(s.sidecar.port)
  await once(sock, 'connect')
  sock.write(`POST http://${host}/slowup HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n`)
  // 8 MiB in 64-byte chunks: more than the sockets between hold at their starting sizes.
  await writeAll(sock, framed(131_072, 64))
  sock.write('0\r\n\r\n')
  const r = parseRawResponse(await response)
  sock.destroy()
  t.equal(r.status, 200)
  t.equal(r.body, `stored ${8 * 1024 * 1024}`)
  t.match(await s.audit(), [{ path: '/slowup', status: 200, bytes_in: 8 * 1024 * 1024 }])
})

// ---- the response direction ----

/**
 * A raw upstream that answers every request with a chunked body of `count` chunks of `size` bytes
 * (framed() 64 KiB at a time, honouring back-pressure); `credentialed` puts the bearer it was
 * sent into the body, split one byte per chunk; `ordered` false repeats one batch of frames.
 */
async function tinyChunkRig(t: { teardown(fn: () => unknown): void }, count: number, size: number, sidecar: Record<string, unknown> = {}, credentialed = false, ordered = true): Promise<{ s: TestSidecar; host: string; upstreamClosed: () => boolean }> {
  let closed = false
  const conns = new Set<import('node:net').Socket>()
  const upstream = createNetServer((sock) => {
    conns.add(sock)
    sock.on('error', () => {})
    sock.on('close', () => (closed = true))
    let head = ''
    sock.on('data', (d: Buffer) => {
      if (head.includes('\r\n\r\n')) return
      head += d.toString('latin1')
      if (!head.includes('\r\n\r\n')) return
      sock.write('HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n')
      void (async () => {
        if (credentialed) {
          const auth = /\r\nauthorization: ([^\r]*)/i.exec(head)?.[1] ?? ''
          sock.write(Buffer.from([...auth].map((c) => `1\r\n${c}\r\n`).join(''), 'latin1'))
        }
        // Framed a batch at a time: this process's buffers are what one test measures.
        const per = Math.floor(65536 / (size + 8))
        // Unordered: one batch, written again and again (cheap enough for hundreds of MiB).
        const same = ordered ? null : framed(per, size)
        for (let sent = 0; sent < count && !sock.destroyed; sent += per) {
          if (!sock.write(same ?? framed(Math.min(per, count - sent), size, sent * size))) {
            await new Promise<void>((r) => {
              const done = (): void => {
                sock.off('drain', done).off('close', done)
                r()
              }
              sock.on('drain', done).on('close', done)
            })
          }
        }
        if (!sock.destroyed) sock.write('0\r\n\r\n')
      })()
    })
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const origin = `http://127.0.0.1:${port}`
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] },
    ...(credentialed ? { credentials: [{ id: 'up', audience: origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }] } : {}),
    sidecar,
  })
  t.teardown(async () => {
    await s.close()
    // Its sockets too: one still writing keeps the test process alive until it gives up.
    for (const c of conns) c.destroy()
    upstream.close()
  })
  return { s, host: `127.0.0.1:${port}`, upstreamClosed: () => closed }
}

/** A chunked response's frames as the agent got them: the body and how many frames carried it. */
function unframe(raw: Buffer): { status: number; body: Buffer; frames: number } {
  const end = raw.indexOf('\r\n\r\n')
  const status = Number(raw.subarray(9, 12).toString())
  const parts: Buffer[] = []
  let o = end + 4
  for (;;) {
    const eol = raw.indexOf('\r\n', o)
    const size = parseInt(raw.subarray(o, eol).toString('latin1'), 16)
    if (!(size > 0)) break
    parts.push(raw.subarray(eol + 2, eol + 2 + size))
    o = eol + 2 + size + 2
  }
  return { status, body: Buffer.concat(parts), frames: parts.length }
}

/** Sends a GET for `path` on a raw connection; resolves with everything the agent got, once it closes. */
async function rawGet(port: number, host: string, path: string): Promise<Buffer> {
  const sock = connect(port, '127.0.0.1')
  sock.on('error', () => {})
  const got: Buffer[] = []
  sock.on('data', (d: Buffer) => {
    got.push(d)
    if (d.subarray(-7).toString('latin1') === '\r\n0\r\n\r\n' || d.toString('latin1') === '0\r\n\r\n') sock.end()
  })
  sock.write(`GET http://${host}${path} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  await Promise.race([once(sock, 'close'), new Promise((r) => setTimeout(r, 20_000).unref())])
  sock.destroy()
  return Buffer.concat(got)
}

t.test('a response of 200,000 one-byte chunks reaches the agent whole and in order, counted, in a few frames', async (t) => {
  const { s, host } = await tinyChunkRig(t, 200_000, 1)
  const r = unframe(await rawGet(s.sidecar.port, host, '/tiny-down'))
  t.equal(r.status, 200)
  t.equal(r.body.length, 200_000, 'every byte arrived')
  t.ok(ordered(r.body), 'in order')
  // Relayed one by one, each chunk was a frame (and a write) of its own: 200,000 here.
  t.ok(r.frames < 2_000, `the agent got it in ${r.frames} chunk frames, not one per chunk`)
  t.match(await s.audit(), [{ path: '/tiny-down', status: 200, bytes_out: 200_000 }], 'bytes_out counts every byte')
})

t.test('a credential echoed one byte per chunk is still overwritten when the chunks are gathered', async (t) => {
  const { s, host } = await tinyChunkRig(t, 1000, 1, {}, true)
  const raw = await rawGet(s.sidecar.port, host, '/echo-down')
  const r = unframe(raw)
  t.equal(r.status, 200)
  const bearer = `Bearer ${CANARY}`
  t.equal(r.body.subarray(0, bearer.length).toString('latin1'), `Bearer ${'*'.repeat(CANARY.length)}`, 'overwritten at the same length')
  t.ok(ordered(r.body.subarray(bearer.length)), 'the rest as sent')
  t.match(await s.audit(), [{ path: '/echo-down', status: 200, bytes_out: bearer.length + 1000 }])
  t.ok(s.logs.some((l) => l.includes('sent the injected credential back')), 'the reflection is logged for the operator')
  assertNoCanary(t, s, raw.toString('latin1'))
})

t.test('a lone response chunk reaches the agent before the upstream sends the next', async (t) => {
  let sendRest: () => void = () => {}
  const restWanted = new Promise<void>((r) => (sendRest = r))
  const { s, host } = await rig(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('data: first\n\n')
    void restWanted.then(() => res.end('data: second\n\n'))
  })
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  let raw = ''
  sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
  sock.write(`GET http://${host}/events HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  for (let i = 0; i < 100 && !raw.includes('data: first'); i++) await new Promise((r) => setTimeout(r, 20))
  t.ok(raw.includes('data: first'), 'the first event arrived while the upstream waited')
  sendRest()
  for (let i = 0; i < 100 && !raw.includes('\r\n0\r\n\r\n'); i++) await new Promise((r) => setTimeout(r, 20))
  t.ok(raw.includes('data: second'), 'then the second')
  sock.destroy()
})

t.test('an agent that reads none of a response of tiny chunks holds the upstream back, and is cut after body_ms', async (t) => {
  // 64 MiB in one-byte chunks, far more than the sockets between hold. One byte: a socket read
  // holds less than a full batch, so every batch goes from endOfTick, which must pause too.
  const { s, host, upstreamClosed } = await tinyChunkRig(t, 64 * 1024 * 1024, 1, { timeouts: { body_ms: 2_000 } }, false, false)
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  const before = await settled(gc)
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  sock.write(`GET http://${host}/unread HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  sock.pause()
  // Sampled until it stops moving: while the sockets between fill, megabytes are in flight.
  let held = Infinity
  for (let i = 0, last = -1; i < 30; i++) {
    await new Promise((r) => setTimeout(r, 100))
    gc()
    held = process.memoryUsage().arrayBuffers - before
    if (Math.abs(held - last) < 64 * 1024) break
    last = held
  }
  t.ok(held < 4 * 1024 * 1024, `buffers in this process grew by ${(held / 1048576).toFixed(2)} MiB while the agent read nothing`)
  t.notOk(upstreamClosed(), 'the upstream is held, not let go, before body_ms')
  for (let i = 0; i < 300 && !upstreamClosed(); i++) await new Promise((r) => setTimeout(r, 20))
  t.ok(upstreamClosed(), 'the upstream was let go')
  sock.destroy()
  t.match(await s.audit(1), [{ path: '/unread', status: 200, error: 'LK_IDLE_TIMEOUT' }])
})
