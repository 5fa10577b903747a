// The first AuditSink: JSON lines appended to a local file, with no I/O on the request path.
//   write():   pushes the event (the request path stops here);
//   encode():  once per event-loop turn, serializes the turn's events in one tight loop into an
//              off-heap buffer (cache-friendly, and nothing lingers on the V8 heap to be promoted);
//   flush():   every flush_ms, one append of everything encoded, in order.
// Fail closed: while appends fail (disk full, the directory gone), or one has not completed in
// STALL_MS (a hung disk), accepting() is false, so the pipeline refuses new egress (503
// LK_AUDIT_UNAVAILABLE) and /readyz says why. One append is under way at a time: what is encoded
// meanwhile waits in the buffer being filled (no buffer per flush window), and everything not yet
// written (waiting, being written, or kept from a failed append) is bounded by MAX_UNWRITTEN;
// past half of it new egress is refused too. It is written, in order, when appends work again.
// A file moved or deleted (log rotation) is noticed within a second, or at reopen() (SIGHUP),
// and the path opened anew.
// Lines are plain JSON.stringify: V8 writes them natively in one pass, with less than half the
// garbage of a schema-compiled serializer (1.8 KB against 3.9 KB per event, measured), and an
// event carries nothing extra to leak because Pipeline.finish builds it field by field.
import { openSync, write, fsync, closeSync, fstatSync, statSync, readSync, type Stats } from 'node:fs'
import type { AuditEvent, AuditSink } from '../context.js'
import { markStuck, unmarkStuck } from '../../lib/stuck-io.js'

// 20 ms of a busy sidecar's events fit several times over; buffers are reused, never churned.
const CHUNK = 256 * 1024
/**
 * Bytes encoded but not yet written (waiting while an append is slow, hung or failing); beyond
 * it, refusals for want of audit are counted lost, and beyond twice it every event. The calls
 * that went out fit: past ADMIT_BELOW no new egress is admitted, so only those under way end.
 */
const MAX_UNWRITTEN = 16 * 1024 * 1024
/** Past this much not yet written, new egress is refused: appends are not keeping up. */
const ADMIT_BELOW = MAX_UNWRITTEN / 2
/** An append outstanding this long is taken for a hung disk, and fails closed like a failing one until it completes. */
export const STALL_MS = 2000
/** How soon appends that failed are tried again when nothing new comes to be written. */
const RETRY_MS = 1000
const EMPTY = Buffer.alloc(0)
/** How often the path is checked for having been moved or deleted under the sidecar. */
const ROTATION_CHECK_MS = 1000

interface Batch {
  buffer: Buffer
  used: number
  lines: number
}

export class JsonlAuditSink implements AuditSink {
  private fd: number
  /** Batches whose append failed, in order, written first once appends work again. */
  private readonly unwritten: { data: Buffer; lines: number }[] = []
  /** Full buffers waiting for the append under way to complete, in order. */
  private readonly queued: Batch[] = []
  /** Bytes encoded and not yet written: the buffer being filled, queued, being written, unwritten. */
  private held = 0
  /** Set while one append (the writer) is under way; the next waits for it. */
  private writing = false
  /** Events in the batch being appended now (lost with it if close gives up on a hung append). */
  private writingLines = 0
  /** A flush came while the writer was busy: it takes the buffer being filled when done. */
  private flushWanted = false
  /** performance.now() when the write(2) under way began; 0 while none is. */
  private writeStarted = 0
  /** The write under way is outstanding past stallMs: marked stuck (lib/stuck-io.ts) until it completes. */
  private writeStuck = false
  private stallTimer: NodeJS.Timeout | null = null
  /** Set while appends fail: the error of the last one. */
  private failing: NodeJS.ErrnoException | null = null
  private checkedPathAt = 0
  private retryTimer: NodeJS.Timeout | null = null
  private events: AuditEvent[] = []
  private encodeScheduled = false
  private buffer: Buffer = Buffer.allocUnsafe(CHUNK)
  /** Buffers whose append has completed, ready for reuse. */
  private readonly spare: Buffer[] = []
  private used = 0
  private timer: NodeJS.Timeout | null = null
  private inFlight: Promise<void> = Promise.resolve()
  private closed = false
  /** Count of events that could not be written; exposed as a metric. */
  failures = 0
  private lines = 0

