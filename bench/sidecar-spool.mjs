// The sidecar with its audit going to the collector (gRPC sink + spool, every event appended
// before its response ends) against the same sidecar with the JSON-lines sink: what the
// nothing-lost guarantee costs. Not the full `npm run bench` (no wrk/nginx needed): a Node
// closed-loop load generator, same for both, so compare the two rows with each other.
// Layout (2 cores): each sidecar alone on CPU 0; upstream, collector, load and this script on CPU 1.
// Run: npm run build && node bench/sidecar-spool.mjs   (BENCH_SECONDS=5, BENCH_ROUNDS=3)
// Diagnostics: BENCH_DEAD_COLLECTOR=1 points the sink at a closed port (spool only, no sending);
// BENCH_PROF=<dir> writes a CPU profile of the collector-backed sidecar there.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir, cpus, loadavg } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createHash } from 'node:crypto'
import { createServer } from 'node:http'
import { Pool, request } from 'undici'
import { freePort } from './ports.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const cli = join(root, 'dist/bin/latchkey.js')
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3)
const TOKEN = 'bench-' + 'x'.repeat(794)
const COLLECTOR_TOKEN = 'collector-bench-token'
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
const work = mkdtempSync(join(tmpdir(), 'lk-bench-spool-'))
const children = new Set()
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

try {
  execFileSync('taskset', ['-pc', '1', String(process.pid)], { stdio: 'ignore' })
} catch {
  // no taskset: measured unpinned
}

async function waitPort(port) {
  const { connect } = await import('node:net')
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((r) => {
      const s = connect(port, '127.0.0.1', () => {
        s.destroy()
        r(true)
      })
      s.on('error', () => r(false))
    })
    if (ok) return
    await sleep(100)
  }
  throw new Error(`nothing listens on ${port}`)
}

async function start(name, cpu, args, env, port) {
  const p = spawn('taskset', ['-c', cpu, process.execPath, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  children.add(p)
  let out = ''
  p.stdout.on('data', (d) => (out += d))
  p.stderr.on('data', (d) => (out += d))
  const died = new Promise((_, reject) => p.on('exit', (code) => reject(new Error(`${name} exited ${code}:\n${out}`))))
  died.catch(() => {})
  await Promise.race([waitPort(port), died])
  return p
}

function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return (Number(f[11]) + Number(f[12])) / CLK_TCK
}

async function load(proxyPort, upstreamPort, connections, seconds, latencies) {
  const pool = new Pool(`http://127.0.0.1:${proxyPort}`, { connections, pipelining: 1 })
  let done = 0
  let errors = 0
  const until = performance.now() + seconds * 1000
  const worker = async () => {
    while (performance.now() < until) {
      const t0 = performance.now()
      try {
        const r = await pool.request({ method: 'GET', path: `http://127.0.0.1:${upstreamPort}/`, headers: { host: `127.0.0.1:${upstreamPort}` } })
        await r.body.text()
        if (r.statusCode === 200) done++
        else errors++
      } catch {
        errors++
      }
      latencies?.push((performance.now() - t0) * 1000)
    }
  }
  await Promise.all(Array.from({ length: connections }, worker))
  await pool.close()
  return { done, errors }
}

const pct = (a, p) => {
  const s = [...a].sort((x, y) => x - y)
  return Math.round(s[Math.min(s.length - 1, Math.floor((s.length * p) / 100))] ?? 0)
}
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]

