// Many tiny chunks through the sidecar, both ways, and what they cost it.
//
//   npm run build && taskset -c 1 node bench/chunked-body.mjs [--chunks 200000] [--size 1] [--dir up|down|both|small] [--repeat 1]
//   (--dir small: --chunks small chunked POSTs of one 18-byte chunk each, in sequence: the common case)
//   (LK_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" passes node flags to the sidecar)
//
// Starts the real sidecar (dist/bin/latchkey.js, pinned with the rest to the CPU this script is
// given), a raw-socket upstream on 127.0.0.1 that parses chunked framing itself (so it can count
// the frames and the reads it gets), and then, in each direction:
//   up:   a raw client sends one POST whose chunked body is `--chunks` chunks of `--size` bytes,
//         written in 64 KiB batches (the client is not the bottleneck); the upstream counts them.
//   down: a GET whose answer the upstream writes as `--chunks` chunks of `--size` bytes; the
//         client counts the frames and reads it gets.
// While each runs, a plain GET loop through the same sidecar (keep-alive, one at a time) records
// its latency. Reported: the sidecar's CPU (utime+stime from /proc/<pid>/stat) and wall time for
// the transfer, the GET loop's p50/max, the frames and reads on the far side, and the sidecar's
// RSS before, peak (sampled every 20 ms) and after.
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer, connect } from 'node:net'
import { freePort } from './ports.mjs'
import http from 'node:http'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

let T0 = 0
const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : dflt
}
const CHUNKS = Number(arg('chunks', 200000))
const SIZE = Number(arg('size', 1))
const DIR = arg('dir', 'both')
const REPEAT = Number(arg('repeat', 1))

// ---- upstream: HTTP/1.1 on raw sockets, keep-alive, counting what a chunked body arrives as ----
const up = { frames: 0, reads: 0, bytes: 0 }
function upstreamConnection(sock) {
  let buf = Buffer.alloc(0)
  let state = 'head' // head | body-cl | chunk-size | chunk-data | chunk-crlf | trailer
  let left = 0
  let path = ''
  let counting = false
  const answer = (body) => sock.write(`HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\n\r\n${body}`)
  const finish = () => {
    state = 'head'
    if (counting) answer(JSON.stringify(up))
    else answer('ok')
  }
  sock.on('data', (d) => {
    if (counting) up.reads++
    buf = buf.length ? Buffer.concat([buf, d]) : d
    for (;;) {
      if (state === 'head') {
        const end = buf.indexOf('\r\n\r\n')
        if (end < 0) return
        const head = buf.subarray(0, end).toString('latin1')
        buf = buf.subarray(end + 4)
        path = head.split(' ')[1]
        const cl = /\r\ncontent-length:\s*(\d+)/i.exec(head)
        const te = /\r\ntransfer-encoding:\s*chunked/i.test(head)
        counting = path.startsWith('/upload')
        if (path.startsWith('/download')) {
          sendMany(sock)
          continue
        }
        if (te) state = 'chunk-size'
        else if (cl && Number(cl[1]) > 0) {
          state = 'body-cl'
          left = Number(cl[1])
        } else {
          finish()
          continue
        }
      }
      if (state === 'body-cl') {
        const n = Math.min(left, buf.length)
        up.bytes += n
        left -= n
        buf = buf.subarray(n)
        if (left > 0) return
        finish()
        continue
      }
      if (state === 'chunk-size') {
        const eol = buf.indexOf('\r\n')
        if (eol < 0) return
        left = parseInt(buf.subarray(0, eol).toString('latin1'), 16)
        buf = buf.subarray(eol + 2)
        if (left === 0) {
          state = 'trailer'
        } else {
          if (counting) up.frames++
          state = 'chunk-data'
        }
        continue
      }
      if (state === 'chunk-data') {
        const n = Math.min(left, buf.length)
        if (counting) up.bytes += n
        left -= n
        buf = buf.subarray(n)
        if (left > 0) return
        state = 'chunk-crlf'
        continue
      }
      if (state === 'chunk-crlf') {
        if (buf.length < 2) return
        buf = buf.subarray(2)
        state = 'chunk-size'
        continue
      }
      if (state === 'trailer') {
        if (buf.length < 2) return
        buf = buf.subarray(2) // no trailers sent here
        finish()
        continue
      }
    }
  })
  sock.on('error', () => {})
}

function frames(n, size) {
  const one = `${size.toString(16)}\r\n${'x'.repeat(size)}\r\n`
  const per = Math.max(1, Math.floor(65536 / one.length))
  const batch = Buffer.from(one.repeat(per))
  return { batch, per, one: Buffer.from(one) }
}

/** Writes `CHUNKS` chunks of `SIZE` bytes to `sock` in 64 KiB batches, honouring back-pressure. */
function writeChunks(sock, then) {
  const { batch, per, one } = frames(CHUNKS, SIZE)
  let left = CHUNKS
  const more = () => {
    while (left > 0) {
      let ok
      if (left >= per) {
        ok = sock.write(batch)
        left -= per
      } else {
        ok = sock.write(Buffer.concat(Array(left).fill(one)))
        left = 0
      }
      if (!ok) return void sock.once('drain', more)
    }
    then()
  }
  more()
}