  constructor(
    readonly path: string,
    private readonly flushMs: number,
    private readonly onError: (err: NodeJS.ErrnoException) => void = () => {},
    private readonly stallMs = STALL_MS,
    /** Appends work again after failing (onError said when they began to): everything kept is written. */
    private readonly onRecovered: () => void = () => {},
  ) {
    this.fd = this.open()
  }

  /**
   * Opens the path for appending (read too, for its last byte). A file whose last line was cut
   * short (a full disk or a crash mid-append in an earlier run) gets a newline before the next
   * event, so that event is a line of its own, not joined to the fragment where no parser reads
   * it. The newline goes first among what is unwritten: retried as any append is.
   */
  private open(): number {
    const fd = openSync(this.path, 'a+', 0o600)
    try {
      const size = fstatSync(fd).size
      const last = Buffer.alloc(1)
      if (size > 0 && readSync(fd, last, 0, 1, size - 1) === 1 && last[0] !== 0x0a) {
        this.unwritten.unshift({ data: Buffer.from('\n'), lines: 0 })
        this.held += 1
      }
    } catch (err) {
      closeSync(fd)
      throw err
    }
    return fd
  }

  write(event: AuditEvent): void {
    if (this.closed) return
    this.events.push(event)
    if (!this.encodeScheduled) {
      this.encodeScheduled = true
      setImmediate(() => this.encode())
    }
  }

  private encode(): void {
    this.encodeScheduled = false
    const events = this.events
    if (events.length === 0) return
    this.events = []
    for (const e of events) {
      // Appends hung or failing this long: counted lost, never held without bound. A call that
      // went out is kept to twice the budget (new egress stopped at half of it).
      if (this.held >= MAX_UNWRITTEN && (e.error === 'LK_AUDIT_UNAVAILABLE' || this.held >= 2 * MAX_UNWRITTEN)) {
        this.failures++
        continue
      }
      const json = JSON.stringify(e)
      // Room for the worst case (3 UTF-8 bytes per UTF-16 unit, and the newline) is checked
      // instead of measuring each line: no second pass over it, no joined copy with its '\n'.
      const most = json.length * 3 + 1
      if (this.used + most > this.buffer.length) this.grow(most)
      const n = this.buffer.write(json, this.used) + 1
      this.buffer[this.used + n - 1] = 0x0a
      this.used += n
      this.held += n
      this.lines++
    }
    if (!this.timer) this.timer = setTimeout(() => void this.flush(), this.flushMs)
  }

  /** Queues the filled buffer for the writer and starts a fresh one big enough for `need`. */
  private grow(need: number): void {
    if (this.used > 0) {
      this.queued.push({ buffer: this.buffer, used: this.used, lines: this.lines })
      this.used = 0
      this.lines = 0
    } else if (this.buffer.length === CHUNK && this.spare.length < 2) this.spare.push(this.buffer)
    this.buffer = need <= CHUNK ? this.nextBuffer() : Buffer.allocUnsafe(need)
    this.startWriter()
  }

  /** The buffer being filled, handed over (it is not touched again until its append completes); a fresh one in its place. */
  private take(): Batch {
    const batch = { buffer: this.buffer, used: this.used, lines: this.lines }
    this.buffer = this.nextBuffer()
    this.used = 0
    this.lines = 0
    return batch
  }

