// The JSON-lines audit file on a disk that hangs (NFS, EBS, a frozen filesystem): an append that
// never completes must fail closed within the stall bound, hold a bounded backlog, and lose
// nothing once it completes. The fault is real: the sidecar runs as its own process with an
// LD_PRELOAD shim whose write() blocks on the audit file while a flag file exists.
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client } from 'undici'
import { startChild, writeYaml } from '../collector/process-helpers.js'
import { startUpstream, loopbackPolicy } from '../helpers/harness.js'

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
/** STALL_MS in proxy/audit/jsonl-sink.ts: how long an append may be outstanding before the sink fails closed. */
const STALL_MS = 2000

const SHIM = String.raw`
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static ssize_t (*real_write)(int, const void *, size_t);
ssize_t write(int fd, const void *buf, size_t n) {
  if (!real_write) real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
  const char *target = getenv("LK_HANG_PATH");
  const char *flag = getenv("LK_HANG_FLAG");
  if (target && flag && fd > 2) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len > 0) {
      path[len] = 0;
      if (strcmp(path, target) == 0) while (access(flag, F_OK) == 0) usleep(5000);
    }
  }
  return real_write(fd, buf, n);
}
`

function metric(text: string, name: string): number | undefined {
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text)
  return m ? Number(m[1]) : undefined
}

const cc = spawnSync('cc', ['--version'])
const noCompiler = cc.error || cc.status !== 0 ? 'no C compiler (cc) on this machine: the hung write is made by an LD_PRELOAD shim compiled by the test' : false

/**
 * A sidecar whose write(2) to its audit file blocks while `flag` exists (the shim, compiled into
 * a fresh directory): the hang is made by the system call itself, as a hung disk makes it.
 */
async function sidecarOnHungDisk(t: { equal(a: unknown, b: unknown, m: string): unknown; teardown(fn: () => unknown): void }, sidecar: Record<string, unknown> = {}) {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), 'lk-audit-hang-')))
  writeFileSync(join(dir, 'shim.c'), SHIM)
  const built = spawnSync('cc', ['-shared', '-fPIC', '-O1', '-o', join(dir, 'shim.so'), join(dir, 'shim.c'), '-ldl'], { encoding: 'utf8' })
  t.equal(built.status, 0, `the shim compiles ${built.stderr}`)
  const auditPath = join(dir, 'audit.jsonl')
  const flag = join(dir, 'hang')
  const up = await startUpstream()
  t.teardown(() => up.close())
  const file = writeYaml(join(dir, 'c.yaml'), {
    version: 1,
    sidecar: { listen: { port: 0 }, admin: { port: 0 }, ...sidecar },
    ...loopbackPolicy([up.port]),
    routes: { up: up.origin },
    audit: { jsonl: { path: auditPath } },
  })
  const child = await startChild(['sidecar', '--config', file], /sidecar listening/, {
    LD_PRELOAD: join(dir, 'shim.so'),
    LK_HANG_PATH: auditPath,
    LK_HANG_FLAG: flag,
    // libuv's io_uring (off by default in Node 20) would write without write(2).
    UV_USE_IO_URING: '0',
  })
  t.teardown(async () => {
    rmSync(flag, { force: true })
    await child.kill('SIGKILL')
  })
  const port = Number(/"port":(\d+)/.exec(child.output())![1])
  const admin = `http://127.0.0.1:${/"adminPort":(\d+)/.exec(child.output())![1]}`
  return { auditPath, flag, up, child, port, admin }
}

