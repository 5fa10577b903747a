// npm run bench: the Latchkey sidecar side by side with direct calls, a bare undici forwarder,
// node http-proxy and nginx, in one run, on loopback. Medians over interleaved rounds.
// Not a test: it measures and reports. See bench/README.md for the layout and how to read it.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, readFileSync, mkdirSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { renderChart } from './chart.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const QUICK = process.env.BENCH_QUICK === '1'
const SECONDS = Number(process.env.BENCH_SECONDS ?? (QUICK ? 2 : 5))
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? (QUICK ? 1 : 3))
const PACED_RATE = 1000
const TOKEN = 'bench-' + 'x'.repeat(794) // an 800-byte bearer, as in BENCH-NOTES
// CPU layout on a 2-core machine: every proxy on CPU 0; the load generator and the upstream on
// CPU 1 for throughput and the steady rate. Latency at 1 connection is measured with all three
// on CPU 0: with nothing to overlap, a cross-core hop only adds wake-up time (BENCH-NOTES).
const CPU_PROXY = '0'
const CPU_LOAD = '1'
const CLK_TCK = 100

const work = mkdtempSync(join(tmpdir(), 'lk-bench-'))
const children = []
const cleanup = () => {
  for (const c of children) {
    try {
      process.kill(-c.pid, 'SIGKILL')
    } catch {
      try {
        c.kill('SIGKILL')
      } catch {
        // already gone
      }
    }
  }
}
process.on('exit', cleanup)
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130))

