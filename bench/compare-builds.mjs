// npm run bench:compare -- <git ref>: what a change costs per call. The sidecar built from <ref>
// and the one built from this checkout run side by side, with undici-bare as the yardstick, on
// the main bench's setup (nginx upstream answering "ok", an 800-byte bearer injected, JSON-lines
// audit, the image's runtime flags): CPU µs per request at 16 connections, in alternating 3 s
// slices, reported as medians and as the per-cycle ratio of the two builds. Not a test.
// Knobs: BENCH_PAIR_CYCLES (10), BENCH_PAIR_SECONDS (3). Needs Linux, taskset, wrk, nginx.
import { spawn, execFileSync } from 'node:child_process'
import { existsSync, mkdtempSync, writeFileSync, readFileSync, mkdirSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { freePort } from './ports.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const ref = process.argv[2]
if (!ref) {
  console.error('usage: npm run bench:compare -- <git ref to compare this checkout with>')
  process.exit(2)
}
const CYCLES = Number(process.env.BENCH_PAIR_CYCLES ?? 10)
const SECONDS = Number(process.env.BENCH_PAIR_SECONDS ?? 3)
const work = mkdtempSync(join(tmpdir(), 'lk-compare-'))
const children = []
const cleanup = () => children.forEach((c) => { try { process.kill(-c.pid, 'SIGKILL') } catch { /* gone */ } })
process.on('exit', cleanup)
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(1))

// The other build: a worktree of <ref>, compiled with this checkout's dependencies.
const other = join(work, 'other')
execFileSync('git', ['-C', root, 'worktree', 'add', '--detach', '-f', other, ref], { stdio: 'pipe' })
process.on('exit', () => execFileSync('git', ['-C', root, 'worktree', 'remove', '--force', other], { stdio: 'ignore' }))
symlinkSync(join(root, 'node_modules'), join(other, 'node_modules'))
execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(other, 'tsconfig.json')], { stdio: 'inherit' })
// Since 2026-12-02 the CLI runs bundled (scripts/bundle.mjs, dist/bin/); a ref before that runs from tsc's output.
const bundled = existsSync(join(other, 'scripts/bundle.mjs'))
if (bundled) execFileSync(process.execPath, [join(other, 'scripts/bundle.mjs')], { stdio: 'inherit' })
const commit = (dir) => execFileSync('git', ['-C', dir, 'rev-parse', '--short', 'HEAD']).toString().trim()
const dirty = execFileSync('git', ['-C', root, 'status', '--porcelain', '--', 'proxy', 'lib', 'cli']).toString().trim() ? ' (with uncommitted changes)' : ''

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
function start(cpu, cmd, args, env = {}) {
  const child = spawn('taskset', ['-c', cpu, cmd, ...args], { env: { ...process.env, ...env }, stdio: 'ignore', detached: true })
  children.push(child)
  return child
}

const [up, a, b, bare] = [await freePort(), await freePort(), await freePort(), await freePort()]
const upDir = join(work, 'upstream')
mkdirSync(join(upDir, 'logs'), { recursive: true })
writeFileSync(join(upDir, 'nginx.conf'), `worker_processes 1; daemon off; pid ${upDir}/nginx.pid; error_log ${upDir}/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; client_body_temp_path ${upDir}; proxy_temp_path ${upDir}; fastcgi_temp_path ${upDir}; uwsgi_temp_path ${upDir}; scgi_temp_path ${upDir};
  server { listen 127.0.0.1:${up}; location / { return 200 "ok"; } } }
`)
start('1', 'nginx', ['-e', join(upDir, 'logs/error.log'), '-p', upDir, '-c', join(upDir, 'nginx.conf')])

