// A log reader that stops reading (a stalled pipe, a wedged log shipper) must not hold the
// sidecar: calls go on, and SIGTERM still ends it. pino's own exit flush retried a full pipe every
// 100 ms without end, so the process never exited, on a second or third signal either.
import t from 'tap'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { ProxyAgent, request } from 'undici'
import { startUpstream } from '../helpers/harness.js'
import { freePort } from '../helpers/broker.js'
import { CLI } from '../helpers/cli.js'

t.test('a sidecar whose stdout nobody reads serves on, and exits on SIGTERM', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const dir = mkdtempSync(join(tmpdir(), 'lk-stall-'))
  const port = await freePort()
  const config = join(dir, 'sidecar.yaml')
  writeFileSync(
    config,
    `version: 1
sidecar: { listen: { host: 127.0.0.1, port: ${port} }, admin: { host: 127.0.0.1, port: 0 } }
policy: { default: allow }
network: { allow: [{ cidr: 127.0.0.1/32, ports: [${upstream.port}] }] }
audit: { jsonl: { path: ${join(dir, 'audit.jsonl')} } }
log: { level: info }
`,
  )
  // stdout piped and never read: the pipe (64 KiB) fills with the first hundred or so call lines.
  const child = spawn(process.execPath, [CLI, 'sidecar', '-c', config], { stdio: ['ignore', 'pipe', 'pipe'] })
  child.stdout!.pause()
  t.teardown(() => {
    child.kill('SIGKILL')
    // What the pipe holds is never read: closed, so this process does not wait on it.
    child.stdout!.destroy()
    child.stderr!.destroy()
  })
  const proxy = new ProxyAgent(`http://127.0.0.1:${port}`)
  t.teardown(() => proxy.close())
  const call = () => request(`${upstream.origin}/with-a-path-long-enough-to-fill-the-log-pipe-sooner/${'x'.repeat(200)}`, { dispatcher: proxy }).then(async (r) => (await r.body.text(), r.statusCode))
  for (let i = 0; i < 100; i++) {
    if (await call().catch(() => 0)) break
    await sleep(100)
  }
  let ok = 0
  for (let i = 0; i < 600; i++) if ((await call()) === 200) ok++
  t.equal(ok, 600, 'every call answered with the log pipe full')
  const started = Date.now()
  child.kill('SIGTERM')
  const exited = await Promise.race([once(child, 'exit').then(([code]) => code as number | null), sleep(15_000, undefined, { ref: false }).then(() => 'still running')])
  t.equal(exited, 0, 'SIGTERM ends it, exit 0')
  t.ok(Date.now() - started < 10_000, `within the exit flush's bound (${Date.now() - started} ms)`)
})
