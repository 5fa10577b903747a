// npm run bench:tokens: what broker-issued tokens cost the sidecar, side by side in one run.
//  1. steady state: the same sidecar config twice, once injecting a static secret and once a
//     broker token (cached, refreshed at half-life), each alone on CPU 0; a node load generator
//     on CPU 1 measures req/s at 16 in flight and p50/p99 at 1; medians over rounds, and the ratio;
//  2. cold path: the first request of a new task (exchange included) against its second request;
//  3. burst: 1,000 concurrent first requests of one task, and how many exchanges they caused.
// The broker and the upstream run on CPU 1 beside the load generator.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, mkdirSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { freePort, waitFor } from './ports.mjs'
import { Pool, Client } from 'undici'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const cli = join(root, 'dist/bin/latchkey.js')
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3)
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const COLD_TASKS = Number(process.env.BENCH_COLD_TASKS ?? 50)
const work = mkdtempSync(join(tmpdir(), 'lk-bench-tokens-'))
const children = new Set()
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})
process.on('SIGINT', () => process.exit(130))
try {
  execFileSync('taskset', ['-cp', '1', String(process.pid)], { stdio: 'ignore' })
} catch {
  console.error('taskset unavailable: cores are not pinned, figures are not comparable')
}

function start(cpu, args, env = {}) {
  const child = spawn('taskset', ['-c', cpu, process.execPath, ...args], { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, ...env } })
  children.add(child)
  return child
}
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
/** CPU seconds a process has used (user + system), from /proc. */
function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const ports = { broker: await freePort(), upstream: await freePort(), staticProxy: await freePort(), staticAdmin: await freePort(), brokerProxy: await freePort(), brokerAdmin: await freePort() }
const issuer = `http://127.0.0.1:${ports.broker}`
const upstreamOrigin = `http://127.0.0.1:${ports.upstream}`
const SECRET = 'bench-' + 'x'.repeat(794)

// The upstream: answers 200 "ok" once it has seen an Authorization header.
writeFileSync(join(work, 'upstream.mjs'), `import { createServer } from 'node:http'
createServer((req, res) => { req.resume(); res.writeHead(req.headers.authorization ? 200 : 401, { 'content-type': 'text/plain' }).end('ok') }).listen(${ports.upstream}, '127.0.0.1')
`)
// Keys for the local attestor, made by the product's own helper (dist/lib/local-attestor.js).
const { ensureLocalAttestorKey } = await import(join(root, 'dist/lib/local-attestor.js'))
const local = await ensureLocalAttestorKey(join(work, 'local'))
writeFileSync(join(work, 'agents.yaml'), `version: 1
agents:
  bench:
    env: prod
    match: { local: true }
    audiences: { "${upstreamOrigin}": [read] }
    max_lifetime_s: 900
`)
writeFileSync(join(work, 'broker.yaml'), `version: 1
log: { level: warn }
broker:
  issuer: ${issuer}
  listen: { host: 127.0.0.1, port: ${ports.broker} }
  keys: { dir: ${join(work, 'broker-keys')} }
  registry_file: ${join(work, 'agents.yaml')}
  attestors: { local: { keys_file: ${local.jwksFile} } }
  store: { sqlite: { path: ${join(work, 'broker.db')} } }
`)
const sidecarYaml = (proxyPort, adminPort, credential, extra = '') => `version: 1
log: { level: warn }
sidecar:
  agent_id: agent:bench:prod:1
  listen: { host: 127.0.0.1, port: ${proxyPort} }
  admin: { host: 127.0.0.1, port: ${adminPort} }
${extra}
policy: { default: deny, rules: [{ id: allow-upstream, action: allow, hosts: [127.0.0.1], ports: [${ports.upstream}] }] }
network: { allow: [{ cidr: 127.0.0.1/32, ports: [${ports.upstream}] }] }
credentials:
  - ${credential}
audit: { jsonl: { path: ${join(work, `audit-${proxyPort}.jsonl`)} } }
`
writeFileSync(join(work, 'static.yaml'), sidecarYaml(ports.staticProxy, ports.staticAdmin, `{ id: up, audience: "${upstreamOrigin}", source: static, secret: BENCH, inject: { type: bearer } }`))
writeFileSync(
  join(work, 'broker-sidecar.yaml'),
  sidecarYaml(
    ports.brokerProxy,
    ports.brokerAdmin,
    `{ id: up, audience: "${upstreamOrigin}", source: broker, inject: { type: bearer } }`,
    `  broker: { url: ${issuer} }\n  attestation: { local: { key_file: ${join(work, 'local', 'local-attestor.key.json')} } }\ntasks: { default: { enabled: true, duration_s: 600 } }`,
  ).replace(/\ntasks:/, '\ntasks:'),
)