function ensureTools() {
  const missing = ['wrk', 'nginx', 'taskset'].filter((t) => {
    try {
      execFileSync('sh', ['-c', `command -v ${t}`], { stdio: 'ignore' })
      return false
    } catch {
      return true
    }
  })
  if (missing.includes('wrk') || missing.includes('nginx')) {
    console.error(`installing ${missing.join(', ')} from Debian…`)
    execFileSync('sh', ['-c', 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light'], { stdio: 'inherit' })
  }
}

function start(name, cmd, args, env = {}) {
  const child = spawn('taskset', ['-c', name === 'upstream' ? CPU_LOAD : CPU_PROXY, cmd, ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  })
  let stderr = ''
  child.stderr.on('data', (c) => (stderr += c))
  child.stdout.on('data', () => {})
  children.push(child)
  child.on('exit', (code) => {
    if (code !== 0 && code !== null && !exiting) {
      console.error(`${name} exited ${code}:\n${stderr}`)
      process.exit(1)
    }
  })
  return child
}
let exiting = false

async function waitFor(url, headers = {}) {
  for (let i = 0; i < 100; i++) {
    try {
      const r = await request(url, { headers })
      await r.body.text()
      return
    } catch {
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  throw new Error(`nothing answered at ${url}`)
}

function nginxConf(dir, body) {
  mkdirSync(join(dir, 'logs'), { recursive: true })
  const conf = join(dir, 'nginx.conf')
  writeFileSync(
    conf,
    `worker_processes 1;
daemon off;
error_log ${dir}/logs/error.log warn;
pid ${dir}/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};
  keepalive_requests 1000000;
  ${body}
}
`,
  )
  return conf
}

/** The bench's own check that a proxy forwards and injects: the upstream says whether it saw the token. */
async function verify(name, proxyPort, absolute, upstreamPort) {
  const { Client } = await import('undici')
  const client = new Client(`http://127.0.0.1:${proxyPort}`)
  const path = absolute ? `http://127.0.0.1:${upstreamPort}/verify` : '/verify'
  const r = await client.request({ path, method: 'GET' })
  const body = await r.body.text()
  await client.close()
  if (r.statusCode !== 200 || body !== 'token-ok') throw new Error(`${name} did not forward with the injected token: ${r.statusCode} ${body.slice(0, 200)}`)
}

function pin(pid, cpu) {
  for (const p of tree(pid)) execFileSync('taskset', ['-a', '-p', '-c', cpu, String(p)], { stdio: 'ignore' })
}

function wrk(args, script, cpu = CPU_LOAD) {
  const out = execFileSync('taskset', ['-c', cpu, 'wrk', ...(script ? ['-s', script] : []), ...args], { encoding: 'utf8' })
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1])
  const requests = Number(/(\d+) requests in/.exec(out)?.[1])
  const errors = /Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? /Socket errors: (.*)/.exec(out)?.[1]
  const lat = (p) => {
    const m = new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s)`, 'm').exec(out)
    if (!m) return null
    return Number(m[1]) * { us: 1, ms: 1000, s: 1e6 }[m[2]]
  }
  return { rps, requests, errors: errors ?? null, p50: lat(50), p99: lat(99) }
}

/** The process and its children (nginx's worker is a child of its master). */
function tree(pid) {
  let kids = []
  try {
    kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {
    // the process ended between listing and reading: no children to count
  }
  return [pid, ...kids.flatMap(tree)]
}
function cpuTicks(pid) {
  let sum = 0
  for (const p of tree(pid)) {
    const f = readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')
    sum += Number(f[11]) + Number(f[12])
  }
  return sum
}
function rssMb(pid) {
  let kb = 0
  for (const p of tree(pid)) kb += Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0)
  return kb / 1024
}

const median = (xs) => {
  const v = xs.filter((x) => x !== null && !Number.isNaN(x)).sort((a, b) => a - b)
  if (v.length === 0) return null
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2
}

async function main() {
  ensureTools()
  if (!existsSync(join(root, 'dist/cli/latchkey.js'))) throw new Error('run `npm run build` first (npm run bench does)')
  const ports = { upstream: 18080, latchkey: 18001, latchkeyAdmin: 18002, undici: 18003, httpProxy: 18004, nginx: 18005, nodeFloor: 18006 }

  // Upstream: nginx returning a small body; /verify answers whether the injected token arrived.
  const upDir = join(work, 'upstream')
  const upstream = start('upstream', 'nginx', [
    '-p',
    upDir,
    '-c',
    nginxConf(
      upDir,
      `server { listen 127.0.0.1:${ports.upstream}; 
        location = /verify { if ($http_authorization = "Bearer ${TOKEN}") { return 200 "token-ok"; } return 200 "token-missing"; }
        location / { return 200 "ok"; } }`,
    ),
  ])
  await waitFor(`http://127.0.0.1:${ports.upstream}/`)

  const cfg = join(work, 'latchkey.yaml')
  writeFileSync(
    cfg,
    `version: 1
sidecar: { listen: { host: 127.0.0.1, port: ${ports.latchkey} }, admin: { host: 127.0.0.1, port: ${ports.latchkeyAdmin} } }
policy:
  default: deny
  rules:
    - { id: no-admin, action: deny, hosts: ["127.0.0.1"], paths: ["/admin/**"] }
    - { id: bench-upstream, action: allow, hosts: ["127.0.0.1"], ports: [${ports.upstream}], methods: [GET, POST] }
network: { allow: [ { cidr: 127.0.0.1/32, ports: [${ports.upstream}] } ] }
credentials:
  - { id: bench, audience: "http://127.0.0.1:${ports.upstream}", source: static, secret: BENCH_TOKEN, inject: { type: bearer } }
audit: { jsonl: { path: ${join(work, 'audit.jsonl')} } }
log: { level: warn }
`,
  )
  const contenders = [
    { name: 'direct', absolute: false, port: ports.upstream, proc: null },
    { name: 'latchkey', absolute: true, port: ports.latchkey, proc: start('latchkey', process.execPath, [join(root, 'dist/cli/latchkey.js'), 'sidecar', '--config', cfg], { LATCHKEY_SECRET_BENCH_TOKEN: TOKEN }) },
    { name: 'undici-bare', absolute: true, port: ports.undici, proc: start('undici-bare', process.execPath, [join(here, 'baselines/undici-forwarder.mjs'), String(ports.undici)], { BENCH_TOKEN: TOKEN }) },
    { name: 'http-proxy', absolute: true, port: ports.httpProxy, proc: start('http-proxy', process.execPath, [join(here, 'baselines/http-proxy-forwarder.mjs'), String(ports.httpProxy)], { BENCH_TOKEN: TOKEN }) },
  ]
  // Not a proxy: Node answering by itself, the floor every Node contender stands on.
  contenders.push({ name: 'node-floor', absolute: false, reference: true, port: ports.nodeFloor, proc: start('node-floor', process.execPath, [join(here, 'baselines/node-floor.mjs'), String(ports.nodeFloor)]) })
  const ngDir = join(work, 'nginx-proxy')
  contenders.push({
    name: 'nginx',
    absolute: false,
    port: ports.nginx,
    proc: start('nginx', 'nginx', [
      '-p',
      ngDir,
      '-c',
      nginxConf(
        ngDir,
        `upstream up { server 127.0.0.1:${ports.upstream}; keepalive 64; }
        server { listen 127.0.0.1:${ports.nginx};
          location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Authorization "Bearer ${TOKEN}"; } }`,
      ),
    ]),
  })
  for (const c of contenders.slice(1)) {
    await waitFor(`http://127.0.0.1:${c.port}/`).catch(() => {})
    if (!c.reference) await verify(c.name, c.port, c.absolute, ports.upstream)
  }

  // wrk scripts: absolute-form through forward proxies; a paced one for the steady-rate run.
  const absScript = join(work, 'absolute.lua')
  writeFileSync(absScript, `wrk.path = "http://127.0.0.1:${ports.upstream}/"\n`)
  const pacedConnections = 10
  const pacedDelayMs = Math.round((pacedConnections * 1000) / PACED_RATE)
  const pacedAbs = join(work, 'paced-absolute.lua')
  writeFileSync(pacedAbs, `wrk.path = "http://127.0.0.1:${ports.upstream}/"\nfunction delay() return ${pacedDelayMs} end\n`)
  const pacedOrigin = join(work, 'paced.lua')
  writeFileSync(pacedOrigin, `function delay() return ${pacedDelayMs} end\n`)

  const samples = Object.fromEntries(contenders.map((c) => [c.name, []]))
  const d = `${SECONDS}s`
  console.error(`bench: ${ROUNDS} round(s) of ${SECONDS}s runs; proxies on CPU ${CPU_PROXY}, wrk and upstream on CPU ${CPU_LOAD}`)
  // Phase 1, the agent's real pattern: a steady ~${PACED_RATE} req/s on processes that have seen
  // nothing heavier, so their CPU share and RSS are what a sidecar costs at that rate.
  const paced = Object.fromEntries(contenders.map((c) => [c.name, []]))
  for (const c of contenders) {
    if (c.proc) wrk(['-t1', `-c${pacedConnections}`, '-d2s', `http://127.0.0.1:${c.port}/`], c.absolute ? pacedAbs : pacedOrigin) // warm up
  }
  for (let round = 1; round <= ROUNDS; round++) {
    for (const c of contenders) {
      if (!c.proc) continue
      const url = `http://127.0.0.1:${c.port}/`
      const c0 = cpuTicks(c.proc.pid)
      const p = wrk(['-t1', `-c${pacedConnections}`, '-d' + d, url], c.absolute ? pacedAbs : pacedOrigin)
      const c1 = cpuTicks(c.proc.pid)
      if (p.errors) throw new Error(`${c.name}: errors during the paced run (${p.errors})`)
      paced[c.name].push({ pacedRate: p.rps, pacedCores: (c1 - c0) / CLK_TCK / SECONDS, pacedRss: rssMb(c.proc.pid) })
    }
  }
  // Phase 2: throughput at 16 connections and latency at 1, interleaved per round.
  for (const c of contenders) wrk(['-t1', '-c4', '-d1s', `http://127.0.0.1:${c.port}/`], c.absolute ? absScript : null) // warm up
  for (let round = 1; round <= ROUNDS; round++) {
    for (const c of contenders) {
      const url = `http://127.0.0.1:${c.port}/`
      const script = c.absolute ? absScript : null
      const pid = c.proc?.pid
      const cpu0 = pid ? cpuTicks(pid) : 0
      const t16 = wrk(['-t2', '-c16', '-d' + d, url], script)
      const cpu1 = pid ? cpuTicks(pid) : 0
      const rssLoaded = pid ? rssMb(pid) : null
      pin(upstream.pid, CPU_PROXY)
      const t1 = wrk(['-t1', '-c1', '-d' + d, '--latency', url], script, CPU_PROXY)
      pin(upstream.pid, CPU_LOAD)
      if (t16.errors || t1.errors) throw new Error(`${c.name}: errors during the run (${t16.errors ?? t1.errors})`)
      samples[c.name].push({
        rps16: t16.rps,
        p50: t1.p50,
        p99: t1.p99,
        cpuUsPerReq: pid ? (((cpu1 - cpu0) / CLK_TCK) * 1e6) / t16.requests : null,
        rssLoaded,
        ...(paced[c.name][round - 1] ?? {}),
      })
      console.error(`round ${round} ${c.name}: ${Math.round(t16.rps)} req/s @16, p50 ${t1.p50}µs p99 ${t1.p99}µs`)
    }
  }

  const results = contenders.map((c) => {
    const s = samples[c.name]
    const m = (k) => median(s.map((x) => x[k]))
    return { name: c.name, rps16: m('rps16'), p50: m('p50'), p99: m('p99'), cpuUsPerReq: m('cpuUsPerReq'), rssLoaded: m('rssLoaded'), pacedRate: m('pacedRate'), pacedCores: m('pacedCores'), pacedRss: m('pacedRss') }
  })
  const direct = results.find((r) => r.name === 'direct')
  for (const r of results) r.addedP50 = r.name === 'direct' || r.name === 'node-floor' ? null : r.p50 - direct.p50
  const get = (n) => results.find((r) => r.name === n)
  const lk = get('latchkey')
  const targets = [
    ['added p50 at 1 connection ≤ 100 µs', `${lk.addedP50.toFixed(0)} µs`, lk.addedP50 <= 100],
    ['req/s at 16 connections ≥ 1.5× http-proxy', `${(lk.rps16 / get('http-proxy').rps16).toFixed(2)}×`, lk.rps16 >= 1.5 * get('http-proxy').rps16],
    ['req/s at 16 connections within 15% of undici-bare', `${(lk.rps16 / get('undici-bare').rps16).toFixed(2)}×`, lk.rps16 >= 0.85 * get('undici-bare').rps16],
    [`CPU at a steady ${PACED_RATE} req/s ≤ 0.05 core`, `${lk.pacedCores?.toFixed(3)} core at ${Math.round(lk.pacedRate)} req/s`, lk.pacedCores <= 0.05],
    [`RSS at a steady ${PACED_RATE} req/s ≤ 80 MB`, `${lk.pacedRss?.toFixed(1)} MB`, lk.pacedRss <= 80],
  ]
  const fmt = (v, digits = 0) => (v === null || v === undefined ? '–' : Number(v).toFixed(digits))
  const md = [
    `# Latchkey sidecar benchmark`,
    ``,
    `${new Date().toISOString()} · node ${process.version} · ${ROUNDS} round(s) × ${SECONDS}s per run, medians · throughput and steady rate: proxies on CPU ${CPU_PROXY}, wrk and the nginx upstream on CPU ${CPU_LOAD}; latency at 1 connection: all on CPU ${CPU_PROXY} · 800-byte bearer injected`,
    ``,
    `| contender | req/s @16 conn | p50 @1 conn (µs) | added p50 (µs) | p99 @1 conn (µs) | CPU µs/req | RSS loaded (MB) | at ~${PACED_RATE} req/s: cores | RSS (MB) |`,
    `|---|---:|---:|---:|---:|---:|---:|---:|---:|`,
    ...results.map((r) => `| ${r.name} | ${fmt(r.rps16)} | ${fmt(r.p50)} | ${fmt(r.addedP50)} | ${fmt(r.p99)} | ${fmt(r.cpuUsPerReq, 1)} | ${fmt(r.rssLoaded, 1)} | ${fmt(r.pacedCores, 3)} (${fmt(r.pacedRate)} req/s) | ${fmt(r.pacedRss, 1)} |`),
    ``,
    `| target | measured | met |`,
    `|---|---:|:---:|`,
    ...targets.map(([what, got, ok]) => `| ${what} | ${got} | ${ok ? 'yes' : 'NO'} |`),
    ``,
    `node-floor is not a proxy: a node:http server answering by itself, i.e. what any Node process pays per request here.`,
    ``,
  ].join('\n')
  const outDir = join(here, 'results')
  mkdirSync(outDir, { recursive: true })
  const stamp = new Date().toISOString().replace(/[:.]/g, '-')
  const json = JSON.stringify({ at: new Date().toISOString(), node: process.version, seconds: SECONDS, rounds: ROUNDS, layout: { proxy: CPU_PROXY, load: CPU_LOAD }, results, samples, targets }, null, 2)
  for (const name of [stamp, 'latest']) {
    writeFileSync(join(outDir, `${name}.json`), json)
    writeFileSync(join(outDir, `${name}.md`), md)
    writeFileSync(join(outDir, `${name}.svg`), renderChart(results))
  }
  console.log(md)
  console.log(`results: bench/results/latest.{md,json,svg}`)
  exiting = true
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err)
    process.exit(1)
  },
)