t.test('a hung audit write: refused with the coded error and not ready within the bound, a bounded backlog, nothing lost once it completes', { skip: noCompiler }, async (t) => {
  const { auditPath, flag, up, child, port, admin } = await sidecarOnHungDisk(t)
  const c = new Client(`http://127.0.0.1:${port}`)
  t.teardown(() => c.close())
  const calls: { path: string; status: number; at: number; code?: string; reason?: string }[] = []
  const call = async (path: string) => {
    const r = await c.request({ method: 'GET', path: `/up${path}` })
    const body = await r.body.text()
    const parsed = r.statusCode === 200 ? {} : (JSON.parse(body) as { code?: string; reason?: string })
    calls.push({ path, status: r.statusCode, at: performance.now(), code: parsed.code, reason: parsed.reason })
    return r.statusCode
  }
  const scrape = async () => (await fetch(`${admin}/metrics`)).text()

  for (let i = 0; i < 5; i++) t.equal(await call(`/before-${i}`), 200)
  await sleep(100)
  const externalBefore = metric(await scrape(), 'latchkey_nodejs_external_memory_bytes')!

  // The disk hangs: the next append blocks in write(2) until the flag is gone.
  writeFileSync(flag, '')
  const hungAt = performance.now()
  // A call every ~10 ms for long enough to span the stall bound and ~150 flush windows.
  for (let i = 0; performance.now() - hungAt < STALL_MS + 1500; i++) {
    await call(`/hung-${i}`)
    await sleep(8)
  }
  const during = calls.filter((x) => x.path.startsWith('/hung-'))
  const firstRefused = during.findIndex((x) => x.status !== 200)
  t.ok(firstRefused > 0, 'calls are answered until the stall is noticed')
  t.ok(firstRefused >= 0 && during[firstRefused]!.at - hungAt < STALL_MS + 1000, `refused within the bound: ${firstRefused >= 0 ? Math.round(during[firstRefused]!.at - hungAt) : 'never'} ms after the disk hung (bound ${STALL_MS} ms)`)
  const after = firstRefused >= 0 ? during.slice(firstRefused) : []
  t.ok(after.length >= 20, `then refused: ${after.length} calls`)
  t.ok(
    after.every((x) => x.status === 503 && x.code === 'LK_AUDIT_UNAVAILABLE' && /audit file has not completed/.test(x.reason ?? '')),
    'every one a 503 LK_AUDIT_UNAVAILABLE naming the hung append',
  )
  const sentWhileHung = up.requests.length
  t.equal(await call('/while-hung'), 503)
  t.equal(up.requests.length, sentWhileHung, 'nothing more reaches the upstream')
  const ready = await fetch(`${admin}/readyz`)
  const readyBody = (await ready.json()) as { reasons?: string[] }
  t.equal(ready.status, 503, '/readyz is not ready')
  t.match(readyBody.reasons, [/audit file has not completed/])
  const metrics = await scrape()
  t.ok((metric(metrics, 'latchkey_audit_write_failures') ?? 0) >= 1, 'the audit failure metric counts it')
  const unwritten = metric(metrics, 'latchkey_audit_unwritten_bytes')
  t.ok(unwritten !== undefined && unwritten > 0 && unwritten < 1024 * 1024, `the backlog is what was encoded: ${unwritten} bytes for ${during.length + 1} events`)
  const grew = metric(metrics, 'latchkey_nodejs_external_memory_bytes')! - externalBefore
  t.ok(grew < 8 * 1024 * 1024, `external memory grew ${(grew / 1048576).toFixed(1)} MiB while hung (a 256 KiB buffer per flush window: ~${Math.round(((STALL_MS + 1500) / 20) * 0.25)} MiB)`)
  t.equal(child.output().match(/audit sink write failed/g)?.length, 1, 'one log line')
  t.match(child.output(), /"code":"LK_AUDIT_STALLED","path":"[^"]+","reason":"an append to the audit file has not completed in \d+ s[^"]*","msg":"audit sink write failed"/, 'naming the file and the stall')

  // The disk answers again: everything kept is written, in order, and calls succeed again.
  rmSync(flag)
  let readyAgain = 0
  for (let i = 0; i < 40 && readyAgain !== 200; i++) {
    await sleep(50)
    readyAgain = (await fetch(`${admin}/readyz`)).status
  }
  t.equal(readyAgain, 200, 'ready again once the append completes')
  t.equal(child.output().match(/"msg":"audit sink writes again: what was kept meanwhile is written"/g)?.length, 1, 'and says so, once')
  t.equal(await call('/after'), 200, 'calls succeed again')
  let recorded: string[] = []
  for (let i = 0; i < 40; i++) {
    recorded = existsSync(auditPath)
      ? readFileSync(auditPath, 'utf8')
          .split('\n')
          .filter(Boolean)
          .map((l) => (JSON.parse(l) as { path: string }).path.replace(/^\/up/, ''))
      : []
    if (recorded.at(-1) === '/after') break
    await sleep(50)
  }
  t.same(recorded, calls.map((x) => x.path), `every call's event is in the file, once, in order (${calls.length} calls)`)
})

t.test('SIGTERM while the audit disk hangs: the sidecar ends within the stall bound, by the signal, saying how many events are lost', { skip: noCompiler }, async (t) => {
  const { auditPath, flag, child, port } = await sidecarOnHungDisk(t, { timeouts: { drain_ms: 300 } })
  const c = new Client(`http://127.0.0.1:${port}`)
  const call = async (path: string) => {
    const r = await c.request({ method: 'GET', path: `/up${path}` })
    await r.body.text()
    return r.statusCode
  }
  t.equal(await call('/before'), 200)
  await sleep(200)
  // The disk hangs; three calls end while it does (their events wait behind the hung append).
  writeFileSync(flag, '')
  for (const p of ['/hung-0', '/hung-1', '/hung-2']) {
    t.equal(await call(p), 200)
    await sleep(60)
  }
  await c.close()
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>((resolve) => child.proc.once('exit', (code, signal) => resolve({ code, signal, at: performance.now() })))
  const signalled = performance.now()
  child.proc.kill('SIGTERM')
  const bound = 300 + STALL_MS + 3000
  const outcome = await Promise.race([exited, sleep(bound + 5000).then(() => null)])
  t.ok(outcome !== null, 'the process exits though the append never completes')
  if (outcome === null) return void t.comment(child.output().slice(-1500))
  t.ok(outcome.at - signalled < bound, `within drain_ms + the stall bound: ${Math.round(outcome.at - signalled)} ms (bound ${bound} ms)`)
  // process.exit would wait for the thread in the hung write for ever: ended by the signal it was sent.
  t.same([outcome.code, outcome.signal], [null, 'SIGTERM'], 'ended by SIGTERM, not exit 0: the shutdown did not complete cleanly')
  const said = /shutdown after SIGTERM failed: audit\.jsonl\.path \S+: an append has not completed in \d+ s \(a hung disk\?\); the sidecar stopped waiting for it at shutdown, and (\d+) audit event\(s\) not yet written are lost/.exec(child.output())
  t.ok(said, 'it says why on stderr, naming the setting and the loss')
  if (!said) t.comment(child.output().slice(-600))
  t.equal(Number(said?.[1]), 3, 'the three calls that ended while the disk hung are the ones counted lost')
  // Written before the disk hung: on disk, as it was.
  rmSync(flag, { force: true })
  const lines = readFileSync(auditPath, 'utf8').split('\n').filter(Boolean)
  t.same(lines.map((l) => (JSON.parse(l) as { path: string }).path), ['/before'], 'the event written before the hang is in the file, and only it')
})