function sendMany(sock) {
  sock.write('HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n')
  writeChunks(sock, () => sock.write('0\r\n\r\n'))
}

// ---- sidecar ----
function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ')
  return (Number(rest[11]) + Number(rest[12])) / 100 // utime, stime in clock ticks (100/s here)
}
function rssMB(pid) {
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return Number(m[1]) / 1024
}

async function waitFor(port) {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((r) => {
      const s = connect(port, '127.0.0.1', () => (s.end(), r(true)))
      s.on('error', () => r(false))
    })
    if (ok) return
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`port ${port} never opened`)
}

// ---- the concurrent GET loop ----
function getLoop(proxyPort, upPort) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
  const lat = []
  let stop = false
  const one = () =>
    new Promise((resolve, reject) => {
      const t = performance.now()
      const r = http.request({ host: '127.0.0.1', port: proxyPort, path: `http://127.0.0.1:${upPort}/ping`, agent }, (res) => {
        res.resume()
        res.on('end', () => {
          const took = performance.now() - t
          lat.push(took)
          // LK_TRACE=1: each GET's start (from the transfer's) and latency
          if (process.env.LK_TRACE) console.log(`  GET at ${(t - T0).toFixed(0)} ms took ${took.toFixed(1)} ms`)
          resolve()
        })
      })
      r.on('error', reject)
      r.end()
    })
  const done = (async () => {
    while (!stop) {
      await one()
      await new Promise((r) => setTimeout(r, 5))
    }
  })()
  return {
    async stop() {
      stop = true
      await done
      agent.destroy()
      lat.sort((a, b) => a - b)
      return { n: lat.length, p50: lat[Math.floor(lat.length / 2)] ?? 0, max: lat.at(-1) ?? 0 }
    },
  }
}

// ---- one transfer each way ----
function upload(proxyPort, upPort) {
  return new Promise((resolve, reject) => {
    const s = connect(proxyPort, '127.0.0.1')
    let resp = ''
    s.on('data', (d) => {
      resp += d.toString('latin1')
      const end = resp.indexOf('\r\n\r\n')
      if (end < 0) return
      const cl = Number(/content-length:\s*(\d+)/i.exec(resp)?.[1] ?? -1)
      if (cl >= 0 && resp.length >= end + 4 + cl) {
        s.end()
        resolve({ status: resp.slice(9, 12), body: resp.slice(end + 4, end + 4 + cl) })
      }
    })
    s.on('error', reject)
    s.write(`POST http://127.0.0.1:${upPort}/upload HTTP/1.1\r\nhost: 127.0.0.1:${upPort}\r\ntransfer-encoding: chunked\r\ncontent-type: application/octet-stream\r\n\r\n`)
    writeChunks(s, () => s.write('0\r\n\r\n'))
  })
}

function download(proxyPort, upPort) {
  return new Promise((resolve, reject) => {
    const s = connect(proxyPort, '127.0.0.1')
    let reads = 0
    let bytes = 0
    let tail = ''
    let framesSeen = 0
    let headDone = false
    let pending = Buffer.alloc(0)
    s.on('data', (d) => {
      reads++
      bytes += d.length
      if (!headDone) {
        pending = Buffer.concat([pending, d])
        const end = pending.indexOf('\r\n\r\n')
        if (end < 0) return
        headDone = true
        d = pending.subarray(end + 4)
      }
      // frames counted by their size lines: a rough but sufficient count (a size line split across reads may be missed)
      const text = tail + d.toString('latin1')
      framesSeen += (text.match(/(^|\r\n)[0-9a-f]+\r\n/g) ?? []).length
      tail = text.slice(-8)
      if (text.endsWith('\r\n0\r\n\r\n')) {
        s.end()
        resolve({ reads, bytes, frames: framesSeen })
      }
    })
    s.on('error', reject)
    s.write(`GET http://127.0.0.1:${upPort}/download HTTP/1.1\r\nhost: 127.0.0.1:${upPort}\r\n\r\n`)
  })
}

/** `n` small chunked POSTs (one 18-byte chunk each), one after another on one keep-alive connection: the common case. */
async function smallPosts(proxyPort, upPort, n) {
  const s = connect(proxyPort, '127.0.0.1')
  await new Promise((r) => s.once('connect', r))
  const body = '{"prompt":"hello"}'
  const req = `POST http://127.0.0.1:${upPort}/small HTTP/1.1\r\nhost: 127.0.0.1:${upPort}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`
  let buf = ''
  let answered = () => {}
  s.on('data', (d) => {
    buf += d.toString('latin1')
    const end = buf.indexOf('\r\n\r\n')
    if (end >= 0 && buf.length >= end + 6) {
      buf = buf.slice(end + 6) // the upstream answers "ok", Content-Length 2
      answered()
    }
  })
  const lat = []
  for (let i = 0; i < n; i++) {
    const t = performance.now()
    const done = new Promise((r) => (answered = r))
    s.write(req)
    await done
    lat.push(performance.now() - t)
  }
  s.end()
  lat.sort((a, b) => a - b)
  return { p50: lat[Math.floor(n / 2)], p99: lat[Math.floor(n * 0.99)] }
}

