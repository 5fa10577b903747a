// npm run drill: the fire drill. A broker (with its control stream), an upstream API, and
// DRILL_SIDECARS (≥ 50) sidecars, each its own agent carrying steady traffic, spread over
// DRILL_WORKERS host processes. DRILL_ROUNDS times: pick a live agent, revoke it with the real
// CLI (`latchkey revoke agent:…`), and measure from the command's return (its exit) to the moment
// its sidecar has refused a request with LK_REVOKED *and* holds no cached token. Every other
// agent's failed requests are counted over the whole run: the target is zero.
// No collector runs: the drill measures revocation, and the sidecars audit to JSON lines.
import { spawn, fork } from 'node:child_process'
import { mkdtempSync, writeFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { freePort, waitFor } from './ports.mjs'
import { randomBytes } from 'node:crypto'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const cli = join(root, 'dist/bin/latchkey.js')
const SIDECARS = Number(process.env.DRILL_SIDECARS ?? 50)
const WORKERS = Number(process.env.DRILL_WORKERS ?? 2)
const ROUNDS = Number(process.env.DRILL_ROUNDS ?? 20)
const INTERVAL_MS = Number(process.env.DRILL_INTERVAL_MS ?? 100)
const SETTLE_MS = Number(process.env.DRILL_SETTLE_MS ?? 300)
const work = mkdtempSync(join(tmpdir(), 'lk-drill-'))
const children = new Set()
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})
process.on('SIGINT', () => process.exit(130))
const now = () => performance.timeOrigin + performance.now()


const ports = { broker: await freePort(), control: await freePort(), upstream: await freePort() }
const issuer = `http://127.0.0.1:${ports.broker}`
const upstreamOrigin = `http://127.0.0.1:${ports.upstream}`
const adminToken = randomBytes(24).toString('hex')
const controlToken = randomBytes(24).toString('hex')
const env = { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: adminToken, LATCHKEY_CONTROL_TOKEN: controlToken, DRILL_CONTROL_TOKEN: controlToken }

writeFileSync(join(work, 'upstream.mjs'), `import { createServer } from 'node:http'
createServer((req, res) => { req.resume(); res.writeHead(req.headers.authorization ? 200 : 401, { 'content-type': 'text/plain' }).end('ok') }).listen(${ports.upstream}, '127.0.0.1')
`)
const { ensureLocalAttestorKey } = await import(join(root, 'dist/lib/local-attestor.js'))
const local = await ensureLocalAttestorKey(join(work, 'local'))
writeFileSync(join(work, 'agents.yaml'), `version: 1
agents:
  drill:
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
  control: { host: 127.0.0.1, port: ${ports.control} }
`)

function start(args) {
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'], env })
  children.add(child)
  return child
}
start([join(work, 'upstream.mjs')])
start([cli, 'broker', '-c', join(work, 'broker.yaml')])
await waitFor(`${issuer}/healthz`)

const agents = Array.from({ length: SIDECARS }, (_, i) => `agent:drill:prod:a${String(i).padStart(3, '0')}`)
const workers = []
for (let w = 0; w < WORKERS; w++) {
  const mine = agents.filter((_, i) => i % WORKERS === w)
  const child = fork(join(here, 'drill-worker.mjs'), [JSON.stringify({ root, work, agents: mine, issuer, controlUrl: `grpc://127.0.0.1:${ports.control}`, upstreamOrigin, intervalMs: INTERVAL_MS })], {
    env,
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  })
  children.add(child)
  const handlers = new Set()
  child.on('message', (m) => {
    for (const h of handlers) h(m)
  })
  const next = (pred) =>
    new Promise((resolve) => {
      const h = (m) => {
        if (pred(m)) {
          handlers.delete(h)
          resolve(m)
        }
      }
      handlers.add(h)
    })
  workers.push({ child, agents: mine, next })
}
const started = performance.now()
await Promise.all(workers.map((w) => w.next((m) => m.type === 'ready')))
console.error(`${SIDECARS} sidecars up and warm in ${((performance.now() - started) / 1000).toFixed(1)} s; traffic every ${INTERVAL_MS} ms per agent`)
await new Promise((r) => setTimeout(r, 1000))