const token = Array.from({ length: 800 }, (_, i) => 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'[(i * 7919) % 64]).join('')
const sidecar = (dist, port, name, cli = 'bin/latchkey.js') => {
  const cfg = join(work, `${name}.yaml`)
  writeFileSync(cfg, `version: 1
sidecar:
  listen: { host: 127.0.0.1, port: ${port} }
  admin: { host: 127.0.0.1, port: 0 }
policy:
  default: deny
  rules:
    - { id: bench-upstream, action: allow, hosts: ["127.0.0.1"], ports: [${up}] }
network:
  allow: [{ cidr: 127.0.0.1/32, ports: [${up}] }]
credentials:
  - { id: bench, audience: "http://127.0.0.1:${up}", source: static, secret: BENCH_TOKEN, inject: { type: bearer } }
audit:
  jsonl: { path: ${join(work, `${name}.audit.jsonl`)} }
log: { level: warn }
`)
  // As the image runs it (see bench/README.md).
  return start('0', process.execPath, ['--no-maglev', join(dist, cli), 'sidecar', '--config', cfg], { LATCHKEY_SECRET_BENCH_TOKEN: token, NODE_OPTIONS: '--max-semi-space-size=4', MALLOC_ARENA_MAX: '2', MALLOC_MMAP_THRESHOLD_: '32768' })
}
const contenders = [
  { name: `latchkey ${ref} (${commit(other)})`, port: a, proc: sidecar(join(other, 'dist'), a, 'other', bundled ? 'bin/latchkey.js' : 'cli/latchkey.js') },
  { name: `latchkey this checkout (${commit(root)})${dirty}`, port: b, proc: sidecar(join(root, 'dist'), b, 'this') },
  { name: 'undici-bare', port: bare, proc: start('0', process.execPath, [join(root, 'bench/baselines/undici-forwarder.mjs'), String(bare)], { BENCH_TOKEN: token }) },
]
const script = join(work, 'absolute.lua')
writeFileSync(script, `wrk.path = "http://127.0.0.1:${up}/"\n`)
const wrk = (port, seconds) => execFileSync('taskset', ['-c', '1', 'wrk', '-t2', '-c16', `-d${seconds}s`, '-s', script, `http://127.0.0.1:${port}`]).toString()
for (let i = 0; i < 50; i++) {
  try {
    for (const c of contenders) if (!/ok/.test(execFileSync('curl', ['-s', '-x', `127.0.0.1:${c.port}`, `http://127.0.0.1:${up}/`]).toString())) throw new Error('no ok')
    break
  } catch {
    if (i === 49) throw new Error('a contender never answered "ok" through 127.0.0.1')
    await sleep(200)
  }
}

/** utime + stime of the process and its threads, in seconds. */
function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(f[11]) + Number(f[12])) / 100
}
for (const c of contenders) wrk(c.port, 2) // warm-up
const us = contenders.map(() => [])
for (let cycle = 0; cycle < CYCLES; cycle++) {
  const order = cycle % 2 ? [2, 1, 0] : [0, 1, 2]
  for (const i of order) {
    const c = contenders[i]
    const before = cpuSeconds(c.proc.pid)
    const requests = Number(/(\d+) requests in/.exec(wrk(c.port, SECONDS))[1])
    us[i].push(((cpuSeconds(c.proc.pid) - before) * 1e6) / requests)
  }
}
const median = (xs) => { const s = [...xs].sort((p, q) => p - q); return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2 }
const ratios = us[1].map((v, i) => v / us[0][i])
const lines = [
  `# Build comparison, ${new Date().toISOString()}, node ${process.version}`,
  '',
  `${CYCLES} cycles of ${SECONDS} s at 16 connections, alternating order; CPU µs per request of each process (all threads).`,
  '',
  '| contender | CPU µs/req, median | cycles |',
  '|---|---:|---|',
  ...contenders.map((c, i) => `| ${c.name} | ${median(us[i]).toFixed(1)} | ${us[i].map((v) => v.toFixed(1)).join(' ')} |`),
  '',
  `this checkout / ${ref}, per cycle: median ${median(ratios).toFixed(3)} (range ${Math.min(...ratios).toFixed(3)}–${Math.max(...ratios).toFixed(3)})`,
  `against undici-bare (CPU ratio): ${ref} ${median(us[0].map((v, i) => v / us[2][i])).toFixed(3)}, this checkout ${median(us[1].map((v, i) => v / us[2][i])).toFixed(3)}`,
]
console.log(lines.join('\n'))
const out = join(root, 'bench/results', `compare-${new Date().toISOString().replace(/[:.]/g, '-')}.md`)
mkdirSync(dirname(out), { recursive: true })
writeFileSync(out, lines.join('\n') + '\n')
console.error(`bench: written to ${out}`)
process.exit(0)
