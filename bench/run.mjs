// npm run bench: the Latchkey sidecar side by side with direct calls, a bare undici forwarder,
// node http-proxy and nginx, in one run, on loopback. Medians over interleaved rounds.
// Not a test: it measures and reports. See bench/README.md for the layout and how to read it.
import { spawn, execFileSync } from 'node:child_process'
import { createServer } from 'node:http'
import { connect } from 'node:net'
import { freePort } from './ports.mjs'
import { mkdtempSync, writeFileSync, readFileSync, mkdirSync, existsSync, rmSync } from 'node:fs'
import { tmpdir, cpus, release } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Client } from 'undici'
import { renderChart } from './chart.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const QUICK = process.env.BENCH_QUICK === '1'
const SECONDS = Number(process.env.BENCH_SECONDS ?? (QUICK ? 2 : 10))
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? (QUICK ? 1 : 3))
const PACED_RATE = Number(process.env.BENCH_PACED_RATE ?? 1000)
// The paired throughput phase (phase 3): cycles of back-to-back 16-connection slices.
const PAIR_CYCLES = Number(process.env.BENCH_PAIR_CYCLES ?? (QUICK ? 2 : 10))
const PAIR_SECONDS = Number(process.env.BENCH_PAIR_SECONDS ?? (QUICK ? 1 : 3))
// BENCH_AUDIT=collector: the sidecar's audit goes to a collector (spool + gRPC, each event
// appended before its response ends) instead of JSON lines; results go to latest-collector.*.
const AUDIT_COLLECTOR = process.env.BENCH_AUDIT === 'collector'
const TOKEN = 'bench-' + 'x'.repeat(794) // an 800-byte bearer secret, as in BENCH-NOTES
// CPU layout on a 2-core machine (see README): the proxy under test alone on CPU 0; the load
// generator (wrk or the paced generator), the nginx upstream and this orchestrator on CPU 1.
// Latency at 1 connection is measured twice: in that split layout (the headline, every hop
// crosses cores) and with wrk, proxy and upstream all on CPU 0 ("same core").
const CPU_PROXY = '0'
const CPU_LOAD = '1'
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100

const work = mkdtempSync(join(tmpdir(), 'lk-bench-'))
const children = new Set()
let exiting = false

function cleanup() {
  exiting = true
  for (const c of children) {
    try {
      process.kill(-c.pid, 'SIGKILL') // each child leads its own process group (nginx workers included)
    } catch {
      try {
        c.kill('SIGKILL')
      } catch {
        // already gone
      }
    }
  }
  children.clear()
  try {
    rmSync(work, { recursive: true, force: true })
  } catch {
    // best effort: a temp dir left behind is harmless
  }
}
process.on('exit', cleanup)
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    console.error(`\nbench: ${sig}, stopping every child`)
    process.exit(130)
  })
}

