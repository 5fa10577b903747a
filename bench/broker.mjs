// npm run bench:broker: token exchanges at the broker, keys and JWKS warm, the broker pinned
// to one core (CPU 0) and this load generator on the other (CPU 1). Reports p50/p99 latency at
// 1 request in flight and exchanges/s at 32 in flight, medians over rounds, side by side with
// a floor: a bare node:http server on the same core answering a fixed JSON body, which is what
// the HTTP part alone costs. Each exchange carries a fresh single-use local attestation and a
// user token, so every request verifies two ES256 signatures and signs one.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Pool } from 'undici'
import { generateKeyPair, exportJWK, SignJWT } from 'jose'
import { randomUUID } from 'node:crypto'
import { freePort, waitFor } from './ports.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3)
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 32)
const work = mkdtempSync(join(tmpdir(), 'lk-bench-broker-'))
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



function spawnPinned(args) {
  const child = spawn('taskset', ['-c', '0', process.execPath, ...args], { stdio: ['ignore', 'ignore', 'inherit'] })
  children.add(child)
  return child
}

// --- keys: a local attestor and a user IdP, as the broker's config will trust them
async function keyPair(dir, name) {
  const { privateKey, publicKey } = await generateKeyPair('ES256', { extractable: true })
  const jwk = { ...(await exportJWK(publicKey)), kid: name, alg: 'ES256', use: 'sig' }
  const file = join(dir, `${name}.jwks.json`)
  writeFileSync(file, JSON.stringify({ keys: [jwk] }))
  return { privateKey, file, kid: name }
}
mkdirSync(join(work, 'keys'))
const attestor = await keyPair(work, 'attestor')
const idp = await keyPair(work, 'idp')
const AUD = 'https://api.example.com'
writeFileSync(join(work, 'agents.yaml'), `version: 1
agents:
  bench:
    env: prod
    match: { local: true }
    audiences: { "${AUD}": [read, write] }
    max_lifetime_s: 900
    users: optional
`)
const port = await freePort()
const issuer = `http://127.0.0.1:${port}`
writeFileSync(join(work, 'broker.yaml'), `version: 1
log: { level: info }
broker:
  issuer: ${issuer}
  listen: { host: 127.0.0.1, port: ${port} }
  keys: { dir: ${join(work, 'broker-keys')} }
  registry_file: ${join(work, 'agents.yaml')}
  users: { issuer: https://idp.example.com, audience: latchkey, jwks_file: ${idp.file} }
  attestors: { local: { keys_file: ${attestor.file} } }
  store: { sqlite: { path: ${join(work, 'broker.db')} } }
`)

const userToken = await new SignJWT({ scope: 'read write' }).setProtectedHeader({ alg: 'ES256', kid: 'idp' })
  .setIssuer('https://idp.example.com').setSubject('alice').setAudience('latchkey').setIssuedAt().setExpirationTime('2h').sign(idp.privateKey)

const mintUser = (i) => new SignJWT({ scope: 'read write' }).setProtectedHeader({ alg: 'ES256', kid: 'idp' })
  .setIssuer('https://idp.example.com').setSubject(`user-${i}`).setAudience('latchkey').setIssuedAt().setExpirationTime('2h').sign(idp.privateKey)

async function mintBodies(n, freshUsers = false) {
  const out = new Array(n)
  for (let i = 0; i < n; i++) {
    const subject = freshUsers ? await mintUser(i) : userToken
    const actor = await new SignJWT({}).setProtectedHeader({ alg: 'ES256', kid: 'attestor' }).setIssuer('latchkey-local')
      .setSubject(`agent:bench:prod:${i % 50}`).setAudience(issuer).setIssuedAt().setExpirationTime('4m').setJti(randomUUID()).sign(attestor.privateKey)
    out[i] = new URLSearchParams({
      grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
      subject_token: subject, subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
      actor_token: actor, actor_token_type: 'urn:latchkey:token-type:local',
      audience: AUD, scope: 'read', task_id: `task-${i % 200}`, task_duration: '300',
    }).toString()
  }
  return out
}

// --- the floor: node:http on the same core, a fixed body of the same size class
const floorPort = await freePort()
const floorSrc = join(work, 'floor.mjs')
writeFileSync(floorSrc, `import { createServer } from 'node:http'
const body = JSON.stringify({ access_token: 'x'.repeat(560), issued_token_type: 'urn:ietf:params:oauth:token-type:access_token', token_type: 'Bearer', expires_in: 360, scope: 'read' })
createServer((req, res) => { req.resume(); req.on('end', () => { res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' }); res.end(body) }) }).listen(${floorPort}, '127.0.0.1')
`)

async function run(url, bodies, concurrency, seconds) {
  const pool = new Pool(url, { connections: concurrency, pipelining: 1 })
  const lat = []
  let next = 0
  let errors = 0
  const end = performance.now() + seconds * 1000
  async function worker() {
    while (performance.now() < end && next < bodies.length) {
      const body = bodies[next++]
      const t0 = performance.now()
      const res = await pool.request({ path: '/oauth2/token', method: 'POST', body, headers: { 'content-type': 'application/x-www-form-urlencoded' } })
      const text = await res.body.text()
      if (res.statusCode !== 200) {
        if (errors++ === 0) console.error(`  first error: ${res.statusCode} ${text.slice(0, 200)}`)
      }
      lat.push(performance.now() - t0)
    }
  }
  const t0 = performance.now()
  await Promise.all(Array.from({ length: concurrency }, worker))
  const elapsed = (performance.now() - t0) / 1000
  await pool.close()
  lat.sort((a, b) => a - b)
  if (next >= bodies.length) console.error(`  (ran out of pre-minted bodies after ${next})`)
  return { rps: lat.length / elapsed, p50: lat[Math.floor(lat.length * 0.5)], p99: lat[Math.floor(lat.length * 0.99)], n: lat.length, errors }
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] }

