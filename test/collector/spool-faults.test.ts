// The audit spool when its disk fails it, for real: the spool lives on a small tmpfs that is
// filled (ENOSPC mid-record) or out of inodes (no new segment can be created). Needs root for
// mount(8), as CI runs; skipped, saying why, where mounting is not allowed.
import t, { type Test } from 'tap'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, rmSync, openSync, writeSync, closeSync, statSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Spool } from '../../proxy/audit/spool.js'
import { startUpstream, CANARY } from '../helpers/harness.js'
import { sidecarEvent, sidecarIdentity, startTestCollector, testSink } from './collector-helpers.js'
import { proxyAgent, startCollectedSidecar } from './sidecar-helpers.js'
import { request } from 'undici'

const canMount = ((): string | false => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-tmpfs-probe-'))
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4k', 'tmpfs', dir], { stdio: 'pipe' })
    execFileSync('umount', [dir], { stdio: 'pipe' })
    return false
  } catch {
    return 'mount(8) is not allowed here (it needs root): the disk faults cannot be made'
  }
})()

/** A tmpfs of its own, unmounted with the test. */
function tmpfs(t: { teardown(fn: () => unknown): void }, options: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'lk-tmpfs-'))
  execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir], { stdio: 'pipe' })
  t.teardown(() => execFileSync('umount', ['-l', dir], { stdio: 'pipe' }))
  return dir
}

/** Fills the file system holding `dir` to the last byte; returns the filler's path. */
function fill(dir: string): string {
  const path = join(dir, 'filler')
  const fd = openSync(path, 'w')
  const block = Buffer.alloc(4096)
  try {
    for (;;) writeSync(fd, block)
  } catch {
    // ENOSPC: full, down to the last block.
  }
  try {
    for (;;) writeSync(fd, block, 0, 1)
  } catch {
    // and the last byte.
  }
  closeSync(fd)
  return path
}

const payload = (seq: number) => Buffer.from(`event ${seq} `.padEnd(900, 'x'))

t.test('a disk that fills mid-record: the append fails whole, and every record after it is read back', { skip: canMount }, async (t) => {
  const dir = tmpfs(t, 'size=128k')
  const spool = new Spool(join(dir, 'spool'), 'sc-1', 1024 * 1024)
  t.teardown(() => spool.close())
  for (let i = 0; i < 10; i++) spool.append(1, payload)
  // Full to the last byte: the segment's last page still has room for part of a record, so the
  // append that fails is cut short mid-record first.
  const filler = fill(dir)
  const appended: number[] = []
  let failure: NodeJS.ErrnoException | null = null
  for (let i = 0; i < 20 && !failure; i++) {
    try {
      appended.push(spool.append(1, payload))
    } catch (err) {
      failure = err as NodeJS.ErrnoException
    }
  }
  t.equal(failure?.code, 'ENOSPC', `appends failed once the disk was full (after ${appended.length})`)
  const before = spool.next
  rmSync(filler)
  const after = [spool.append(1, payload), spool.append(1, payload)]
  t.same(after, [before, before + 1], 'the failed append used no sequence: the next ones follow on')
  const seg = readdirSync(join(dir, 'spool')).filter((n) => n.endsWith('.seg'))
  const onDisk = seg.reduce((n, name) => n + statSync(join(dir, 'spool', name)).size, 0)
  t.equal(onDisk, spool.bytes, 'no bytes of the failed record are left in the segment')
  const { records } = spool.read(spool.start(), 1000, 16 * 1024 * 1024, 0)
  t.same(
    records.map((r) => r.seq),
    Array.from({ length: spool.lastSeq }, (_, i) => i + 1),
    'every record that was appended reads back, in order, with no gap',
  )
  t.ok(records.at(-1)?.payload.toString().startsWith(`event ${spool.lastSeq} `), 'the last one is the last appended')
})

t.test('no inode for a new segment: appends go on in the active one, and nothing is closed twice', { skip: canMount }, async (t) => {
  // Inodes: the root, spool/, spool.lock, spool.json and the first segment; a rotation needs one more.
  const dir = tmpfs(t, 'size=4m,nr_inodes=5')
  const spool = new Spool(join(dir, 'spool'), 'sc-1', 4096)
  t.teardown(() => spool.close())
  let failures = 0
  for (let i = 0; i < 40; i++) {
    try {
      spool.append(1, payload)
    } catch {
      failures++
    }
  }
  t.equal(failures, 0, 'no append failed though no segment could be created')
  t.equal(readdirSync(join(dir, 'spool')).filter((n) => n.endsWith('.seg')).length, 1, 'one segment, grown past segment_bytes')
  // A descriptor opened now must not be closed by the spool behind its back.
  const mine = openSync('/dev/null', 'r')
  t.teardown(() => closeSync(mine))
  for (let i = 0; i < 10; i++) spool.append(1, payload)
  await new Promise((r) => setTimeout(r, 100))
  t.doesNotThrow(() => statSync('/dev/null') && writeFileSync('/dev/null', 'x'), 'the process works on')
  t.doesNotThrow(() => execFileSync('true'), 'and can still start a child')
  const { records } = spool.read(spool.start(), 1000, 16 * 1024 * 1024, 0)
  t.equal(records.length, 50, 'all 50 records read back')
})