const sh = (cmd) => {
  try {
    execFileSync('sh', ['-c', cmd], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

function ensureTools() {
  if (!sh('command -v taskset')) throw new Error('taskset (util-linux) is required')
  const need = []
  if (!sh('command -v wrk')) need.push('wrk')
  if (!sh('command -v nginx')) need.push('nginx')
  if (need.length === 0) return
  console.error(`bench: installing ${need.join(', ')} from Debian…`)
  const apt = (pkgs) => sh(`apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${pkgs}`)
  const pkgs = need.map((n) => (n === 'nginx' ? 'nginx-light' : n)).join(' ')
  if (!apt(pkgs) && !(need.includes('nginx') && apt(pkgs.replace('nginx-light', 'nginx')))) throw new Error(`could not install ${need.join(', ')} with apt-get`)
  for (const n of need) if (!sh(`command -v ${n}`)) throw new Error(`${n} still missing after apt-get`)
}

/** Starts a long-lived child pinned to `cpu`, in its own process group; it must not die. */
function start(name, cpu, cmd, args, env = {}) {
  const child = spawn('taskset', ['-c', cpu, cmd, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  child.label = name
  child.stderrText = ''
  child.stderr.on('data', (c) => (child.stderrText = (child.stderrText + c).slice(-20000)))
  child.stdout.on('data', () => {})
  children.add(child)
  child.on('exit', (code, signal) => {
    children.delete(child)
    if (exiting) return
    console.error(`bench: FAILED, ${name} exited (code ${code}, signal ${signal}) during the run. Its stderr:\n${child.stderrText}`)
    process.exit(1)
  })
  return child
}

async function waitForPort(port, child, seconds = 15) {
  const until = Date.now() + seconds * 1000
  while (Date.now() < until) {
    const ok = await new Promise((resolve) => {
      const s = connect(port, '127.0.0.1')
      s.once('connect', () => (s.destroy(), resolve(true)))
      s.once('error', () => resolve(false))
    })
    if (ok) return
    await sleep(100)
  }
  throw new Error(`${child.label} did not listen on 127.0.0.1:${port} within ${seconds}s. Its stderr:\n${child.stderrText}`)
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function nginxConf(dir, body) {
  mkdirSync(join(dir, 'logs'), { recursive: true })
  const conf = join(dir, 'nginx.conf')
  writeFileSync(
    conf,
    `worker_processes 1;
daemon off;
error_log ${dir}/logs/error.log warn;
pid ${dir}/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};
  keepalive_requests 10000000;
  ${body}
}
`,
  )
  return ['-e', join(dir, 'logs/error.log'), '-p', dir, '-c', conf]
}

// ---- process accounting from /proc -------------------------------------------------------------

/** The process and its descendants (nginx's worker is a child of its master). */
function tree(pid) {
  let kids = []
  try {
    kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {
    // the process ended between listing and reading: no children to count
  }
  return [pid, ...kids.flatMap(tree)]
}
/** utime + stime of the process tree, in seconds. */
function cpuSeconds(pid) {
  let ticks = 0
  for (const p of tree(pid)) {
    const f = readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')
    ticks += Number(f[11]) + Number(f[12]) // fields 14 and 15: utime, stime
  }
  return ticks / CLK_TCK
}
function rssMb(pid, field = 'VmRSS') {
  let kb = 0
  for (const p of tree(pid)) kb += Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0)
  return kb / 1024
}
function pin(pid, cpu) {
  for (const p of tree(pid)) execFileSync('taskset', ['-a', '-p', '-c', cpu, String(p)], { stdio: 'ignore' })
}
/** Busy share of each CPU over `ms`, from /proc/stat: how loaded the machine is without us. */
async function machineBusy(ms = 1000) {
  const read = () =>
    readFileSync('/proc/stat', 'utf8')
      .split('\n')
      .filter((l) => /^cpu\d/.test(l))
      .map((l) => {
        const v = l.split(/\s+/).slice(1).map(Number)
        const idle = v[3] + v[4]
        return { idle, total: v.reduce((a, b) => a + b, 0) }
      })
  const a = read()
  await sleep(ms)
  const b = read()
  return b.map((x, i) => 1 - (x.idle - a[i].idle) / Math.max(1, x.total - a[i].total))
}
/** Busy seconds per CPU so far (from /proc/stat): what ran there, whoever it was. */
function cpuBusySeconds() {
  return readFileSync('/proc/stat', 'utf8')
    .split('\n')
    .filter((l) => /^cpu\d/.test(l))
    .map((l) => {
      const v = l.split(/\s+/).slice(1).map(Number)
      return (v.reduce((a, b) => a + b, 0) - v[3] - v[4]) / CLK_TCK
    })
}
/** Share of a core on the proxy's CPU used by anything but the proxy over a run: noise. */
const foreignShare = (b0, b1, proxyCpu, wall) => Math.max(0, (b1[Number(CPU_PROXY)] - b0[Number(CPU_PROXY)] - (proxyCpu ?? 0)) / wall)
function topOthers() {
  try {
    return execFileSync('ps', ['-eo', 'pid,pcpu,comm', '--sort=-pcpu'], { encoding: 'utf8' }).split('\n').slice(1, 6).join('; ')
  } catch {
    return ''
  }
}

// ---- load generators ---------------------------------------------------------------------------

/** Runs a child to completion (tracked for cleanup), resolving with its stdout. */
function runToEnd(cmd, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    children.add(child)
    let out = ''
    let err = ''
    child.stdout.on('data', (c) => (out += c))
    child.stderr.on('data', (c) => (err += c))
    child.on('exit', (code) => {
      children.delete(child)
      if (code === 0) resolve(out)
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${err}${out}`))
    })
  })
}

async function wrk(name, args, script, cpu) {
  const out = await runToEnd('taskset', ['-c', cpu, 'wrk', ...(script ? ['-s', script] : []), ...args])
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1])
  const requests = Number(/(\d+) requests in/.exec(out)?.[1])
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1]
  const sockErr = /Socket errors: (.*)/.exec(out)?.[1]
  if (non2xx || sockErr || !requests) throw new Error(`${name}: wrk ${args.join(' ')} saw failures (non-2xx: ${non2xx ?? 0}; socket errors: ${sockErr ?? 'none'}):\n${out}`)
  const lat = (p) => {
    const m = new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s)\\b`, 'm').exec(out)
    return m ? Number(m[1]) * { us: 1, ms: 1000, s: 1e6 }[m[2]] : null
  }
  return { rps, requests, p50: lat(50), p99: lat(99) }
}

/** The paced generator; CPU of `pid` is read exactly over its measured window. */
function paced(name, proxyPort, path, pid, seconds) {
  return new Promise((resolve, reject) => {
    const child = spawn('taskset', ['-c', CPU_LOAD, process.execPath, join(here, 'paced.mjs'), `http://127.0.0.1:${proxyPort}`, path, String(PACED_RATE), String(seconds), '1'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    })
    children.add(child)
    let buf = ''
    let err = ''
    let cpu0 = null
    let cpuUsed = null
    let t0 = 0
    let windowS = null
    let busy0 = null
    let foreign = null
    child.stderr.on('data', (c) => (err += c))
    child.stdout.on('data', (c) => {
      buf += c
      let i
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i)
        buf = buf.slice(i + 1)
        if (line === 'START') {
          t0 = performance.now()
          busy0 = cpuBusySeconds()
          if (pid) cpu0 = cpuSeconds(pid)
        } else if (line === 'STOP') {
          windowS = (performance.now() - t0) / 1000
          if (pid) cpuUsed = cpuSeconds(pid) - cpu0
          foreign = foreignShare(busy0, cpuBusySeconds(), cpuUsed, windowS)
        } else if (line.startsWith('RESULT ')) {
          const r = JSON.parse(line.slice(7))
          if (r.errors || r.non2xx || r.lost) return reject(new Error(`${name}: paced run saw failures: ${line}`))
          resolve({ ...r, cores: pid ? cpuUsed / windowS : null, rss: pid ? rssMb(pid) : null, rssAnon: pid ? rssMb(pid, 'RssAnon') : null, foreignCpu0: foreign })
        }
      }
    })
    child.on('exit', (code) => {
      children.delete(child)
      if (code !== 0) reject(new Error(`${name}: paced generator exited ${code}:\n${err}`))
    })
  })
}

// ---- the verification upstream and check ------------------------------------------------------

/** The upstream's /verify is proxied here: it reports every Authorization header it was sent. */
/**
 * What the upstream received on /verify, kept here in the orchestrator: never echoed back, since
 * latchkey overwrites its credential in any response body it relays (forward/body-scrub.ts).
 */
function startEcho() {
  return new Promise((resolve) => {
    const echo = { srv: null, port: 0, seen: null }
    echo.srv = createServer((req, res) => {
      const auth = []
      for (let i = 0; i < req.rawHeaders.length; i += 2) if (req.rawHeaders[i].toLowerCase() === 'authorization') auth.push(req.rawHeaders[i + 1])
      echo.seen = { auth, proxyAuth: 'proxy-authorization' in req.headers }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"seen":true}')
    })
    echo.srv.listen(0, '127.0.0.1', () => resolve(Object.assign(echo, { port: echo.srv.address().port })))
  })
}

/** One request through the contender: 200 from the upstream, which saw the injected header exactly once. */
async function verify(c, upstreamPort, echo) {
  const client = new Client(`http://127.0.0.1:${c.port}`)
  try {
    const get = async (path) => {
      const r = await client.request({ path, method: 'GET' })
      return { status: r.statusCode, body: await r.body.text() }
    }
    const base = c.absolute ? `http://127.0.0.1:${upstreamPort}` : ''
    const plain = await get(`${base}/`)
    if (c.reference && plain.status === 200) return
    if (plain.status !== 200 || plain.body !== 'ok') throw new Error(`GET / answered ${plain.status} ${plain.body.slice(0, 300)}`)
    echo.seen = null
    const v = await get(`${base}/verify`)
    if (v.status !== 200) throw new Error(`GET /verify answered ${v.status} ${v.body.slice(0, 300)}`)
    if (c.reference) return // node-floor answers by itself: no upstream behind it
    const seen = echo.seen
    if (!seen) throw new Error('GET /verify did not reach the upstream')
    const want = c.name === 'direct' ? [] : [`Bearer ${TOKEN}`]
    if (JSON.stringify(seen.auth) !== JSON.stringify(want))
      throw new Error(`the upstream saw ${seen.auth.length} Authorization header(s) (${seen.auth.map((a) => a.slice(0, 20) + '…').join(', ')}), expected ${want.length === 0 ? 'none' : 'exactly the injected bearer, once'}`)
  } catch (err) {
    throw new Error(`${c.name} does not forward correctly, refusing to measure it: ${err.message}${c.proc ? `\n${c.name} stderr:\n${c.proc.stderrText}` : ''}`)
  } finally {
    await client.close()
  }
}

/** Latchkey only: its policy is really on (an unlisted port is refused) and audit events land. */
async function verifyLatchkeyPolicy(c, deniedPort, auditPath, count = () => auditLines(auditPath)) {
  const client = new Client(`http://127.0.0.1:${c.port}`)
  try {
    const r = await client.request({ path: `http://127.0.0.1:${deniedPort}/`, method: 'GET' })
    const body = await r.body.text()
    if (r.statusCode !== 403) throw new Error(`latchkey answered ${r.statusCode} for a port no rule allows (expected 403): ${body.slice(0, 300)}`)
  } finally {
    await client.close()
  }
  for (let i = 0; i < 50 && (await count()) === 0; i++) await sleep(100)
  if ((await count()) === 0) throw new Error(`latchkey wrote no audit event to ${AUDIT_COLLECTOR ? 'the collector' : auditPath}`)
}
function auditLines(path) {
  if (!existsSync(path)) return 0
  const buf = readFileSync(path)
  let n = 0
  for (const b of buf) if (b === 10) n++
  return n
}

const median = (xs) => {
  const v = xs.filter((x) => x !== null && x !== undefined && !Number.isNaN(x)).sort((a, b) => a - b)
  if (v.length === 0) return null
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2
}
const version = (cmd) => {
  try {
    return execFileSync('sh', ['-c', cmd], { encoding: 'utf8' }).trim().split('\n')[0]
  } catch {
    return 'unknown'
  }
}

// ---- main --------------------------------------------------------------------------------------

async function main() {
  ensureTools()
  const cli = join(root, 'dist/bin/latchkey.js')
  if (!existsSync(cli)) throw new Error(`${cli} is missing: the sidecar is not built (npm run bench runs the build first; did it fail?)`)
  pin(process.pid, CPU_LOAD) // this orchestrator stays off the proxy's CPU

  const before = await machineBusy(1000)
  const idleNote = `CPU busy before the bench (nothing of ours running): ${before.map((b, i) => `cpu${i} ${(b * 100).toFixed(0)}%`).join(', ')}`
  console.error(`bench: ${idleNote}`)
  if (before.some((b) => b > 0.1)) console.error(`bench: WARNING, the machine is not idle; figures will be noisy. Top processes: ${topOthers()}`)

  const ports = {}
  for (const k of ['upstream', 'denied', 'latchkey', 'latchkeyAdmin', 'undici', 'httpProxy', 'nginx', 'floor']) ports[k] = await freePort()
  const echo = await startEcho()

  // Upstream: nginx, 1 worker, answering a fixed 2-byte body; /verify goes on to the echo above.
  const upDir = join(work, 'upstream')
  const upstream = start(
    'upstream nginx',
    CPU_LOAD,
    'nginx',
    nginxConf(
      upDir,
      `server { listen 127.0.0.1:${ports.upstream};
        location = /verify { proxy_pass http://127.0.0.1:${echo.port}; }
        location / { return 200 "ok"; } }`,
    ),
  )
  await waitForPort(ports.upstream, upstream)

  const auditPath = join(work, 'audit.jsonl')
  const cfg = join(work, 'latchkey.yaml')
  let auditYaml = `audit:\n  jsonl: { path: ${auditPath} }`
  let countAudited = async () => auditLines(auditPath)
  const collectorEnv = {}
  if (AUDIT_COLLECTOR) {
    // The collector shares CPU ${CPU_LOAD} with the load generator and the upstream.
    const grpcPort = await freePort()
    const httpPort = await freePort()
    const token = 'bench-collector-' + process.pid
    const { createHash } = await import('node:crypto')
    writeFileSync(
      join(work, 'collector.yaml'),
      `version: 1\ncollector:\n  grpc: { host: 127.0.0.1, port: ${grpcPort} }\n  http: { host: 127.0.0.1, port: ${httpPort} }\n  store: { kind: sqlite, path: ${join(work, 'collector.db')} }\n  sidecars: [{ id: bench-sidecar, token_sha256: "${createHash('sha256').update(token).digest('hex')}" }]\nlog: { level: warn }\n`,
    )
    const collector = start('collector', CPU_LOAD, process.execPath, [cli, 'collector', '--config', join(work, 'collector.yaml')])
    await waitForPort(httpPort, collector)
    auditYaml = `audit:\n  collector: { address: "127.0.0.1:${grpcPort}", sidecar_id: bench-sidecar, token_secret: COLLECTOR, spool_dir: ${join(work, 'spool')} }`
    collectorEnv.LATCHKEY_SECRET_COLLECTOR = token
    countAudited = async () => {
      const c = new Client(`http://127.0.0.1:${httpPort}`)
      try {
        const r = await c.request({ path: '/v1/inventory', method: 'GET' })
        const inv = await r.body.json()
        return inv.sidecars.find((x) => x.sidecar === 'bench-sidecar')?.events ?? 0
      } finally {
        await c.close()
      }
    }
  }
  writeFileSync(
    cfg,
    `version: 1
sidecar:
  listen: { host: 127.0.0.1, port: ${ports.latchkey} }
  admin: { host: 127.0.0.1, port: ${ports.latchkeyAdmin} }
policy:
  default: deny
  rules:
    - { id: bench-upstream, action: allow, hosts: ["127.0.0.1"], ports: [${ports.upstream}] }
network:
  allow: [{ cidr: 127.0.0.1/32, ports: [${ports.upstream}] }]
credentials:
  - id: bench
    audience: http://127.0.0.1:${ports.upstream}
    source: static
    secret: BENCH_TOKEN
    inject: { type: bearer }
${auditYaml}
log: { level: warn }
`,
  )

  const contenders = [{ name: 'direct', absolute: false, port: ports.upstream, proc: null }]
  // The sidecar runs as the image runs it (Dockerfile: --no-maglev, NODE_OPTIONS, the malloc settings).
  const imageEnv = { NODE_OPTIONS: '--max-semi-space-size=4', MALLOC_ARENA_MAX: '2', MALLOC_MMAP_THRESHOLD_: '32768' }
  const lk = start('latchkey', CPU_PROXY, process.execPath, ['--no-maglev', cli, 'sidecar', '--config', cfg], { LATCHKEY_SECRET_BENCH_TOKEN: TOKEN, ...imageEnv, ...collectorEnv })
  contenders.push({ name: 'latchkey', absolute: true, port: ports.latchkey, proc: lk })
  contenders.push({ name: 'undici-bare', absolute: true, port: ports.undici, proc: start('undici-bare', CPU_PROXY, process.execPath, [join(here, 'baselines/undici-forwarder.mjs'), String(ports.undici)], { BENCH_TOKEN: TOKEN }) })
  contenders.push({ name: 'http-proxy', absolute: true, port: ports.httpProxy, proc: start('http-proxy', CPU_PROXY, process.execPath, [join(here, 'baselines/http-proxy-forwarder.mjs'), String(ports.httpProxy)], { BENCH_TOKEN: TOKEN }) })
  const ngDir = join(work, 'nginx-proxy')
  const ngArgs = nginxConf(
    ngDir,
    `upstream up { server 127.0.0.1:${ports.upstream}; keepalive 64; }
    server { listen 127.0.0.1:${ports.nginx};
      location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Authorization "Bearer ${TOKEN}"; } }`,
  )
  contenders.push({ name: 'nginx', absolute: false, port: ports.nginx, proc: start('nginx', CPU_PROXY, 'nginx', ngArgs) })
  // Reference, not a proxy: a node:http server answering by itself on the proxies' CPU, run as the
  // sidecar is (the same flags and malloc settings): what any Node process run so pays per
  // request, and holds in memory, here. BENCH_FLOOR=0 leaves it out.
  if (process.env.BENCH_FLOOR !== '0')
    contenders.push({ name: 'node-floor', reference: true, absolute: false, port: ports.floor, proc: start('node-floor', CPU_PROXY, process.execPath, ['--no-maglev', join(here, 'baselines/node-floor.mjs'), String(ports.floor)], imageEnv) })

  for (const c of contenders) if (c.proc) await waitForPort(c.port, c.proc)
  for (const c of contenders) await verify(c, ports.upstream, echo)
  await verifyLatchkeyPolicy(contenders[1], ports.denied, auditPath, countAudited)
  console.error('bench: every contender forwards, with the bearer injected exactly once; latchkey refuses an unlisted port and audits')

  // wrk sends absolute-form when wrk.path is an absolute URL: that is how it drives a forward proxy.
  const absScript = join(work, 'absolute.lua')
  writeFileSync(absScript, `wrk.path = "http://127.0.0.1:${ports.upstream}/"\n`)
  const scriptFor = (c) => (c.absolute ? absScript : null)
  const pathFor = (c) => (c.absolute ? `http://127.0.0.1:${ports.upstream}/` : '/')
  const urlFor = (c) => `http://127.0.0.1:${c.port}/`
  const lkRequests = { count: 2 } // the two verify requests

  const samples = Object.fromEntries(contenders.map((c) => [c.name, []]))
  const pacedSamples = Object.fromEntries(contenders.map((c) => [c.name, []]))
  const pacedFresh = {}
  const busy = []
  const total = ROUNDS * contenders.length * SECONDS * 4 + contenders.length * SECONDS + PAIR_CYCLES * 3 * PAIR_SECONDS
  console.error(`bench: ${ROUNDS} round(s) × ${contenders.length} contenders × 4 runs of ${SECONDS}s, then ${PAIR_CYCLES} paired cycles × 3 proxies × ${PAIR_SECONDS}s (~${Math.ceil(total / 60)} min); proxy on CPU ${CPU_PROXY}, load generator + upstream on CPU ${CPU_LOAD}`)

  // Phase 1, an agent's steady pattern: a fixed ${PACED_RATE} req/s, open-loop, on processes that
  // have seen nothing heavier, so CPU share and RSS are what the proxy costs at that rate. Round 0
  // is each fresh process's first run: V8 compiles the code the calls run meanwhile, on the same
  // core, and a process that runs more code pays more of it (the sidecar: over twice its steady
  // CPU, and a p99 of 30-120 ms). It is reported on its own; the steady figures are the rounds after.
  for (let round = 0; round <= ROUNDS; round++) {
    for (const c of contenders) {
      await verify(c, ports.upstream, echo)
      if (c.name === 'latchkey') lkRequests.count += 2
      const p = await paced(c.name, c.port, pathFor(c), c.proc?.pid, SECONDS)
      if (c.name === 'latchkey') lkRequests.count += p.completed + Math.round(PACED_RATE) // + the warm-up second
      if (round === 0) pacedFresh[c.name] = p
      else pacedSamples[c.name].push(p)
      console.error(`${round === 0 ? 'fresh process' : `round ${round}`} paced ${c.name}: ${p.achievedRate.toFixed(0)} req/s, ${c.proc ? `${p.cores.toFixed(3)} core, ${p.rss.toFixed(1)} MB, ` : ''}p50 ${p.p50.toFixed(0)} µs`)
    }
  }

  // Phase 2: throughput at 16 connections, then latency at 1 connection (split and same-core).
  for (const c of contenders) {
    const w = await wrk(c.name, ['-t2', '-c16', '-d2s', urlFor(c)], scriptFor(c), CPU_LOAD) // warm-up
    if (c.name === 'latchkey') lkRequests.count += w.requests
  }
  for (let round = 1; round <= ROUNDS; round++) {
    busy.push(await machineBusy(500))
    for (const c of contenders) {
      await verify(c, ports.upstream, echo)
      const pid = c.proc?.pid
      const cpu0 = pid ? cpuSeconds(pid) : 0
      const busy0 = cpuBusySeconds()
      const t0 = performance.now()
      const t16 = await wrk(c.name, ['-t2', '-c16', `-d${SECONDS}s`, urlFor(c)], scriptFor(c), CPU_LOAD)
      const wall = (performance.now() - t0) / 1000
      const cpuUsed = pid ? cpuSeconds(pid) - cpu0 : null
      const foreignCpu0 = foreignShare(busy0, cpuBusySeconds(), cpuUsed, wall)
      const rssLoaded = pid ? rssMb(pid) : null
      const t1 = await wrk(c.name, ['-t1', '-c1', `-d${SECONDS}s`, '--latency', urlFor(c)], scriptFor(c), CPU_LOAD)
      pin(upstream.pid, CPU_PROXY)
      let t1same
      try {
        t1same = await wrk(c.name, ['-t1', '-c1', `-d${SECONDS}s`, '--latency', urlFor(c)], scriptFor(c), CPU_PROXY)
      } finally {
        pin(upstream.pid, CPU_LOAD)
      }
      if (c.name === 'latchkey') lkRequests.count += 2 + t16.requests + t1.requests + t1same.requests
      samples[c.name].push({
        rps16: t16.rps,
        proxyCores16: pid ? cpuUsed / wall : null,
        cpuUsPerReq: pid ? (cpuUsed * 1e6) / t16.requests : null,
        rssLoaded,
        p50: t1.p50,
        p99: t1.p99,
        p50same: t1same.p50,
        p99same: t1same.p99,
        foreignCpu0,
      })
      console.error(`round ${round} ${c.name}: ${Math.round(t16.rps)} req/s @16 conn; p50/p99 @1 conn ${t1.p50}/${t1.p99} µs split, ${t1same.p50}/${t1same.p99} µs same core`)
    }
  }
  // Phase 3: the two throughput ratios, paired. Rounds put ~40 s between two contenders' 16-
  // connection runs, and this host's speed drifts on that scale (one process's CPU µs/req moves
  // 2× between rounds), so a ratio of round medians mixes the proxies with the machine. Here the
  // three Node proxies run back to back in short slices, in ABC then CBA order so a drift favours
  // no one, and each cycle gives one ratio from runs seconds apart.
  const trio = ['latchkey', 'undici-bare', 'http-proxy'].map((n) => contenders.find((c) => c.name === n))
  const cycles = []
  for (let cycle = 0; cycle < PAIR_CYCLES; cycle++) {
    const got = {}
    for (const c of cycle % 2 ? [...trio].reverse() : trio) {
      const cpu0 = cpuSeconds(c.proc.pid)
      const w = await wrk(c.name, ['-t2', '-c16', `-d${PAIR_SECONDS}s`, urlFor(c)], scriptFor(c), CPU_LOAD)
      got[c.name] = { rps: w.rps, cpuUsPerReq: ((cpuSeconds(c.proc.pid) - cpu0) * 1e6) / w.requests }
      if (c.name === 'latchkey') lkRequests.count += w.requests
    }
    cycles.push(got)
    console.error(`cycle ${cycle + 1} paired @16 conn: ${trio.map((c) => `${c.name} ${Math.round(got[c.name].rps)} req/s (${got[c.name].cpuUsPerReq.toFixed(1)} µs/req)`).join(', ')}`)
  }

  const after = await machineBusy(1000)
  await sleep(AUDIT_COLLECTOR ? 3000 : 500) // let the sidecar's audit batch land (at the collector: acked)
  const audited = await countAudited()

  // ---- report ----
  const results = contenders.map((c) => {
    const s = samples[c.name]
    const ps = pacedSamples[c.name]
    const m = (k) => median(s.map((x) => x[k]))
    const pm = (k) => median(ps.map((x) => x[k]))
    return {
      name: c.name,
      rps16: m('rps16'),
      proxyCores16: m('proxyCores16'),
      cpuUsPerReq: m('cpuUsPerReq'),
      rssLoaded: m('rssLoaded'),
      p50: m('p50'),
      p99: m('p99'),
      p50same: m('p50same'),
      p99same: m('p99same'),
      pacedRate: pm('achievedRate'),
      pacedCores: pm('cores'),
      pacedRss: pm('rss'),
      pacedRssAnon: pm('rssAnon'),
      pacedP50: pm('p50'),
      pacedP99: pm('p99'),
      freshCores: pacedFresh[c.name]?.cores ?? null,
      freshP99: pacedFresh[c.name]?.p99 ?? null,
    }
  })
  const get = (n) => results.find((r) => r.name === n)
  const direct = get('direct')
  for (const r of results) {
    r.addedP50 = r.p50 - direct.p50
    r.addedP50same = r.p50same - direct.p50same
    r.pacedAddedP50 = r.pacedP50 - direct.pacedP50
  }
  const L = get('latchkey')
  // Each target is judged on medians; the spread across rounds is shown beside it, because on a
  // noisy host a median near the line can land either side of it in the next run.
  const spread = (values, digits, unit = '') => {
    if (values.length < 2) return ''
    const sorted = [...values].sort((a, b) => a - b)
    return ` (rounds: ${sorted[0].toFixed(digits)}–${sorted.at(-1).toFixed(digits)}${unit})`
  }
  const perRound = (k, other) => samples.latchkey.map((x, i) => x[k] / samples[other][i][k])
  const perCycle = (other) => cycles.map((c) => c.latchkey.rps / c[other].rps)
  const ratioTarget = (other, line) => {
    const paired = median(perCycle(other))
    return {
      target: `req/s at 16 connections ≥ ${line}× ${other} (paired slices)`,
      measured: `${paired.toFixed(2)}×${spread(perCycle(other), 2, '×').replace('rounds', `${cycles.length} cycles`)}; medians of the rounds: ${(L.rps16 / get(other).rps16).toFixed(2)}×${spread(perRound('rps16', other), 2, '×')}`,
      met: paired >= line,
    }
  }
  const directP50 = samples.direct.map((x) => x.p50)
  const targets = [
    { target: 'added p50 at 1 connection ≤ 100 µs (split layout)', measured: `${L.addedP50.toFixed(0)} µs${spread(samples.latchkey.map((x, i) => x.p50 - directP50[i]), 0, ' µs')} (same core: ${L.addedP50same.toFixed(0)} µs)`, met: L.addedP50 <= 100 },
    ratioTarget('http-proxy', 1.5),
    ratioTarget('undici-bare', 0.85),
    { target: `CPU at a steady ${PACED_RATE} req/s ≤ 0.05 core`, measured: `${L.pacedCores.toFixed(3)} core at ${L.pacedRate.toFixed(0)} req/s${spread(pacedSamples.latchkey.map((x) => x.cores), 3, ' core')}; a fresh process's first ${SECONDS} s: ${L.freshCores?.toFixed(3) ?? '–'} core`, met: L.pacedCores <= 0.05 },
    { target: `RSS at a steady ${PACED_RATE} req/s ≤ 80 MB`, measured: `${L.pacedRss.toFixed(1)} MB${spread(pacedSamples.latchkey.map((x) => x.rss), 1, ' MB')}`, met: L.pacedRss <= 80 },
  ]
  const f = (v, d = 0) => (v === null || v === undefined || Number.isNaN(v) ? '–' : Number(v).toLocaleString('en', { minimumFractionDigits: d, maximumFractionDigits: d }))
  const sign = (v) => (v === null || Number.isNaN(v) ? '–' : `${v >= 0 ? '+' : ''}${f(v)}`)
  const env = {
    node: process.version,
    kernel: release(),
    cpu: `${cpus().length} × ${cpus()[0]?.model ?? '?'}`,
    wrk: version('wrk -v 2>&1 | head -1').split(' ').slice(0, 2).join(' '),
    nginx: version('nginx -v 2>&1'),
    undici: JSON.parse(readFileSync(join(root, 'node_modules/undici/package.json'), 'utf8')).version,
    httpProxy: JSON.parse(readFileSync(join(root, 'node_modules/http-proxy/package.json'), 'utf8')).version,
  }
  const layout = `proxy under test alone on CPU ${CPU_PROXY}; load generator (wrk / paced generator), nginx upstream and the orchestrator on CPU ${CPU_LOAD}. "same core": wrk, proxy and upstream all on CPU ${CPU_PROXY} (1-connection latency only)`
  const foreignAll = [...Object.values(samples).flat(), ...Object.values(pacedSamples).flat()].map((x) => x.foreignCpu0).filter((x) => x !== null && x !== undefined)
  const foreignMax = Math.max(0, ...foreignAll)
  const noise = `CPU ${CPU_PROXY} time not spent by the proxy under test during the measured runs (softirq not charged to it, or other processes): median ${(median(foreignAll) * 100).toFixed(1)}%, max ${(foreignMax * 100).toFixed(1)}% of a core${foreignMax > 0.15 ? ' (**something else ran on the proxy CPU: treat this run as noisy**)' : ''}. ${idleNote}; at each round start: ${busy.map((b) => b.map((x) => `${(x * 100).toFixed(0)}%`).join('/')).join(', ')}; after: ${after.map((b) => `${(b * 100).toFixed(0)}%`).join('/')}`
  if (foreignMax > 0.15) console.error(`bench: WARNING, up to ${(foreignMax * 100).toFixed(0)}% of CPU ${CPU_PROXY} went to something other than the proxy during a run; see results for which`)
  const md = [
    `# Latchkey sidecar benchmark`,
    ``,
    `${new Date().toISOString()} · node ${env.node} · ${env.nginx} · ${env.wrk} · undici ${env.undici} · http-proxy ${env.httpProxy} · ${env.cpu}`,
    ``,
    `${ROUNDS} round(s), ${SECONDS} s per run, contenders interleaved within each round; medians. Upstream: nginx, 1 worker, \`return 200 "ok"\`. Every proxy injects an 800-byte bearer (\`Authorization: Bearer <800 chars>\`), checked at the upstream before every measurement.`,
    ``,
    `CPU layout: ${layout}.`,
    ``,
    `## Throughput and latency`,
    ``,
    `| contender | req/s @16 conn | proxy cores @16 | proxy CPU µs/req | RSS after load (MB) | p50 @1 conn (µs) | added p50 | p99 @1 conn | p50 same core | added p50 same core | p99 same core |`,
    `|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|`,
    ...results.map(
      (r) =>
        `| ${r.name} | ${f(r.rps16)} | ${f(r.proxyCores16, 2)} | ${f(r.cpuUsPerReq, 1)} | ${f(r.rssLoaded, 1)} | ${f(r.p50)} | ${r.name === 'direct' ? '–' : sign(r.addedP50)} | ${f(r.p99)} | ${f(r.p50same)} | ${r.name === 'direct' ? '–' : sign(r.addedP50same)} | ${f(r.p99same)} |`,
    ),
    ``,
    `## At a steady ${PACED_RATE} req/s (open-loop paced generator, processes that have seen nothing heavier)`,
    ``,
    `Medians of the ${ROUNDS} round(s) after each process's first ${SECONDS} s at this rate; that first run, while V8 compiles the code the calls run, is in the last two columns.`,
    ``,
    `| contender | achieved req/s | proxy cores | proxy RSS (MB) | of it anonymous (MB) | p50 (µs, client-side) | added p50 | p99 (µs) | first run: cores | first run: p99 (µs) |`,
    `|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|`,
    ...results.map((r) => `| ${r.name} | ${f(r.pacedRate)} | ${f(r.pacedCores, 3)} | ${f(r.pacedRss, 1)} | ${f(r.pacedRssAnon, 1)} | ${f(r.pacedP50)} | ${r.name === 'direct' ? '–' : sign(r.pacedAddedP50)} | ${f(r.pacedP99)} | ${f(r.freshCores, 3)} | ${f(r.freshP99)} |`),
    ``,
    `## Throughput ratios, paired (${cycles.length} cycles of ${PAIR_SECONDS} s slices, back to back, ABC then CBA)`,
    ``,
    `| cycle | ${trio.map((c) => `${c.name} req/s (µs/req)`).join(' | ')} | ×undici-bare | ×http-proxy |`,
    `|---:|${trio.map(() => '---:').join('|')}|---:|---:|`,
    ...cycles.map((c, i) => `| ${i + 1} | ${trio.map((t) => `${f(c[t.name].rps)} (${f(c[t.name].cpuUsPerReq, 1)})`).join(' | ')} | ${(c.latchkey.rps / c['undici-bare'].rps).toFixed(2)} | ${(c.latchkey.rps / c['http-proxy'].rps).toFixed(2)} |`),
    `| median | ${trio.map((t) => `${f(median(cycles.map((c) => c[t.name].rps)))} (${f(median(cycles.map((c) => c[t.name].cpuUsPerReq)), 1)})`).join(' | ')} | ${median(perCycle('undici-bare')).toFixed(2)} | ${median(perCycle('http-proxy')).toFixed(2)} |`,
    ``,
    ...(get('node-floor') ? [`node-floor is not a proxy: a node:http server answering by itself on the proxies' CPU, run with the sidecar's flags and malloc settings, i.e. what any Node process run so pays per request and holds here (its "added" figures are relative to direct).`, ``] : []),
    `## Targets (latchkey)`,
    ``,
    `| target | measured | met |`,
    `|---|---:|:---:|`,
    ...targets.map((t) => `| ${t.target} | ${t.measured} | ${t.met ? 'yes' : '**NO**'} |`),
    ``,
    `Audit${AUDIT_COLLECTOR ? ' (to the collector: spool + gRPC, acked)' : ' (JSON lines)'}: ${audited.toLocaleString('en')} events written for ≈${lkRequests.count.toLocaleString('en')} requests latchkey answered${audited < lkRequests.count * 0.99 ? ' (**fewer events than requests**)' : ''}.`,
    ``,
    `Machine noise: ${noise}.`,
    ``,
  ].join('\n')

  const outDir = join(here, 'results')
  mkdirSync(outDir, { recursive: true })
  const stamp = new Date().toISOString().replace(/[:.]/g, '-')
  const json = JSON.stringify(
    { at: new Date().toISOString(), quick: QUICK, seconds: SECONDS, rounds: ROUNDS, pacedRate: PACED_RATE, env, layout, noise, results, targets, audit: { events: audited, requests: lkRequests.count }, samples, pacedFresh, pacedSamples, pairedCycles: cycles },
    null,
    2,
  )
  const svg = renderChart(results, `${stamp} · ${ROUNDS}×${SECONDS}s · proxy on CPU ${CPU_PROXY}, load + upstream on CPU ${CPU_LOAD}`)
  for (const name of AUDIT_COLLECTOR ? [`${stamp}-collector`, 'latest-collector'] : [stamp, 'latest']) {
    writeFileSync(join(outDir, `${name}.json`), json)
    writeFileSync(join(outDir, `${name}.md`), md)
    writeFileSync(join(outDir, `${name}.svg`), svg)
  }
  console.log(md)
  console.log(targets.map((t) => `target ${t.met ? 'MET    ' : 'NOT MET'}  ${t.target}: ${t.measured}`).join('\n'))
  const suffix = AUDIT_COLLECTOR ? '-collector' : ''
  console.log(`\nresults: bench/results/${stamp}${suffix}.{md,json,svg} and bench/results/latest${suffix}.{md,json,svg}`)
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`bench: FAILED: ${err?.stack ?? err}`)
    process.exit(1)
  },
)
