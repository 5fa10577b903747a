// The sidecar as an operator runs it: the CLI process, its admin port, and SIGTERM.
import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, writeFileSync, readFileSync, renameSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { once } from 'node:events'
import { request } from 'undici'
import { startUpstream, rawRequest, CANARY } from '../helpers/harness.js'
import { CLI } from '../helpers/cli.js'

interface Proc {
  child: ChildProcess
  port: number
  adminPort: number
  stdout: string[]
  auditPath: string
}

async function spawnSidecar(upstreamPort: number, nodeArgs: string[] = []): Promise<Proc> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-life-'))
  const auditPath = join(dir, 'audit.jsonl')
  const configPath = join(dir, 'config.yaml')
  writeFileSync(
    configPath,
    `version: 1
sidecar: { listen: { port: 0 }, admin: { port: 0 }, timeouts: { drain_ms: 5000 } }
policy: { default: deny, rules: [ { id: up, action: allow, hosts: ["127.0.0.1"], ports: [${upstreamPort}] } ] }
network: { allow: [ { cidr: 127.0.0.1/32, ports: [${upstreamPort}] } ] }
credentials: [ { id: up, audience: "http://127.0.0.1:${upstreamPort}", source: static, secret: TOKEN, inject: { type: bearer } } ]
audit: { jsonl: { path: ${auditPath} } }
`,
  )
  const child = spawn(process.execPath, [...nodeArgs, CLI, 'sidecar', '--config', configPath], {
    env: { ...process.env, LATCHKEY_SECRET_TOKEN: CANARY },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const stdout: string[] = []
  const ports = await new Promise<{ port: number; adminPort: number }>((resolve, reject) => {
    child.stdout!.on('data', (c: Buffer) => {
      for (const line of c.toString().split('\n').filter(Boolean)) {
        stdout.push(line)
        const m = JSON.parse(line) as { msg: string; port: number; adminPort: number }
        if (m.msg === 'sidecar listening') resolve(m)
      }
    })
    child.once('exit', (code) => reject(new Error(`sidecar exited ${code}`)))
  })
  return { child, stdout, auditPath, ...ports }
}

t.test('a process-wide --max-http-header-size does not raise the proxy port\'s header limit', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const p = await spawnSidecar(upstream.port, ['--max-http-header-size=1048576'])
  t.teardown(() => void p.child.kill('SIGKILL'))
  const big = await rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/big HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(64 * 1024)}\r\nConnection: close\r\n\r\n`)
  t.equal(big.status, 431, 'refused by the sidecar')
  t.match(JSON.parse(big.body), { code: 'LK_HEADERS_TOO_LARGE', reason: /request headers too large/ })
  t.equal(upstream.requests.length, 0, 'nothing reached the upstream')
})

t.test('admin endpoints, strict parser under --insecure-http-parser, graceful SIGTERM', async (t) => {
  const upstream = await startUpstream({
    handler: (req, res) => {
      if (req.url === '/slow') {
        setTimeout(() => res.writeHead(200).end('slow done'), 600)
        return true
      }
      return false
    },
  })
  t.teardown(() => upstream.close())
  const p = await spawnSidecar(upstream.port, ['--insecure-http-parser'])
  t.teardown(() => void p.child.kill('SIGKILL'))
  const admin = `http://127.0.0.1:${p.adminPort}`

  t.equal((await request(`${admin}/healthz`)).statusCode, 200)
  const ready = await request(`${admin}/readyz`)
  t.equal(ready.statusCode, 200)
  t.same(await ready.body.json(), { ok: true, reasons: [] })

  const bad = await rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/ HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n`)
  t.equal(bad.status, 400, 'the process-wide insecure flag does not loosen the sidecar')

  const ok = await rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200)
  const metrics = await (await request(`${admin}/metrics`)).body.text()
  t.match(metrics, /latchkey_calls_total\{via="absolute",decision="allow",outcome="ok"\} 1/)
  t.match(metrics, /latchkey_calls_total\{via="absolute",decision="none",outcome="LK_BAD_REQUEST"\} 1/)
  // Both calls are timed: each lands in the +Inf bucket and the count, and the sum is a positive duration.
  t.match(metrics, /^latchkey_call_duration_seconds_bucket\{le="\+Inf"\} 2$/m)
  t.match(metrics, /^latchkey_call_duration_seconds_count 2$/m)
  const sum = Number(/^latchkey_call_duration_seconds_sum (\S+)$/m.exec(metrics)?.[1])
  t.ok(sum > 0 && sum < 5, `duration sum ${sum} s`)
  t.notOk(metrics.includes(CANARY))

  // A slow call is in flight when SIGTERM arrives: it must complete, and the audit must hold it.
  const slow = rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 1000)
  await new Promise((r) => setTimeout(r, 150))
  p.child.kill('SIGTERM')
  await new Promise((r) => setTimeout(r, 100))
  const readyWhileDraining = await request(`${admin}/readyz`).then(
    (r) => r.statusCode,
    () => 'closed',
  )
  t.ok(readyWhileDraining === 503 || readyWhileDraining === 'closed', `not ready while draining (${readyWhileDraining})`)
  const refused = await rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/late HTTP/1.1\r\nHost: x\r\n\r\n`, 200).catch(() => null)
  t.equal(refused?.status ?? 0, 0, 'no new connection is served while draining')
  const slowRes = await slow
  t.equal(slowRes.status, 200)
  t.match(slowRes.body, /slow done/, 'the in-flight call finished')
  const [code] = (await once(p.child, 'exit')) as [number]
  t.equal(code, 0, 'clean exit')
  const audit = readFileSync(p.auditPath, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { path: string | null; status: number })
  t.ok(audit.some((e) => e.path === '/slow' && e.status === 200), 'the drained call was audited before exit')
  t.equal(upstream.requests.filter((r) => r.url === '/late').length, 0)
  t.notOk(p.stdout.some((l) => l.includes(CANARY)), 'no log line holds the credential')
})