/** A sidecar whose spool is on a 512 KiB tmpfs (fill() it), a collector, an upstream (`handler`, else its default answer) and an agent, torn down with the test. */
async function fullDiskRig(t: Test, handler?: NonNullable<Parameters<typeof startUpstream>[0]>['handler']) {
  const dir = tmpfs(t, 'size=512k')
  const upstream = await startUpstream(handler ? { handler } : {})
  t.teardown(() => upstream.close())
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const s = await startCollectedSidecar({ id, collector: c.grpcAddress, upstreamPort: upstream.port, spoolDir: join(dir, 'spool'), collectorOpts: { segment_bytes: 65536, spool_max_bytes: 262144 } })
  t.teardown(() => s.close())
  const agent = proxyAgent(s.sidecar.proxyUrl)
  t.teardown(() => agent.close())
  return { dir, upstream, c, s, agent }
}

t.test('a full disk under the collector sink refuses new egress (503) and loses nothing once it has room', { skip: canMount }, async (t) => {
  const { dir, upstream, c, s, agent } = await fullDiskRig(t)
  const get = async (path: string) => {
    const r = await request(`${upstream.origin}${path}`, { dispatcher: agent })
    return { status: r.statusCode, body: await r.body.text() }
  }
  for (let i = 0; i < 5; i++) t.equal((await get(`/before/${i}`)).status, 200)
  const filler = fill(dir)
  const during: { status: number; body: string }[] = []
  // A response cut short throws: status 0.
  for (let i = 0; i < 20; i++) during.push(await get(`/during/${i}`).catch((err: Error) => ({ status: 0, body: err.message })))
  // The segment's last page still took a few records. The call whose own event was the first
  // append to fail has its response cut short of its end (no agent holds a whole response the
  // trail may lose to a SIGKILL); every call after it is refused.
  const cutAt = during.findIndex((r) => r.status !== 200)
  t.ok(cutAt >= 0 && cutAt < 18, `an append failed (call ${cutAt})`)
  t.equal(during[cutAt]?.status, 0, `that call's response was cut short: ${during[cutAt]?.body}`)
  const first = during.findIndex((r) => r.status === 503)
  const refused = during.filter((r) => r.status === 503)
  t.equal(first, cutAt + 1, 'refusals began with the next call')
  t.equal(refused.length, during.length - first, 'and every call after it was refused too')
  t.match(JSON.parse(refused.at(-1)!.body), { code: 'LK_AUDIT_UNAVAILABLE', reason: /audit spool cannot be written \(ENOSPC\)/ })
  const readyz = await request(`${s.sidecar.adminUrl}/readyz`)
  t.equal(readyz.statusCode, 503)
  t.match(await readyz.body.text(), /ENOSPC/)
  const metrics = async () => (await (await request(`${s.sidecar.adminUrl}/metrics`)).body.text()).match(/^latchkey_audit_spool_unwritable (\d)$/m)?.[1]
  t.equal(await metrics(), '1', 'and /metrics, where alerts look')
  t.equal(upstream.requests.filter((r) => r.url.startsWith('/during/')).length, 20 - refused.length, 'nothing refused reached the upstream (the cut call did)')

  rmSync(filler)
  let back = 0
  for (let i = 0; i < 40 && back === 0; i++) {
    await new Promise((r) => setTimeout(r, 100))
    if ((await get(`/after/probe`)).status === 200) back = i
  }
  t.ok(back > 0, 'egress resumes once the spool can be written again (within the 1 s retry)')
  t.equal(await metrics(), '0', 'the gauge is down again')
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'the collector has everything spooled')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 10_000 })
  const paths = stored.map((e) => e.event.call?.path ?? '')
  for (let i = 0; i < 5; i++) t.ok(paths.includes(`/before/${i}`), `/before/${i} recorded`)
  for (let i = 0; i < 20; i++) t.ok(paths.includes(`/during/${i}`), `/during/${i} (refused) recorded`)
  t.equal(s.sink.stats.dropped, 0, 'no event dropped')
  t.same(stored.map((e) => e.sequence).sort((a, b) => a - b), Array.from({ length: stored.length }, (_, i) => i + 1), 'sequences 1..n, no gap')
  t.notOk(s.logs.some((l) => l.includes(CANARY)), 'no log line holds the credential')
})