start('1', [join(work, 'upstream.mjs')])
start('1', [cli, 'broker', '-c', join(work, 'broker.yaml')])
await waitFor(`${issuer}/healthz`)
const pids = {
  static: start('0', [cli, 'sidecar', '-c', join(work, 'static.yaml')], { LATCHKEY_SECRET_BENCH: SECRET }),
  broker: start('0', [cli, 'sidecar', '-c', join(work, 'broker-sidecar.yaml')]),
}
// taskset execs node in place, so the child's pid is the sidecar's.
await waitFor(`http://127.0.0.1:${ports.staticAdmin}/healthz`)
await waitFor(`http://127.0.0.1:${ports.brokerAdmin}/healthz`)

async function load(proxyPort, concurrency, seconds, headers = {}) {
  const pool = new Pool(`http://127.0.0.1:${proxyPort}`, { connections: concurrency })
  const lat = []
  let failures = 0
  const end = performance.now() + seconds * 1000
  const worker = async () => {
    while (performance.now() < end) {
      const t0 = performance.now()
      const r = await pool.request({ method: 'GET', path: `${upstreamOrigin}/x`, headers: { host: `127.0.0.1:${ports.upstream}`, ...headers } })
      await r.body.text()
      if (r.statusCode !== 200) failures++
      lat.push(performance.now() - t0)
    }
  }
  const t0 = performance.now()
  await Promise.all(Array.from({ length: concurrency }, worker))
  const secs = (performance.now() - t0) / 1000
  await pool.close()
  lat.sort((a, b) => a - b)
  return { rps: lat.length / secs, p50: lat[Math.floor(lat.length / 2)] * 1000, p99: lat[Math.floor(lat.length * 0.99)] * 1000, failures }
}

async function exchangesGranted(adminPort) {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text()
  return Number(/latchkey_token_exchanges_total\{outcome="granted"\} (\d+)/.exec(text)?.[1] ?? 0)
}

console.error(`tokens bench: ${ROUNDS} rounds × 2 sidecars × (${SECONDS}s @16 + ${SECONDS}s @1); sidecars on CPU 0, load/broker/upstream on CPU 1`)
await load(ports.staticProxy, 8, 1)
await load(ports.brokerProxy, 8, 1)
const steady = { static: [], broker: [] }
for (let r = 0; r < ROUNDS; r++) {
  for (const [name, port] of [['static', ports.staticProxy], ['broker', ports.brokerProxy]]) {
    const c0 = cpuSeconds(pids[name].pid)
    const t16 = await load(port, 16, SECONDS)
    const cpuUs = ((cpuSeconds(pids[name].pid) - c0) * 1e6) / (t16.rps * SECONDS)
    const t1 = await load(port, 1, SECONDS)
    steady[name].push({ rps: t16.rps, cpuUs, p50: t1.p50, p99: t1.p99, failures: t16.failures + t1.failures })
    console.error(`  round ${r + 1} ${name}: ${t16.rps.toFixed(0)} req/s @16, ${cpuUs.toFixed(1)} CPU µs/req, p50 ${t1.p50.toFixed(0)} µs @1, failures ${t16.failures + t1.failures}`)
  }
}