async function main() {
  const upstream = createServer(upstreamConnection)
  await new Promise((r) => upstream.listen(0, '127.0.0.1', r))
  const upPort = upstream.address().port
  const proxyPort = await freePort()
  const adminPort = await freePort()
  const work = mkdtempSync(join(tmpdir(), 'lk-chunks-'))
  const cfg = join(work, 'latchkey.yaml')
  writeFileSync(
    cfg,
    `version: 1
sidecar:
  listen: { host: 127.0.0.1, port: ${proxyPort} }
  admin: { host: 127.0.0.1, port: ${adminPort} }
policy:
  default: deny
  rules:
    - { id: up, action: allow, hosts: ["127.0.0.1"], ports: [${upPort}] }
network:
  allow: [{ cidr: 127.0.0.1/32, ports: [${upPort}] }]
audit:
  jsonl: { path: ${join(work, 'audit.jsonl')} }
log: { level: warn }
`,
  )
  const lk = spawn(process.execPath, [...(process.env.LK_NODE_ARGS ? process.env.LK_NODE_ARGS.split(' ') : []), '--no-maglev', join(root, 'dist/bin/latchkey.js'), 'sidecar', '--config', cfg], {
    env: { ...process.env, NODE_OPTIONS: '--max-semi-space-size=4', MALLOC_ARENA_MAX: '2', MALLOC_MMAP_THRESHOLD_: '32768' },
    stdio: ['ignore', 'inherit', 'inherit'],
  })
  try {
    await waitFor(proxyPort)
    // warm up: a few GETs and one small chunked upload
    const warm = getLoop(proxyPort, upPort)
    await new Promise((r) => setTimeout(r, 300))
    await warm.stop()
    console.log(`sidecar pid ${lk.pid}; ${CHUNKS} chunks of ${SIZE} byte(s) (${((CHUNKS * SIZE) / 1024).toFixed(0)} KiB of data)`)
    if (DIR === 'small') {
      // The common case the coalescing must not slow: --chunks small chunked POSTs, in sequence.
      await smallPosts(proxyPort, upPort, 500) // warm-up
      for (let round = 0; round < REPEAT; round++) {
        const cpu0 = cpuSeconds(lk.pid)
        const t0 = performance.now()
        const r = await smallPosts(proxyPort, upPort, CHUNKS)
        const wall = (performance.now() - t0) / 1000
        const cpu = cpuSeconds(lk.pid) - cpu0
        console.log(`small ${CHUNKS} chunked POSTs: sidecar CPU ${((cpu / CHUNKS) * 1e6).toFixed(0)} µs each, ${(CHUNKS / wall).toFixed(0)}/s, latency p50 ${r.p50.toFixed(2)} ms p99 ${r.p99.toFixed(2)} ms`)
      }
      return
    }
    for (let round = 0; round < REPEAT; round++) {
      for (const dir of DIR === 'both' ? ['up', 'down'] : [DIR]) {
        up.frames = up.reads = up.bytes = 0
        const rss0 = rssMB(lk.pid)
        let peak = rss0
        const sampler = setInterval(() => (peak = Math.max(peak, rssMB(lk.pid))), 20)
        const loop = getLoop(proxyPort, upPort)
        await new Promise((r) => setTimeout(r, 100))
        const cpu0 = cpuSeconds(lk.pid)
        const t0 = performance.now()
        T0 = t0
        const far = dir === 'up' ? await upload(proxyPort, upPort) : await download(proxyPort, upPort)
        const wall = (performance.now() - t0) / 1000
        const cpu = cpuSeconds(lk.pid) - cpu0
        await new Promise((r) => setTimeout(r, 100))
        const gets = await loop.stop()
        clearInterval(sampler)
        const rss1 = rssMB(lk.pid)
        const seen = dir === 'up' ? JSON.parse(far.body) : far
        console.log(
          `${dir.padEnd(4)} sidecar CPU ${cpu.toFixed(2)} s, wall ${wall.toFixed(2)} s | concurrent GET n=${gets.n} p50 ${gets.p50.toFixed(1)} ms max ${gets.max.toFixed(1)} ms | ` +
            `${dir === 'up' ? 'upstream' : 'client'} got ${seen.bytes} bytes in ${seen.frames} chunk frames over ${seen.reads} reads | RSS ${rss0.toFixed(0)} → peak ${peak.toFixed(0)} → ${rss1.toFixed(0)} MB`,
        )
      }
    }
  } finally {
    lk.kill('SIGTERM')
    await new Promise((r) => lk.once('exit', r))
    upstream.close()
    rmSync(work, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