t.test('a large response whose event the full disk refuses is not the agent whole: its last byte waits for the record', { skip: canMount }, async (t) => {
  const body = Buffer.alloc(300_000, 'y')
  const { dir, upstream, agent } = await fullDiskRig(t, (_req, res) => {
    res.writeHead(200, { 'content-length': body.length }).end(body)
    return true
  })
  const get = async (path: string) => {
    const r = await request(`${upstream.origin}${path}`, { dispatcher: agent })
    return { status: r.statusCode, length: (await r.body.arrayBuffer()).byteLength }
  }
  t.same(await get('/before'), { status: 200, length: body.length }, 'whole while the spool takes events')
  const filler = fill(dir)
  t.teardown(() => rmSync(filler, { force: true }))
  // The segment's last page may take a few more (long paths make each event a few KB, so not
  // many); the first call whose append fails is the one.
  const during: string[] = []
  for (let i = 0; i < 40 && !during.some((d) => d !== 'whole'); i++) {
    during.push(await get(`/during/${i}/${'p'.repeat(3000)}`).then((r) => (r.length === body.length ? 'whole' : `short: ${r.length}`), (err: Error) => `cut: ${err.message}`))
  }
  const first = during.findIndex((d) => d !== 'whole')
  t.ok(first >= 0, `a call's event failed to append (${JSON.stringify(during)})`)
  t.match(during[first], /^cut: /, 'and its 300 KB response was cut short of its end, not delivered whole (relayed before the upstream ended, it was)')
})

t.test('a segment past segment_bytes, every record acked, is retired: the spool empties', async (t) => {
  const spool = new Spool(join(mkdtempSync(join(tmpdir(), 'lk-retire-')), 'spool'), 'sc-1', 4096)
  t.teardown(() => spool.close())
  // One append of a backlog: 100 records in one segment, far past its 4 KiB.
  spool.append(100, payload)
  t.ok(spool.bytes > 80_000)
  spool.acknowledge(spool.lastSeq)
  t.equal(spool.bytes, 0, 'nothing held once all of it is acked')
  t.equal(spool.next, 101, 'and the sequence goes on')
})

/** A sink on `dir`, to a real collector, with small segments so acked ones are deleted as it goes. */
async function sinkOn(t: { teardown(fn: () => unknown): void }, dir: string, logs: string[]) {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const sink = testSink(id, c.grpcAddress, {
    spoolDir: join(dir, 'spool'),
    segmentBytes: 16 * 1024,
    closeTimeoutMs: 500,
    onLog: (_level, fields, msg) => logs.push(`${msg} ${JSON.stringify(fields)}`),
  })
  return { c, sink }
}

const auditEvent = (n: number, error: string | null = null) => sidecarEvent(n, { path: `/call/${n}/${'x'.repeat(200)}`, status: error ? 503 : 200, error })

t.test('a backlog larger than the room freed goes in as room allows, and all of it arrives', { skip: canMount }, async (t) => {
  const dir = tmpfs(t, 'size=256k')
  const logs: string[] = []
  const { sink } = await sinkOn(t, dir, logs)
  t.teardown(() => sink.close())
  const filler = fill(dir)
  for (let n = 1; n <= 3000; n++) sink.write(auditEvent(n, n % 100 === 0 ? null : 'LK_AUDIT_UNAVAILABLE'))
  t.equal(sink.accepting(), false, 'refusing while the spool cannot be written')
  rmSync(filler)
  // ~900 KB waiting, 256 KiB of disk: it fits only as the collector acks and segments go.
  t.ok(await sink.waitForAck(3000, 20_000), 'every event acked in the end')
  t.equal(sink.accepting(), true, 'and egress allowed again')
  t.equal(sink.stats.dropped, 0)
})

t.test('past the events kept in memory, refusals are let go first: a call that went out is kept', { skip: canMount }, async (t) => {
  const dir = tmpfs(t, 'size=8m')
  const logs: string[] = []
  const { c, sink } = await sinkOn(t, dir, logs)
  t.teardown(() => sink.close())
  const filler = fill(dir)
  sink.write(auditEvent(1, 'LK_AUDIT_UNAVAILABLE'))
  for (let n = 2; n <= 20_500; n++) sink.write(auditEvent(n, 'LK_AUDIT_UNAVAILABLE'))
  sink.write(auditEvent(20_501)) // a call that went out, its record late (a long download)
  rmSync(filler)
  t.ok(await sink.waitForAck(20_001, 30_000), '20,001 acked: the 20,000 kept in memory and the call that went out')
  const stored = await c.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), limit: 100_000 })
  t.ok(stored.some((e) => e.event.call?.path.startsWith('/call/20501/')), 'the call that went out is in the collector')
  t.equal(sink.stats.dropped, 500, 'what was let go is the 500 refusals past the 20,000, counted')
  await t.resolves(sink.close(), 'refusals let go by design, and counted then, do not fail the shutdown')
})

t.test('stopping while the spool cannot be written says how many events are lost', { skip: canMount }, async (t) => {
  const dir = tmpfs(t, 'size=256k')
  const logs: string[] = []
  const { sink } = await sinkOn(t, dir, logs)
  fill(dir)
  for (let n = 1; n <= 12; n++) sink.write(auditEvent(n, n > 9 ? 'LK_AUDIT_UNAVAILABLE' : null))
  await t.rejects(sink.close(), { code: 'LK_AUDIT_LOST', message: /^audit\.collector\.spool_dir \S+: 12 audit event\(s\) could not be spooled by shutdown and are lost \(ENOSPC\)$/ }, 'the shutdown fails, saying so')
  t.match(logs.find((l) => l.startsWith('audit events lost at shutdown')), /"lost":12,"calls":9,"refused_for_audit":3,"code":"ENOSPC"/, 'logged with the count, the calls among them, and why')
  t.equal(sink.stats.dropped, 12)
})
