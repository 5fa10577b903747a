// The sidecar's local audit machinery on its own: the JSON-lines sink against a real file, call
// ids, and the list of live calls a revocation walks.
import t from 'tap'
import { closeSync, constants, mkdtempSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Socket } from 'node:net'
import { JsonlAuditSink } from '../proxy/audit/jsonl-sink.js'
import { newEventId } from '../proxy/audit/event-id.js'
import { isoTimestamp } from '../proxy/audit/event-time.js'
import { LiveCalls } from '../proxy/live-calls.js'
import type { AuditEvent, CallContext } from '../proxy/context.js'

function event(i: number, over: Partial<AuditEvent> = {}): AuditEvent {
  return {
    id: newEventId(),
    ts: new Date(1_800_000_000_000 + i).toISOString(),
    agent: 'agent:local:dev:0',
    task: null,
    user: null,
    via: 'absolute',
    method: 'GET',
    scheme: 'http',
    host: 'api.example.com',
    port: 80,
    path: `/v1/items/${i}`,
    destination: null,
    address: '93.184.216.34',
    status: 200,
    bytes_in: 0,
    bytes_out: i,
    duration_ms: 1.25,
    upstream_ms: 1.125,
    decision: 'allow',
    rule: 'api',
    reason: null,
    credential: { binding: 'api', id: 'static:api', audience: 'http://api.example.com:80', scopes: ['read'], token_sha256: undefined },
    error: null,
    caller: null,
    ...over,
  }
}

const lines = (path: string) =>
  readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as AuditEvent)

t.test('JSON lines: every event once, in order, across buffer rotations, text of any kind intact', async (t) => {
  const path = join(mkdtempSync(join(tmpdir(), 'lk-jsonl-')), 'audit.jsonl')
  const sink = new JsonlAuditSink(path, 5)
  // Multi-byte text, quotes, backslashes and newlines in the free-text fields: a line must stay one line.
  const awkward = 'déni "quoted" \\ back\nslash — ünïcødé 🔒 \u2028'
  // 3,000 events of ~600 bytes overflow the 256 KiB buffer several times; one event is bigger than a buffer.
  const huge = 'x'.repeat(300 * 1024)
  const written: AuditEvent[] = []
  for (let i = 0; i < 3000; i++) {
    const e = event(i, i % 7 === 0 ? { reason: awkward, path: `/ü/${i}` } : i === 1500 ? { reason: huge } : {})
    written.push(e)
    sink.write(e)
    if (i % 500 === 0) await new Promise((r) => setImmediate(r))
  }
  await sink.close()
  const read = lines(path)
  t.equal(read.length, written.length, 'one line per event')
  t.same(
    read.map((e) => e.id),
    written.map((e) => e.id),
    'in the order written',
  )
  t.same(read[7], JSON.parse(JSON.stringify(written[7])), 'multi-byte and escaped text round-trips')
  t.equal(read[1500]!.reason, huge, 'an event larger than a buffer is written whole')
  t.notOk('token_sha256' in read[1]!.credential!, 'no hash key where there is no hash')
})

t.test('JSON lines: events recorded while close() writes the last batch are kept, none after', async (t) => {
  const path = join(mkdtempSync(join(tmpdir(), 'lk-jsonl-')), 'audit.jsonl')
  const sink = new JsonlAuditSink(path, 5)
  sink.write(event(0))
  const closing = sink.close()
  // Calls cut by a shutdown finish while the sink is closing: a tick later, and a turn later.
  await Promise.resolve()
  sink.write(event(1))
  await new Promise((r) => setImmediate(r))
  sink.write(event(2))
  await closing
  sink.write(event(3))
  t.same(
    lines(path).map((e) => e.bytes_out),
    [0, 1, 2],
    'every event before close() resolved is on disk, in order',
  )
})