const VIA = process.env.DRILL_VIA ?? 'api'
async function revokeApi(agent) {
  const res = await fetch(`${issuer}/v1/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ kind: 'agent', value: agent, reason: 'fire drill' }),
  })
  await res.text()
  const t = now()
  if (res.status !== 201) throw new Error(`revoke ${agent}: broker answered ${res.status}`)
  return t
}
function revokeCli(agent) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, 'revoke', agent, '--broker', issuer, '--reason', 'fire drill'], { stdio: ['ignore', 'ignore', 'inherit'], env })
    child.on('exit', (code) => {
      const t = now()
      if (code === 0) resolve(t)
      else reject(new Error(`latchkey revoke exited ${code}`))
    })
  })
}

const drills = []
for (let i = 0; i < ROUNDS; i++) {
  const agent = agents[(i * 7) % SIDECARS]
  const w = workers.find((x) => x.agents.includes(agent))
  w.child.send({ type: 'arm', agent })
  await w.next((m) => m.type === 'armed' && m.agent === agent)
  const result = w.next((m) => m.type === 'result' && m.agent === agent)
  const returnedAt = VIA === 'cli' ? await revokeCli(agent) : await revokeApi(agent)
  const r = await Promise.race([result, new Promise((resolve) => setTimeout(() => resolve(null), 5000))])
  if (!r) throw new Error(`drill ${i}: ${agent} was not refused within 5 s`)
  const refusedMs = r.refusedAt - returnedAt
  const tokensMs = r.tokensGoneAt - returnedAt
  drills.push({ agent, refused_ms: round(refusedMs), tokens_gone_ms: round(tokensMs), ms: round(Math.max(refusedMs, tokensMs)), probes: r.probes })
  console.error(`drill ${i + 1}/${ROUNDS}: ${agent} refused ${refusedMs.toFixed(1)} ms, tokens gone ${tokensMs.toFixed(1)} ms after the revoke command returned`)
  await new Promise((res) => setTimeout(res, SETTLE_MS))
}

const stats = (await Promise.all(workers.map(async (w) => {
  w.child.send({ type: 'stop' })
  return (await w.next((m) => m.type === 'stats')).stats
}))).flat()
const others = stats.filter((s) => !s.revoked)
const collateral = others.reduce((n, s) => n + s.failed, 0)
const okRequests = stats.reduce((n, s) => n + s.ok, 0)
function round(x) {
  return Math.round(x * 100) / 100
}
function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]
}
const ms = drills.map((d) => d.ms)
const result = {
  date: new Date().toISOString(),
  node: process.version,
  cpus: (await import('node:os')).cpus().length,
  sidecars: SIDECARS,
  workers: WORKERS,
  interval_ms: INTERVAL_MS,
  rounds: ROUNDS,
  revoke_via: VIA === 'cli' ? 'latchkey revoke (process exit)' : 'admin API POST /v1/revocations (as latchkey revoke sends it)',
  p50_ms: pct(ms, 50),
  p99_ms: pct(ms, 99),
  max_ms: Math.max(...ms),
  target_p99_ms: 250,
  collateral_failed_requests: collateral,
  collateral_failures_sample: others.flatMap((s) => s.failures.map((f) => `${s.agent}: ${f}`)).slice(0, 10),
  successful_requests: okRequests,
  drills,
}
mkdirSync(join(here, 'results'), { recursive: true })
const stamp = result.date.replace(/[:.]/g, '-')
writeFileSync(join(here, 'results', `drill-${stamp}.json`), JSON.stringify(result, null, 2) + '\n')
const md = `# Fire drill ${result.date}

${SIDECARS} sidecars (${WORKERS} host processes), each its own agent with a request every ${INTERVAL_MS} ms; one broker with its control stream; ${ROUNDS} drills, each revoking one agent via ${result.revoke_via}.
Measured from the revoke's return to the later of: its sidecar refusing a request with 403 LK_REVOKED, and its token cache empty. Node ${process.version}, ${result.cpus} CPUs (shared).

| | ms |
|---|---|
| p50 | ${result.p50_ms} |
| p99 | ${result.p99_ms} |
| max | ${result.max_ms} |
| target p99 | ≤ 250 |

Negative: the sidecar refused before the revoke's answer reached the operator. Probe resolution: back-to-back requests (${round(drills.reduce((n, d) => n + d.probes, 0) / drills.length)} per drill on average).

Collateral failed requests (agents not revoked): **${collateral}** of ${okRequests + collateral}.
`
writeFileSync(join(here, 'results', `drill-${stamp}.md`), md)
console.log(md)
process.exit(result.p99_ms <= 250 && collateral === 0 ? 0 : 1)