// Cold path: open a task, time its first request (exchange included), then its second.
const cold = []
const warm = []
const client = new Client(`http://127.0.0.1:${ports.brokerProxy}`)
for (let i = 0; i < COLD_TASKS; i++) {
  const task = await (await fetch(`http://127.0.0.1:${ports.brokerAdmin}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'cold', duration_s: 300 }) })).json()
  const auth = `Basic ${Buffer.from(`task:${task.task}`).toString('base64')}`
  for (const into of [cold, warm]) {
    const t0 = performance.now()
    const r = await client.request({ method: 'GET', path: `${upstreamOrigin}/c`, headers: { host: `127.0.0.1:${ports.upstream}`, 'proxy-authorization': auth } })
    await r.body.text()
    if (r.statusCode !== 200) throw new Error(`cold-path request answered ${r.statusCode}`)
    into.push((performance.now() - t0) * 1000)
  }
  await fetch(`http://127.0.0.1:${ports.brokerAdmin}/v1/tasks/${task.task}`, { method: 'DELETE' })
}
await client.close()

// Burst: 1,000 concurrent first requests of one fresh task.
const before = await exchangesGranted(ports.brokerAdmin)
const burstTask = await (await fetch(`http://127.0.0.1:${ports.brokerAdmin}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'burst', duration_s: 300 }) })).json()
const burstPool = new Pool(`http://127.0.0.1:${ports.brokerProxy}`, { connections: 100 })
const burstAuth = `Basic ${Buffer.from(`task:${burstTask.task}`).toString('base64')}`
const burst = await Promise.all(
  Array.from({ length: 1000 }, () =>
    burstPool.request({ method: 'GET', path: `${upstreamOrigin}/b`, headers: { host: `127.0.0.1:${ports.upstream}`, 'proxy-authorization': burstAuth } }).then(async (r) => (await r.body.text(), r.statusCode)),
  ),
)
await burstPool.close()
const burstExchanges = (await exchangesGranted(ports.brokerAdmin)) - before

const s = Object.fromEntries(Object.entries(steady).map(([k, v]) => [k, { rps: median(v.map((x) => x.rps)), cpuUs: median(v.map((x) => x.cpuUs)), p50: median(v.map((x) => x.p50)), p99: median(v.map((x) => x.p99)), failures: v.reduce((a, x) => a + x.failures, 0) }]))
const lines = [
  `| sidecar on one core, ${ROUNDS} rounds, medians | req/s @16 | sidecar CPU µs/req | p50 @1 (µs) | p99 @1 (µs) | failed requests |`,
  '|---|---|---|---|---|---|',
  `| static secret | ${s.static.rps.toFixed(0)} | ${s.static.cpuUs.toFixed(1)} | ${s.static.p50.toFixed(0)} | ${s.static.p99.toFixed(0)} | ${s.static.failures} |`,
  `| broker token (default task, cached) | ${s.broker.rps.toFixed(0)} | ${s.broker.cpuUs.toFixed(1)} | ${s.broker.p50.toFixed(0)} | ${s.broker.p99.toFixed(0)} | ${s.broker.failures} |`,
  '',
  `The load generator is node on CPU 1 and can be the bottleneck at 16 in flight: CPU µs per request is the figure to compare. Broker/static: CPU per request ${(s.broker.cpuUs / s.static.cpuUs).toFixed(3)}×, throughput ${(s.broker.rps / s.static.rps).toFixed(3)}×, p50 ${(s.broker.p50 - s.static.p50 >= 0 ? '+' : '')}${(s.broker.p50 - s.static.p50).toFixed(0)} µs.`,
  `Cold path (first request of a new task, exchange included), median of ${COLD_TASKS}: ${median(cold).toFixed(0)} µs; its second request: ${median(warm).toFixed(0)} µs; the exchange adds ${(median(cold) - median(warm)).toFixed(0)} µs.`,
  `Burst: 1,000 concurrent first requests of one task → ${burst.filter((x) => x === 200).length} × 200, ${burstExchanges} exchange(s).`,
]
console.log(lines.join('\n'))
mkdirSync(join(here, 'results'), { recursive: true })
const stamp = new Date().toISOString().replace(/[:.]/g, '-')
writeFileSync(join(here, 'results', `tokens-${stamp}.md`), `# Tokens bench ${new Date().toISOString()}\n\n${lines.join('\n')}\n`)
writeFileSync(join(here, 'results', `tokens-${stamp}.json`), JSON.stringify({ rounds: ROUNDS, seconds: SECONDS, steady, summary: s, cold, warm, burst: { ok: burst.filter((x) => x === 200).length, exchanges: burstExchanges } }, null, 2))
process.exit(0)