t.test('a second SIGTERM cuts the drain short and the process exits 1, the call it cut recorded', async (t) => {
  // /slow is never answered: only the second signal ends the drain (drain_ms is 5 s).
  const upstream = await startUpstream({ handler: (req) => req.url === '/slow' })
  t.teardown(() => upstream.close())
  const p = await spawnSidecar(upstream.port)
  t.teardown(() => void p.child.kill('SIGKILL'))
  const slow = rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 3000).catch(() => null)
  while (upstream.requests.length === 0) await new Promise((r) => setTimeout(r, 10))
  const exited = once(p.child, 'exit')
  p.child.kill('SIGTERM')
  await new Promise((r) => setTimeout(r, 100))
  p.child.kill('SIGTERM')
  const [code] = (await exited) as [number]
  t.equal(code, 1, 'not a clean exit: the drain was cut')
  await slow
  const audit = readFileSync(p.auditPath, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { path: string | null; error: string | null })
  t.match(audit, [{ path: '/slow', error: 'LK_DRAINING' }], 'the call it cut is recorded')
  const summary = p.stdout.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => typeof l.msg === 'string' && l.msg.startsWith('shutdown: calls still running'))
  t.match(summary, [{ level: 40, calls_cut: 1, cut_short: true }], 'and the shutdown says how many it cut, once')
})

t.test('a SIGHUP during the drain (a logrotate in a rolling deploy) reopens the audit file and the drain goes on', async (t) => {
  const upstream = await startUpstream({
    handler: (req, res) => {
      if (req.url !== '/slow') return false
      setTimeout(() => res.writeHead(200, { 'content-length': '9' }).end('slow done'), 800)
      return true
    },
  })
  t.teardown(() => upstream.close())
  const p = await spawnSidecar(upstream.port)
  t.teardown(() => void p.child.kill('SIGKILL'))
  const slow = rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`, 2000)
  while (upstream.requests.length === 0) await new Promise((r) => setTimeout(r, 10))
  const exited = once(p.child, 'exit')
  p.child.kill('SIGTERM')
  await new Promise((r) => setTimeout(r, 100))
  // As logrotate does: the file moved away, then SIGHUP.
  renameSync(p.auditPath, `${p.auditPath}.1`)
  p.child.kill('SIGHUP')
  const slowRes = await slow
  t.same([slowRes.status, slowRes.body], [200, 'slow done'], 'the call in flight finished (the old code died of the signal: an empty reply)')
  const [code, signal] = (await exited) as [number | null, string | null]
  t.same([code, signal], [0, null], 'a clean exit, not exit 129')
  const reopened = readFileSync(p.auditPath, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { path: string | null; status: number })
  t.match(reopened, [{ path: '/slow', status: 200 }], 'the drained call recorded, in the file opened anew')
  t.ok(p.stdout.some((l) => l.includes('SIGHUP: the audit file opened anew')), 'and the SIGHUP acknowledged')
})

t.test('an idle sidecar sleeps, and its loop-delay gauges read delay, not the sampling interval', { skip: process.platform !== 'linux' && 'reads /proc' }, async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const p = await spawnSidecar(upstream.port)
  t.teardown(() => void p.child.kill('SIGKILL'))
  const pid = p.child.pid!
  // The main thread's voluntary context switches: one per sleep in epoll_wait, that is per wake-up.
  // prom-client's default 10 ms loop-delay timer alone made ~98 a second here; ~11 are left.
  const wakeups = (): number => Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8'))![1])
  const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))
  const gauge = async (stat: string): Promise<number> => {
    const text = await (await request(`http://127.0.0.1:${p.adminPort}/metrics`)).body.text()
    return Number(new RegExp(`^latchkey_nodejs_eventloop_lag_${stat}_seconds (\\S+)$`, 'm').exec(text)?.[1])
  }
  await gauge('p50') // a window starts
  const before = wakeups()
  await sleep(3000)
  const perSecond = (wakeups() - before) / 3
  t.ok(perSecond < 40, `woke ${perSecond.toFixed(0)} times a second with nothing to do (under 40 expected)`)
  const idle = await gauge('p50')
  t.ok(idle >= 0 && idle < 0.05, `an idle loop's median delay is near 0, the 100 ms interval not counted (${idle} s)`)
  // A stall the sidecar cannot see coming: the whole process stopped for 400 ms.
  process.kill(pid, 'SIGSTOP')
  await sleep(400)
  process.kill(pid, 'SIGCONT')
  await sleep(250)
  const stall = await gauge('max')
  t.ok(stall > 0.25 && stall < 2, `the stall is the minute's max delay (${stall} s)`)
  // What one scraper reads does not depend on another: a second scrape (an HA Prometheus pair,
  // anyone's curl) takes nothing from the first's next one.
  await gauge('max')
  await sleep(200)
  const again = await gauge('max')
  t.ok(again > 0.25, `the next scrape still sees the stall (${again} s)`)
  t.ok((await gauge('mean')) > 0, 'the mean counts it too')
})

