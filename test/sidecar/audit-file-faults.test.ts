// The JSON-lines audit file failing under a running sidecar: it fails closed (no call it cannot
// record), keeps what it could not write, and writes it once it can; a rotated file is noticed.
// The faults are real: the path is pointed at /dev/full (every write is ENOSPC), then at a file.
import t from 'tap'
import { EnvHttpProxyAgent, fetch as undiciFetch } from 'undici'
import { mkdirSync, readFileSync, renameSync, rmSync, symlinkSync, unlinkSync } from 'node:fs'
import { dirname } from 'node:path'
import { execFileSync } from 'node:child_process'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary } from '../helpers/harness.js'

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

type Sidecar = Awaited<ReturnType<typeof startTestSidecar>>
type Answer = Awaited<ReturnType<typeof rawRequest>>

/** An upstream, a sidecar that injects a credential on calls to it, and a call through that sidecar; every raw answer is kept in `seen`. */
async function auditRig(t: { teardown(fn: () => unknown): void }) {
  const up = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [up.port] }] },
    credentials: [{ id: 'up', audience: up.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const seen: string[] = []
  const call = async (path: string) => {
    const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    seen.push(r.raw)
    return r
  }
  return { up, s, call, seen }
}

/** Calls `path` (then `path-0`, `path-1`, …) until one is refused: the failure is found by an append after a call was answered. The last answer. */
async function untilRefused(call: (path: string) => Promise<Answer>, path: string): Promise<Answer> {
  let r = await call(path)
  for (let i = 0; i < 100 && r.status === 200; i++) r = await call(`${path}-${i}`)
  return r
}

async function readyz(s: Sidecar) {
  const r = await fetch(`${s.sidecar.adminUrl}/readyz`)
  return { status: r.status, body: (await r.json()) as { reasons?: string[] } }
}

/** /readyz, asked every 100 ms until it answers 200 or 6 s have passed: its last answer. */
async function untilReady(s: Sidecar) {
  let ready = await readyz(s)
  for (let i = 0; i < 60 && ready.status !== 200; i++) {
    await sleep(100)
    ready = await readyz(s)
  }
  return ready
}

t.test('an audit file that cannot be written refuses new egress, then recovers with nothing lost', async (t) => {
  const { up, s, call, seen } = await auditRig(t)
  t.equal((await call('/1')).status, 200)
  await s.sidecar.audit.flush()

  // Rotated away, and the path now a device where every write fails.
  renameSync(s.auditPath, `${s.auditPath}.1`)
  symlinkSync('/dev/full', s.auditPath)
  await sleep(1100)
  t.equal((await call('/2')).status, 200, 'the call that finds it out is already answered')
  const refused = await untilRefused(call, '/3')
  t.equal(refused.status, 503, 'then new egress is refused')
  t.match(JSON.parse(refused.body), { code: 'LK_AUDIT_UNAVAILABLE', retryable: true, reason: /audit file cannot be written \(ENOSPC\)/ })
  const sentWhileFailing = up.requests.length
  t.equal((await call('/4')).status, 503)
  // Node's fetch of an http:// URL tunnels it (CONNECT to port 80): the CONNECT's 503 was only
  // "fetch failed" to it; the request inside reads the 503 and that it may retry.
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: s.proxy, noProxy: '' })
  t.teardown(() => dispatcher.close())
  const port80 = await undiciFetch('http://api.example/4-tunnelled', { dispatcher }).then(
    async (r) => [r.status, r.headers.get('x-latchkey-error'), r.headers.get('x-should-retry'), ((await r.json()) as { reason: string }).reason],
    (err: Error) => [`fetch threw: ${err.message}`],
  )
  t.match(port80, [503, 'LK_AUDIT_UNAVAILABLE', 'true', /audit file cannot be written \(ENOSPC\)/], 'fetch on port 80 reads the refusal inside the tunnel')
  t.equal(up.requests.length, sentWhileFailing, 'nothing more reaches the upstream')
  const notReady = await readyz(s)
  t.equal(notReady.status, 503)
  t.match(notReady.body.reasons, [/audit file cannot be written \(ENOSPC\)/])
  t.match(s.logs.join('').split('\n').filter((l) => l.includes('audit sink write failed')).map((l) => JSON.parse(l) as object), [{ code: 'ENOSPC', path: s.auditPath }], 'the line names the file')

  // Writable again: what failed is written first, and egress resumes, with no call in between.
  unlinkSync(s.auditPath)
  const ready = await untilReady(s)
  t.equal(ready.status, 200, 'ready again once appends work')
  t.equal((await call('/5')).status, 200)
  const rotated = readFileSync(`${s.auditPath}.1`, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { path: string })
  t.same(rotated.map((e) => e.path), ['/1'], 'the rotated file kept what it had')
  const current = await s.audit()
  const paths = current.map((e) => e.path as string)
  t.equal(paths[0], '/2', 'the event that failed comes first')
  t.equal(paths.at(-1), '/5')
  t.ok(paths.includes('/4'), 'refusals made while failing are recorded too')
  t.match(current.find((e) => e.path === '/4-tunnelled'), { via: 'tunnelled', host: 'api.example', port: 80, status: 503, error: 'LK_AUDIT_UNAVAILABLE' }, 'the request inside the tunnel too')
  t.equal(new Set(paths).size, paths.length, 'each event once')
  const recorded = new Set([...rotated.map((e) => e.path), ...paths])
  t.same(up.requests.map((r) => r.url).filter((u) => !recorded.has(u)), [], 'every call that went out is recorded')
  assertNoCanary(t, s, ...seen)
})