  /**
   * Appends everything encoded. While an append is under way nothing new is started: the writer
   * takes what was encoded meanwhile when it is done. Resolves once that is written (or kept).
   */
  flush(): Promise<void> {
    if (this.timer) {
      clearTimeout(this.timer)
      this.timer = null
    }
    this.encode()
    if (this.used > 0) this.flushWanted = true
    if (this.flushWanted || this.queued.length > 0) this.startWriter()
    return this.inFlight
  }

  private nextBuffer(): Buffer {
    return this.spare.pop() ?? Buffer.allocUnsafe(CHUNK)
  }

  /** False while appends fail, hang or fall behind: the pipeline refuses new egress rather than make calls it cannot record. */
  accepting(): boolean {
    return this.failing === null && this.held < ADMIT_BELOW
  }

  unavailableReason(): string {
    if (this.failing?.code === 'LK_AUDIT_STALLED') return `${this.failing.message}; no new egress until it does`
    if (this.failing) return `the audit file cannot be written (${this.failing.code ?? 'error'}); no new egress until it can`
    return `appends to the audit file are ${Math.round(this.held / 1024)} KiB behind; no new egress until they catch up`
  }

  /** Bytes encoded and not yet written (a metric: it grows while appends are slow, hung or failing). */
  get unwrittenBytes(): number {
    return this.held
  }

  /** Opens the path anew on the next append (SIGHUP, after the file was rotated). */
  reopen(): void {
    this.checkedPathAt = 0
  }

  private startWriter(): void {
    if (this.writing) return
    this.writing = true
    this.inFlight = this.run()
  }

  /**
   * The writer: one append at a time, so batches land in order. It goes on with what queued up
   * meanwhile, and stops when an append fails (the retry, or the next flush, starts it again).
   */
  private async run(): Promise<void> {
    try {
      do {
        let next = this.queued.shift() ?? null
        if (!next && this.flushWanted && this.used > 0) {
          this.flushWanted = false
          next = this.take()
        }
        this.writingLines = next?.lines ?? 0
        await this.append(next)
        this.writingLines = 0
      } while (this.unwritten.length === 0 && (this.queued.length > 0 || (this.flushWanted && this.used > 0)))
    } finally {
      this.writing = false
    }
  }