t.test('JSON lines: a last line cut short by an earlier run (a full disk, a crash) does not swallow the next event', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-jsonl-'))
  const path = join(dir, 'audit.jsonl')
  const whole = JSON.stringify(event(0))
  writeFileSync(path, `${whole}\n${whole.slice(0, 40)}`)
  const sink = new JsonlAuditSink(path, 5)
  sink.write(event(1))
  await sink.close()
  const text = readFileSync(path, 'utf8').split('\n')
  t.same(text.slice(0, 2), [whole, whole.slice(0, 40)], 'what was there is kept as it was')
  t.equal((JSON.parse(text[2]!) as AuditEvent).bytes_out, 1, 'the new event is a line of its own, that parses')
  t.equal(text.length, 4, 'and the file ends with a newline')
  // A file that ends well gets nothing added; an empty one neither.
  const again = new JsonlAuditSink(path, 5)
  again.write(event(2))
  await again.close()
  t.equal(readFileSync(path, 'utf8').split('\n').length, 5, 'no blank line after a whole one')
  const empty = join(dir, 'empty.jsonl')
  writeFileSync(empty, '')
  const fresh = new JsonlAuditSink(empty, 5)
  fresh.write(event(3))
  await fresh.close()
  t.ok(readFileSync(empty, 'utf8').startsWith('{"id":'), 'an empty file starts with the event')
  t.same(lines(empty).map((e) => e.bytes_out), [3])
})

t.test('JSON lines: events that could not be written make close() fail, saying how many', async (t) => {
  // /dev/full: every append fails with ENOSPC, as a full disk's does (and fsync with EINVAL).
  const errors: string[] = []
  const sink = new JsonlAuditSink('/dev/full', 5, (err) => errors.push(err.code ?? ''))
  for (let i = 0; i < 3; i++) sink.write(event(i))
  await new Promise((r) => setTimeout(r, 50))
  t.same(errors, ['ENOSPC'], 'the failing append is reported once')
  t.equal(sink.accepting(), false, 'and fails closed')
  await t.rejects(sink.close(), { code: 'LK_AUDIT_LOST', message: /^audit\.jsonl\.path \/dev\/full: 3 audit event\(s\) could not be written by shutdown and are lost \(ENOSPC\); nor could the file be synced to disk \(E[A-Z]+\)$/ })
  t.equal(sink.failures, 3, 'counted for the dropped-events metric too')
})

t.test('JSON lines: a write that hangs fails closed, holds a bounded backlog in one buffer, and loses nothing kept', async (t) => {
  // A real hung write(2): the audit path is a FIFO whose reader reads nothing until told, so
  // once its 64 KiB fill, the append blocks in the threadpool as on a hung disk.
  const path = join(mkdtempSync(join(tmpdir(), 'lk-jsonl-')), 'audit.fifo')
  execFileSync('mkfifo', [path])
  const reader = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK)
  t.teardown(() => closeSync(reader))
  const errors: string[] = []
  const sink = new JsonlAuditSink(path, 5, (err) => errors.push(`${err.code}: ${err.message}`), 300)
  const sent: AuditEvent[] = []
  const send = (e: AuditEvent) => {
    sent.push(e)
    sink.write(e)
  }
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
  // Past the pipe's capacity: this append blocks.
  for (let i = 0; i < 200; i++) send(event(i))
  await sleep(100)
  t.ok(sink.accepting(), 'accepting until the append has been outstanding for the stall bound')
  await sleep(400)
  t.notOk(sink.accepting(), 'refusing once it has not completed in the bound')
  t.match(sink.unavailableReason(), /an append to the audit file has not completed in \d+ s/)
  t.same(errors.length, 1, 'reported once')
  t.match(errors[0], /^LK_AUDIT_STALLED: /)

  // Many flush windows with an event each: appended into the buffer being filled, not a new buffer per window.
  const arrayBuffersBefore = process.memoryUsage().arrayBuffers
  const heldBefore = sink.unwrittenBytes
  for (let i = 200; i < 300; i++) {
    send(event(i, { error: 'LK_AUDIT_UNAVAILABLE', status: 503 }))
    await sleep(7)
  }
  const grew = process.memoryUsage().arrayBuffers - arrayBuffersBefore
  t.ok(grew < 4 * 1024 * 1024, `100 flush windows while hung: ${(grew / 1048576).toFixed(1)} MiB more array buffers (a 256 KiB buffer each would be 25 MiB)`)
  t.ok(sink.unwrittenBytes - heldBefore < 100 * 1024, `the backlog grew by what was encoded: ${sink.unwrittenBytes - heldBefore} bytes`)

  // Refusals past the budget are counted lost; a call that went out is still kept.
  const big = 'r'.repeat(4000)
  for (let i = 300; i < 5300; i++) {
    send(event(i, { error: 'LK_AUDIT_UNAVAILABLE', status: 503, reason: big }))
    if (i % 500 === 0) await new Promise((r) => setImmediate(r))
  }
  send(event(5300))
  await sleep(20)
  t.ok(sink.unwrittenBytes <= 16 * 1024 * 1024 + 8 * 1024, `the backlog stays within its budget: ${(sink.unwrittenBytes / 1048576).toFixed(2)} MiB`)
  const lost = sink.failures
  t.ok(lost > 0, `refusals past the budget counted lost: ${lost}`)
  t.notOk(sink.accepting())

  // Unhung: everything kept comes out, in order, and the sink accepts again.
  const got: string[] = []
  let rest = ''
  const chunk = Buffer.allocUnsafe(1024 * 1024)
  const want = sent.length - lost
  for (let tries = 0; got.length < want && tries < 2000; tries++) {
    let n = 0
    try {
      n = readSync(reader, chunk, 0, chunk.length, null)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err
    }
    if (n === 0) {
      await sleep(5)
      continue
    }
    const text = rest + chunk.toString('utf8', 0, n)
    const parts = text.split('\n')
    rest = parts.pop()!
    for (const l of parts) got.push((JSON.parse(l) as AuditEvent).id)
  }
  t.equal(got.length, want, 'every event kept is written')
  const keptIds = new Set(got)
  t.same(got, sent.map((e) => e.id).filter((id) => keptIds.has(id)), 'in the order written, each once')
  t.equal(got.at(-1), sent.at(-1)!.id, 'the call that went out after the budget was reached is kept')
  t.same(sent.slice(0, 300).map((e) => e.id), got.slice(0, 300), 'nothing before the budget was reached is lost')
  await sleep(20)
  t.ok(sink.accepting(), 'accepting again once the append completed')
  t.equal(sink.unwrittenBytes, 0, 'nothing left unwritten')
  // A FIFO cannot be fsynced: close() says so, after writing everything.
  await sink.close().catch(() => {})
})