t.test("Node's own bundled undici is never loaded (on Node 24, an ESM import of node:http loads it)", async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // Asked (SIGUSR2), the process lists the builtins it has loaded.
  const probe = `data:text/javascript,process.on('SIGUSR2', () => console.error('LOADED ' + JSON.stringify(process.moduleLoadList)))`
  const p = await spawnSidecar(upstream.port, ['--import', probe])
  t.teardown(() => void p.child.kill('SIGKILL'))
  const r = await rawRequest(p.port, `GET http://127.0.0.1:${upstream.port}/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(r.status, 200)
  let stderr = ''
  p.child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()))
  p.child.kill('SIGUSR2')
  while (!/^LOADED .*$/m.test(stderr)) await new Promise((r) => setTimeout(r, 10))
  const loaded = JSON.parse(/^LOADED (.*)$/m.exec(stderr)![1]!) as string[]
  t.ok(loaded.includes('NativeModule http'), 'the list is the real one')
  t.same(loaded.filter((m) => m.includes('deps/undici')), [], 'no internal/deps/undici')
})

t.test('a binding whose secret is missing stops start-up with the reason', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-life-'))
  const configPath = join(dir, 'c.yaml')
  writeFileSync(configPath, `version: 1\ncredentials: [ { id: gh, audience: "https://api.github.com", source: static, secret: NOPE, inject: { type: bearer } } ]\n`)
  const child = spawn(process.execPath, [CLI, 'sidecar', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()))
  const [code] = (await once(child, 'exit')) as [number]
  t.equal(code, 1)
  t.match(stderr, /credential "gh": secret NOPE is neither in env LATCHKEY_SECRET_NOPE nor in secrets.file/)
})

t.test('a secret pasted where its name belongs is not repeated in the start-up error', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-life-'))
  const configPath = join(dir, 'c.yaml')
  const pasted = 'ghp_Pasted-Token-CANARY.7f3a9c0b1d2e'
  writeFileSync(configPath, `version: 1\ncredentials: [ { id: gh, audience: "https://api.github.com", source: static, secret: "${pasted}", inject: { type: bearer } } ]\n`)
  const child = spawn(process.execPath, [CLI, 'sidecar', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()))
  child.stderr!.on('data', (c: Buffer) => (output += c.toString()))
  const [code] = (await once(child, 'exit')) as [number]
  t.equal(code, 1)
  t.match(output, /credential "gh": the secret it names is neither in env LATCHKEY_SECRET_<name> nor in secrets.file \(the name is not repeated/)
  t.notMatch(output, /CANARY/, 'what was pasted is not on stdout or stderr')
})

t.test('a secret a header cannot carry stops start-up, naming the credential, not the secret', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-life-'))
  const configPath = join(dir, 'c.yaml')
  writeFileSync(
    configPath,
    `version: 1\nsidecar: { listen: { port: 0 }, admin: { port: 0 } }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\ncredentials:\n  - { id: euro, audience: "https://api.example.com", source: static, secret: EURO, inject: { type: bearer } }\n  - { id: basic-ok, audience: "https://b.example.com", source: static, secret: EURO, inject: { type: basic, username: u } }\n`,
  )
  const child = spawn(process.execPath, [CLI, 'sidecar', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LATCHKEY_SECRET_EURO: 'price-9€-tag' } })
  let stderr = ''
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()))
  const [code] = (await once(child, 'exit')) as [number]
  t.equal(code, 1)
  t.match(stderr, /credential "euro": secret EURO cannot be sent in a header/)
  t.notMatch(stderr, /basic-ok/, 'Basic encodes any text: that binding is fine')
  t.notMatch(stderr, /price/, 'the secret is not printed')
})