  /** What failed before, then `batch` (none: only what failed); a standard-size buffer is reused afterwards. */
  private async append(batch: Batch | null): Promise<void> {
    const data = batch ? batch.buffer.subarray(0, batch.used) : EMPTY
    // The path no longer reaching a file that can be opened: nothing is written to the old one.
    const reachable = this.reopenIfMoved()
    // What failed before goes first: the file keeps the order calls ended in.
    while (reachable && this.unwritten.length > 0) {
      const first = this.unwritten[0]!
      const n = await this.writeAll(first.data)
      this.held -= n
      if (n < first.data.length) {
        first.data = first.data.subarray(n)
        break
      }
      this.unwritten.shift()
    }
    const n = reachable && this.unwritten.length === 0 ? await this.writeAll(data) : 0
    this.held -= n
    if (n < data.length) this.keep(data.subarray(n), batch?.lines ?? 0)
    else if (this.unwritten.length === 0 && this.failing) {
      this.failing = null
      this.onRecovered()
    }
    if (batch && batch.buffer.length === CHUNK && this.spare.length < 2) this.spare.push(batch.buffer)
    // With nothing new to write (no traffic: egress is refused meanwhile), tried again anyway.
    if (this.unwritten.length > 0 && !this.retryTimer && !this.closed) {
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null
        this.startWriter()
      }, RETRY_MS)
      this.retryTimer.unref()
    }
  }

  /**
   * A write outstanding for stallMs is reported once and fails closed until it completes. One
   * timer at a time, armed as a write starts when none is, and again for what is left of stallMs.
   */
  private watchStall(): void {
    if (this.stallTimer) return
    this.stallTimer = setTimeout(() => {
      this.stallTimer = null
      if (this.writeStarted === 0 || this.closed) return
      const age = performance.now() - this.writeStarted
      if (age < this.stallMs) return this.watchStall()
      this.markWriteStuck()
      this.fail(Object.assign(new Error(`an append to the audit file has not completed in ${Math.round(age / 1000)} s (a hung disk?)`), { code: 'LK_AUDIT_STALLED' }))
    }, this.writeStarted === 0 ? this.stallMs : Math.max(1, this.stallMs - (performance.now() - this.writeStarted)))
    this.stallTimer.unref()
  }

  /** Writes `data` at the end of the file; resolves with how many bytes were written (short on an error). */
  private writeAll(data: Buffer): Promise<number> {
    return new Promise((resolve) => {
      const from = (offset: number) => {
        this.writeStarted = performance.now()
        this.watchStall()
        write(this.fd, data, offset, data.length - offset, null, (err, n) => {
          this.writeStarted = 0
          if (this.writeStuck) {
            this.writeStuck = false
            unmarkStuck()
          }
          if (err) {
            this.fail(err)
            return resolve(offset)
          }
          if (offset + n < data.length) return from(offset + n)
          resolve(data.length)
        })
      }
      from(0)
    })
  }

  /** A thread of the pool is in the hung write: the shutdown must not wait on it (lib/stuck-io.ts). */
  private markWriteStuck(): void {
    if (this.writeStuck) return
    this.writeStuck = true
    markStuck()
  }

  private fail(err: NodeJS.ErrnoException): void {
    // Reported once as appends start failing, not at every retry.
    if (this.failing === null) this.onError(err)
    this.failing = err
  }

  /** Keeps a batch that could not be written (a copy: its buffer is reused). It is within MAX_UNWRITTEN: encode() stopped taking refusals past it. */
  private keep(data: Buffer, lines: number): void {
    this.unwritten.push({ data: Buffer.from(data), lines })
  }

  /**
   * Rotation: the file at the path is no longer the one open (moved, deleted): open the path
   * anew. False when that fails (its directory gone): checked again at the next append.
   */
  private reopenIfMoved(): boolean {
    const now = Date.now()
    if (now - this.checkedPathAt < ROTATION_CHECK_MS) return true
    this.checkedPathAt = now
    try {
      const open = fstatSync(this.fd)
      let current: Stats | null = null
      try {
        current = statSync(this.path)
      } catch {
        // Gone: opened anew below.
      }
      if (current && current.ino === open.ino && current.dev === open.dev) return true
      // A FIFO put at the path would block the open, and the event loop with it, until a reader came.
      if (current && (current.isFIFO() || current.isSocket() || current.isDirectory())) {
        throw Object.assign(new Error('the audit path is not a file'), { code: 'ENOTFILE' })
      }
      const fd = this.open()
      closeSync(this.fd)
      this.fd = fd
      return true
    } catch (err) {
      this.fail(err as NodeJS.ErrnoException)
      this.checkedPathAt = 0
      return false
    }
  }

  /**
   * Writes everything encoded, syncs and closes. On a hung disk it does not wait forever: once an
   * append has been outstanding stallMs (the bound past which the sink already fails closed), or
   * the sync takes that long, it stops waiting and rejects saying how many events were not
   * written, so a SIGTERM ends the process with that said instead of hanging until a SIGKILL says
   * nothing. The descriptor of a hung append is left open: the write may still land.
   */
  async close(): Promise<void> {
    if (this.closed) return
    // Calls that end while the last batch is being written (those cut by the shutdown) are
    // recorded then: write until a flush finds nothing new, and only then stop taking events.
    // The flush timer may append a batch while one is awaited here: the file is closed only once
    // the last append started is done, or that batch would be written to a closed descriptor.
    let written: Promise<void>
    do {
      written = this.flush()
      if (!(await this.settlesUnlessHung(written))) {
        const lost = this.unwrittenEvents()
        this.markWriteStuck()
        this.stopTaking()
        this.failures += lost
        const age = Math.round((performance.now() - this.writeStarted) / 1000)
        throw Object.assign(new Error(`audit.jsonl.path ${this.path}: an append has not completed in ${age} s (a hung disk?); the sidecar stopped waiting for it at shutdown, and ${lost} audit event(s) not yet written are lost`), { code: 'LK_AUDIT_STALLED' })
      }
    } while (this.events.length > 0 || this.used > 0 || this.queued.length > 0 || this.inFlight !== written)
    this.stopTaking()
    // Still failing at the end: what could not be written is lost, and counted.
    let lostNow = 0
    for (const u of this.unwritten.splice(0)) {
      lostNow += u.lines
      this.held -= u.data.length
    }
    this.failures += lostNow
    const failing = this.failing
    let unsynced: string | null = null
    try {
      await this.syncUnlessHung()
      closeSync(this.fd)
    } catch (err) {
      // A sync still under way keeps its descriptor.
      const code = (err as NodeJS.ErrnoException).code ?? 'error'
      if (code !== 'ETIMEDOUT') closeSync(this.fd)
      unsynced = code === 'ETIMEDOUT' ? `it had not completed in ${Math.round(this.stallMs / 1000)} s` : code
    }
    // Events still unwritten at shutdown do not end the run as if they had been: said once, with
    // the count, and the shutdown fails (exit 1) instead of ending 0 after "sidecar stopped". Said
    // in one line naming the setting, as a failed sync is. (Refusals let go past the budget while
    // running were dropped by design, logged and counted then.)
    if (lostNow > 0) {
      const earlier = this.failures - lostNow
      throw Object.assign(new Error(`audit.jsonl.path ${this.path}: ${lostNow} audit event(s) could not be written by shutdown and are lost (${failing?.code ?? 'error'})${earlier > 0 ? `, besides ${earlier} dropped while appends failed` : ''}${unsynced ? `; nor could the file be synced to disk (${unsynced})` : ''}`), { code: 'LK_AUDIT_LOST' })
    }
    if (unsynced) throw Object.assign(new Error(`audit.jsonl.path ${this.path}: cannot be synced to disk at close (${unsynced}): the last events written may be lost`), { code: 'LK_AUDIT_SYNC' })
  }

  private stopTaking(): void {
    this.closed = true
    if (this.timer) clearTimeout(this.timer)
    if (this.retryTimer) clearTimeout(this.retryTimer)
    if (this.stallTimer) clearTimeout(this.stallTimer)
  }

  /** Events taken and not (yet) written: waiting, encoded, queued, being appended, kept from a failed append. */
  private unwrittenEvents(): number {
    let n = this.events.length + this.lines + this.writingLines
    for (const q of this.queued) n += q.lines
    for (const u of this.unwritten) n += u.lines
    return n
  }

  /** True once `p` settles; false if, before it does, the append under way has been outstanding stallMs. */
  private settlesUnlessHung(p: Promise<void>): Promise<boolean> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | null = null
      const check = () => {
        const age = this.writeStarted === 0 ? 0 : performance.now() - this.writeStarted
        if (this.writeStarted !== 0 && age >= this.stallMs) return resolve(false)
        timer = setTimeout(check, Math.max(1, this.stallMs - age))
      }
      void p.then(() => {
        if (timer) clearTimeout(timer)
        resolve(true)
      })
      check()
    })
  }

  /** fsync(2) off the event loop, given up (rejecting ETIMEDOUT) after stallMs: a hung disk hangs the sync too. */
  private syncUnlessHung(): Promise<void> {
    return new Promise((resolve, reject) => {
      let stuck = false
      const timer = setTimeout(() => {
        stuck = true
        markStuck()
        reject(Object.assign(new Error('fsync timed out'), { code: 'ETIMEDOUT' }))
      }, this.stallMs)
      fsync(this.fd, (err) => {
        clearTimeout(timer)
        if (stuck) return unmarkStuck()
        if (err) reject(err)
        else resolve()
      })
    })
  }
}