console.error(`broker bench: ${ROUNDS} rounds × (${SECONDS}s at 1, ${SECONDS}s at ${CONCURRENCY}); broker on CPU 0, load on CPU 1`)
spawnPinned([join(root, 'dist/bin/latchkey.js'), 'broker', '-c', join(work, 'broker.yaml')])
spawnPinned([floorSrc])
await waitFor(`${issuer}/healthz`, (r) => r.ok)
await waitFor(`http://127.0.0.1:${floorPort}/`, (r) => r.ok)

const results = { broker: [], fresh: [], floor: [] }
// Warm-up: keys, JWKS, JIT.
await run(issuer, await mintBodies(3000), 8, 2)
for (let r = 0; r < ROUNDS; r++) {
  const perRound = Math.ceil(SECONDS * 12000)
  const b1 = await run(issuer, await mintBodies(Math.ceil(SECONDS * 3000)), 1, SECONDS)
  const bN = await run(issuer, await mintBodies(perRound), CONCURRENCY, SECONDS)
  const c1 = await run(issuer, await mintBodies(Math.ceil(SECONDS * 2000), true), 1, SECONDS)
  const cN = await run(issuer, await mintBodies(Math.ceil(SECONDS * 4000), true), CONCURRENCY, SECONDS)
  results.fresh.push({ p50: c1.p50, p99: c1.p99, rps: cN.rps, errors: c1.errors + cN.errors })
  const f1 = await run(`http://127.0.0.1:${floorPort}`, Array(SECONDS * 20000).fill('x=1'), 1, SECONDS)
  const fN = await run(`http://127.0.0.1:${floorPort}`, Array(SECONDS * 60000).fill('x=1'), CONCURRENCY, SECONDS)
  results.broker.push({ p50: b1.p50, p99: b1.p99, rps: bN.rps, errors: b1.errors + bN.errors })
  results.floor.push({ p50: f1.p50, p99: f1.p99, rps: fN.rps, errors: 0 })
  console.error(`  round ${r + 1}: broker p50 ${b1.p50.toFixed(3)} ms p99 ${b1.p99.toFixed(3)} ms, ${bN.rps.toFixed(0)}/s (errors ${b1.errors + bN.errors}); fresh users ${c1.p50.toFixed(3)} ms ${cN.rps.toFixed(0)}/s; floor p50 ${f1.p50.toFixed(3)} ms, ${fN.rps.toFixed(0)}/s`)
}
const summary = {}
for (const [name, rs] of Object.entries(results)) {
  summary[name] = { p50_ms: median(rs.map((x) => x.p50)), p99_ms: median(rs.map((x) => x.p99)), per_s: median(rs.map((x) => x.rps)), errors: rs.reduce((a, x) => a + x.errors, 0) }
}
const lines = [
  `| on one core (CPU 0), ${ROUNDS} rounds, medians | p50 @1 | p99 @1 | per second @${CONCURRENCY} | errors |`,
  '|---|---|---|---|---|',
  `| broker: exchange, one user's token across the task (attestation verify + sign; user token verified once) | ${summary.broker.p50_ms.toFixed(3)} ms | ${summary.broker.p99_ms.toFixed(3)} ms | ${summary.broker.per_s.toFixed(0)} | ${summary.broker.errors} |`,
  `| broker: exchange, a new user token every time (2 verifies + sign) | ${summary.fresh.p50_ms.toFixed(3)} ms | ${summary.fresh.p99_ms.toFixed(3)} ms | ${summary.fresh.per_s.toFixed(0)} | ${summary.fresh.errors} |`,
  `| floor: node:http fixed JSON | ${summary.floor.p50_ms.toFixed(3)} ms | ${summary.floor.p99_ms.toFixed(3)} ms | ${summary.floor.per_s.toFixed(0)} | 0 |`,
  '',
  `Targets: p50 ≤ 2 ms (${summary.broker.p50_ms <= 2 ? 'met' : 'NOT met'}), ≥ 2,000 exchanges/s on one core (${summary.broker.per_s >= 2000 ? 'met' : 'NOT met'}). Broker/floor throughput ratio ${(summary.broker.per_s / summary.floor.per_s).toFixed(2)}.`,
]
console.log(lines.join('\n'))
mkdirSync(join(here, 'results'), { recursive: true })
const stamp = new Date().toISOString().replace(/[:.]/g, '-')
writeFileSync(join(here, 'results', `broker-${stamp}.md`), `# Broker bench ${new Date().toISOString()}\n\n${lines.join('\n')}\n`)
writeFileSync(join(here, 'results', `broker-${stamp}.json`), JSON.stringify({ rounds: ROUNDS, seconds: SECONDS, concurrency: CONCURRENCY, results, summary }, null, 2))
process.exit(0)