async function main() {
  const upstream = createServer((_req, res) => res.end('ok'))
  await new Promise((r) => upstream.listen(0, '127.0.0.1', r))
  const upstreamPort = upstream.address().port
  const grpcPort = await freePort()
  const httpPort = await freePort()
  const db = join(work, 'collector.db')
  writeFileSync(
    join(work, 'collector.yaml'),
    `version: 1\ncollector:\n  grpc: { host: 127.0.0.1, port: ${grpcPort} }\n  http: { host: 127.0.0.1, port: ${httpPort} }\n  store: { kind: sqlite, path: ${db} }\n  sidecars: [{ id: bench-sidecar, token_sha256: ${createHash('sha256').update(COLLECTOR_TOKEN).digest('hex')} }]\nlog: { level: warn }\n`,
  )
  await start('collector', '1', [cli, 'collector', '-c', join(work, 'collector.yaml')], {}, httpPort)
  const sidecarYaml = (name, port, audit) => {
    const path = join(work, `${name}.yaml`)
    writeFileSync(
      path,
      `version: 1
sidecar: { listen: { port: ${port} }, admin: { port: 0 }, agent_id: "agent:bench:prod:1" }
policy: { default: deny, rules: [{ id: allow-upstream, action: allow, hosts: [127.0.0.1], ports: [${upstreamPort}] }] }
network: { allow: [{ cidr: 127.0.0.1/32, ports: [${upstreamPort}] }] }
credentials: [{ id: bench, audience: "http://127.0.0.1:${upstreamPort}", source: static, secret: BENCH_TOKEN, inject: { type: bearer } }]
audit: ${audit}
log: { level: warn }
`,
    )
    return path
  }
  const ports = { jsonl: await freePort(), collector: await freePort() }
  const env = { LATCHKEY_SECRET_BENCH_TOKEN: TOKEN, LATCHKEY_SECRET_COLLECTOR: COLLECTOR_TOKEN }
  const contenders = {
    jsonl: await start('sidecar-jsonl', '0', [...(process.env.BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.BENCH_PROF + '/jsonl'] : []), cli, 'sidecar', '-c', sidecarYaml('jsonl', ports.jsonl, `{ jsonl: { path: ${join(work, 'audit.jsonl')} } }`)], env, ports.jsonl),
    collector: await start(
      'sidecar-collector',
      '0',
      [...(process.env.BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.BENCH_PROF + '/collector'] : []), cli, 'sidecar', '-c', sidecarYaml('collector', ports.collector, `{ collector: { address: "127.0.0.1:${process.env.BENCH_DEAD_COLLECTOR ? 1 : grpcPort}", sidecar_id: bench-sidecar, token_secret: COLLECTOR, spool_dir: ${join(work, 'spool')} } }`)],
      env,
      ports.collector,
    ),
  }
  const results = { jsonl: { rps: [], cpu: [], p50: [], p99: [] }, collector: { rps: [], cpu: [], p50: [], p99: [] } }
  let collectorAnswered = 0
  for (const name of Object.keys(contenders)) await load(ports[name], upstreamPort, 16, 1, null) // warm-up
  for (let round = 0; round < ROUNDS; round++) {
    for (const name of Object.keys(contenders)) {
      const pid = contenders[name].pid
      const c0 = cpuSeconds(pid)
      const r = await load(ports[name], upstreamPort, 16, SECONDS, null)
      const c1 = cpuSeconds(pid)
      results[name].rps.push(r.done / SECONDS)
      results[name].cpu.push(((c1 - c0) * 1e6) / Math.max(1, r.done))
      const lat = []
      const r1 = await load(ports[name], upstreamPort, 1, Math.max(2, SECONDS / 2), lat)
      results[name].p50.push(pct(lat, 50))
      results[name].p99.push(pct(lat, 99))
      if (name === 'collector') collectorAnswered += r.done + r1.done + r.errors + r1.errors
    }
  }
  // Every request the collector-backed sidecar answered must be at the collector (warm-up included).
  await sleep(2000)
  const inv = await (await request(`http://127.0.0.1:${httpPort}/v1/inventory`)).body.json()
  const atCollector = inv.sidecars.find((s) => s.sidecar === 'bench-sidecar')?.events ?? 0
  const fmt = (n) => Math.round(n).toLocaleString('en-US')
  const lines = []
  const console = { log: (l) => (globalThis.console.log(l), lines.push(l)) }
  console.log(`sidecar audit sinks: ${ROUNDS} rounds × ${SECONDS} s, medians; ${cpus().length} × ${cpus()[0]?.model ?? '?'}, Node ${process.version}, load average at the end ${loadavg()[0].toFixed(2)}`)
  console.log('| audit sink | req/s @16 conn | sidecar CPU µs/req | p50 @1 conn (µs, client-side) | p99 @1 conn |')
  console.log('|---|---:|---:|---:|---:|')
  for (const name of Object.keys(results)) {
    const r = results[name]
    console.log(`| ${name === 'jsonl' ? 'JSON lines (batched, after the response)' : 'collector: spool + gRPC (before the response ends)'} | ${fmt(median(r.rps))} | ${median(r.cpu).toFixed(1)} | ${fmt(median(r.p50))} | ${fmt(median(r.p99))} |`)
  }
  console.log(`collector-backed sidecar: ${fmt(atCollector)} events at the collector for ${fmt(collectorAnswered)} measured requests (+ 1 s warm-up)`)
  writeFileSync(join(root, 'bench', 'results', 'sidecar-spool.md'), `# Sidecar: JSON lines vs collector sink\n\n${new Date().toISOString()} · \`node bench/sidecar-spool.mjs\`\n\n${lines.join('\n')}\n`)
  upstream.close()
}

try {
  await main()
} finally {
  for (const c of children) c.kill('SIGTERM')
  await sleep(500)
  rmSync(work, { recursive: true, force: true })
}