t.test('call ids are version 4 UUIDs, distinct across batches', async (t) => {
  const seen = new Set<string>()
  for (let i = 0; i < 1000; i++) {
    const id = newEventId()
    if (!/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(id)) t.fail(`not a v4 UUID: ${id}`)
    seen.add(id)
  }
  t.equal(seen.size, 1000, 'no repeats over several 128-id batches')
})

t.test('event timestamps are what toISOString writes, across seconds, days and years, in any order', async (t) => {
  const at = [0, 999, 1000, 1_800_000_000_000, 1_800_000_000_999, 1_800_000_001_000, 1_799_999_999_999, Date.UTC(2026, 11, 31, 23, 59, 59, 999), Date.UTC(2027, 0, 1), 253402300799999]
  for (let i = 0; i < 2000; i++) at.push(1_800_000_000_000 + Math.floor(Math.random() * 5_000) * (i % 2 ? 1 : 997))
  let wrong = 0
  for (const ms of at) if (isoTimestamp(ms) !== new Date(ms).toISOString()) wrong++
  t.equal(wrong, 0, `${at.length} instants, the second's prefix reused and replaced`)
  // Outside 0000-9999 Date writes a signed six-digit year: handed to Date as it is.
  for (const ms of [-1, -1001, 253402300800000, 1.5]) t.equal(isoTimestamp(ms), new Date(ms).toISOString(), `epoch ms ${ms}`)
})

t.test('live calls: linked and unlinked in any order; a walk survives cutting as it goes', async (t) => {
  const live = new LiveCalls()
  const ctx = (n: number) => ({ n: String(n), liveSocket: null, livePrev: null, liveNext: null }) as unknown as CallContext
  const socket = (n: number) => ({ n }) as unknown as Socket
  const calls = [0, 1, 2, 3, 4].map(ctx)
  calls.forEach((c, i) => live.add(c, socket(i)))
  live.add(calls[2]!, socket(99))
  t.equal([...live.entries()].length, 5, 'adding a linked call again changes nothing')
  live.delete(calls[2]!)
  live.delete(calls[2]!)
  live.delete(calls[4]!) // the head
  live.delete(calls[0]!) // the tail
  t.equal([...live.entries()].length, 2)
  t.same(
    [...live.entries()].map(([c, s]) => [(c as unknown as { n: string }).n, (s as unknown as { n: number }).n]),
    [
      ['3', 3],
      ['1', 1],
    ],
  )
  for (const [c] of live.entries()) live.delete(c)
  t.equal([...live.entries()].length, 0)
  t.same([...live.entries()], [])
  t.equal(calls[3]!.liveSocket, null, 'an unlinked call keeps no socket')
})