t.test('an audit directory removed under the sidecar: nothing is written to the deleted file; refused until it is back', async (t) => {
  const { up, s, call } = await auditRig(t)
  t.equal((await call('/1')).status, 200)
  await s.sidecar.audit.flush()
  const dir = dirname(s.auditPath)
  rmSync(dir, { recursive: true })
  await sleep(1100)
  const r = await untilRefused(call, '/2')
  t.equal(r.status, 503)
  t.match(JSON.parse(r.body), { code: 'LK_AUDIT_UNAVAILABLE', reason: /audit file cannot be written \(ENOENT\)/ })
  mkdirSync(dir)
  const ready = (await untilReady(s)).status
  t.equal(ready, 200, 'ready again once the directory is back')
  t.equal((await call('/3')).status, 200)
  const paths = (await s.audit()).map((e) => e.path)
  t.ok(paths.includes('/2'), 'the call that found it out is in the new file, not lost in the deleted one')
  t.equal(paths.at(-1), '/3')
  t.same(up.requests.map((q) => q.url).filter((u) => u !== '/1' && !paths.includes(u)), [], 'every call that went out after is recorded')
})

t.test('a FIFO put at the audit path does not hang the sidecar: refused until a file is back', async (t) => {
  const { s, call } = await auditRig(t)
  t.equal((await call('/1')).status, 200)
  await s.sidecar.audit.flush()
  renameSync(s.auditPath, `${s.auditPath}.1`)
  execFileSync('mkfifo', [s.auditPath])
  s.sidecar.audit.reopen?.()
  const r = await untilRefused(call, '/2')
  t.equal(r.status, 503, 'answered, and refused: the event loop was not held by the open')
  t.match(JSON.parse(r.body), { code: 'LK_AUDIT_UNAVAILABLE', reason: /ENOTFILE/ })
  t.equal((await fetch(`${s.sidecar.adminUrl}/healthz`)).status, 200, 'the admin port answers')
  unlinkSync(s.auditPath)
  const ready = (await untilReady(s)).status
  t.equal(ready, 200, 'ready again once the path is a file')
  t.ok((await s.audit()).some((e) => e.path === '/2'), 'what was refused meanwhile, and the call before, are in the new file')
})
