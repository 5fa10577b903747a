// The sidecar's local audit spool: append-only segment files in one directory, each record
//   u32le payload length | u32le CRC-32 of (seq ‖ payload) | u64le sequence | payload
// where payload is the encoded latchkey.v1.SequencedEvent. Segments are named by the first
// sequence they may hold, so the sequence survives restarts even when every record was acked
// and deleted (the newest segment is never deleted).
//
// Recovery (open): every segment is scanned. A torn record at the end of the newest segment (a
// crash mid-append) is cut off, and the records before it kept. A damaged record elsewhere is
// skipped by scanning forward for the next record whose checksum holds and whose sequence
// follows; what was skipped is counted, never silently.
import { close, closeSync, fdatasync, fdatasyncSync, fstatSync, fsyncSync, ftruncateSync, mkdirSync, renameSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, writeSync, writeFileSync, existsSync } from 'node:fs'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { lockSpoolDir, type SpoolLock } from './spool-lock.js'
import { readFailure, readSettingText } from '../../lib/bounded-read.js'

const HEADER = 16
const MAX_RECORD = 16 * 1024 * 1024
const NAME = /^(\d{16})\.seg$/

export interface SpoolRecord {
  seq: number
  payload: Buffer
}

interface Segment {
  first: number
  path: string
  /** Highest sequence stored (0 when empty). */
  last: number
  /** Bytes of valid records; reads never go past it. */
  size: number
  /** Damaged ranges found on recovery: start offset → offset of the next good record. */
  holes: Map<number, number>
}

export interface Cursor {
  segment: number
  offset: number
  /** The highest sequence read in `segment` so far: what a stretch found gone there lost comes after. */
  seq?: number
}

export interface RecoveryReport {
  segments: number
  records: number
  /** Bytes cut from the end of the newest segment (a torn append). */
  tornBytes: number
  /** Bytes skipped inside segments because a record failed its checksum. */
  corruptBytes: number
  /** The segment files those bytes were skipped in (the operator's next question). */
  damaged: string[]
}

/** A segment found deleted or cut short under the running spool: rewritten from what it still held, or passed over. */
export interface SegmentRepair {
  path: string
  cause: 'deleted' | 'cut short' | 'written to by another process'
  /** Records read back and kept. */
  kept: number
  /** Sequences the segment had been given that are no longer in it (some may be acked already). */
  lost: number[]
  /** Rewritten under its name (the active segment: offsets moved, reads start over); else passed over (an older one, gone). */
  rewritten: boolean
}

export class SpoolError extends Error {
  readonly code = 'LK_SPOOL'
}

/** The sidecar a spool belongs to, read from its spool.json; unreadable is said with the file's path. */
function readOwner(meta: string): string | undefined {
  let parsed: unknown
  try {
    parsed = JSON.parse(readSettingText(meta))
  } catch (err) {
    throw new SpoolError(`${meta} cannot be read (${readFailure(err)}): it names the sidecar this spool belongs to; if the spool holds nothing to keep, delete the directory`)
  }
  const owner = (parsed as { sidecar?: unknown } | null)?.sidecar
  if (typeof owner !== 'string') throw new SpoolError(`${meta} names no sidecar ("sidecar" missing or not a string); if the spool holds nothing to keep, delete the directory`)
  return owner
}

function recordCrc(seq: Buffer, payload: Uint8Array): number {
  return crc32(payload, crc32(seq))
}

export function encodeRecord(seq: number, payload: Uint8Array, out: Buffer, at: number): number {
  out.writeUInt32LE(payload.length, at)
  out.writeBigUInt64LE(BigInt(seq), at + 8)
  out.writeUInt32LE(recordCrc(out.subarray(at + 8, at + 16), payload), at + 4)
  out.set(payload, at + HEADER)
  return at + HEADER + payload.length
}

/** Parses the valid record at `at`, or null. */
function parseRecord(buf: Buffer, at: number, end: number, after: number): SpoolRecord | null {
  if (at + HEADER > end) return null
  const len = buf.readUInt32LE(at)
  if (len > MAX_RECORD || at + HEADER + len > end) return null
  const seq = Number(buf.readBigUInt64LE(at + 8))
  if (!Number.isSafeInteger(seq) || seq <= after) return null
  const payload = buf.subarray(at + HEADER, at + HEADER + len)
  if (recordCrc(buf.subarray(at + 8, at + 16), payload) !== buf.readUInt32LE(at + 4)) return null
  return { seq, payload }
}

/**
 * The valid records in a segment's bytes, in order, each with a sequence above the one before
 * (the first above `after`). A damaged stretch is skipped by scanning for the next record that
 * checks out; what follows the last valid record is not (a torn tail, or damage to the end).
 */
function scanRecords(data: Buffer, after: number): { records: Array<{ at: number; end: number; seq: number }>; holes: Map<number, number>; validEnd: number; skipped: number } {
  const records: Array<{ at: number; end: number; seq: number }> = []
  const holes = new Map<number, number>()
  let at = 0
  let validEnd = 0
  let skipped = 0
  while (at < data.length) {
    const r = parseRecord(data, at, data.length, after)
    if (r) {
      const end = at + HEADER + r.payload.length
      records.push({ at, end, seq: r.seq })
      after = r.seq
      at = validEnd = end
      continue
    }
    // Damaged or torn: find the next record that checks out; else the rest is lost.
    let next = at + 1
    while (next < data.length && !parseRecord(data, next, data.length, after)) next++
    if (next >= data.length) break
    skipped += next - at
    holes.set(at, next)
    at = next
  }
  return { records, holes, validEnd, skipped }
}

export class Spool {
  private segments: Segment[] = []
  private fd = -1
  private nextSeq = 1
  /**
   * Highest sequence known to be on disk (fdatasync done). Only these are sent: the collector
   * then never holds a sequence a power loss could take from the spool, which would make the
   * restarted sidecar number new events with sequences the collector already has (refused, for
   * ever). Raised by syncAsync() and sync().
   */
  syncedSeq = 0
  /** The rotated-out segments' fdatasyncs, when under way: a sync is complete only after them. */
  private retiring: Promise<void> = Promise.resolve()
  readonly recovery: RecoveryReport = { segments: 0, records: 0, tornBytes: 0, corruptBytes: 0, damaged: [] }
  private buf = Buffer.allocUnsafe(256 * 1024)
  /** The reader's open segment (the sender reads forward through one segment at a time). */
  private reader: { first: number; fd: number } | null = null
  /** Reused by read(): sized for a sender's batch (1 MiB) and its last record's overhang. */
  private readonly readBuf = Buffer.allocUnsafe(2 * 1024 * 1024 + 64 * 1024)

  /** Held until close(): see spool-lock.ts. */
  private readonly lock: SpoolLock

  constructor(
    readonly dir: string,
    readonly sidecarId: string,
    private readonly segmentBytes: number,
  ) {
    mkdirSync(dir, { recursive: true, mode: 0o700 })
    this.lock = lockSpoolDir(dir, (path) => new SpoolError(`spool ${dir} is in use by another sidecar (${path} is locked): two processes appending to one spool corrupt it; give each sidecar its own spool_dir`))
    try {
      const meta = join(dir, 'spool.json')
      if (existsSync(meta)) {
        const owner = readOwner(meta)
        if (owner !== sidecarId) {
          throw new SpoolError(`spool ${dir} belongs to sidecar "${owner}", not "${sidecarId}": sequences would collide; give each sidecar its own spool_dir`)
        }
      } else {
        // Written whole or not at all: a crash mid-write must not leave an empty spool.json that
        // stops the next start.
        const tmp = `${meta}.tmp`
        writeFileSync(tmp, JSON.stringify({ sidecar: sidecarId }) + '\n', { mode: 0o600 })
        const fd = openSync(tmp, 'r')
        fsyncSync(fd)
        closeSync(fd)
        renameSync(tmp, meta)
      }
      this.recover()
    } catch (err) {
      // Refused or unreadable: the directory is free for whoever comes next.
      this.lock.release()
      throw err
    }
  }

  private recover(): void {
    const names = readdirSync(this.dir)
      .map((n) => NAME.exec(n))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({ first: Number(m[1]), path: join(this.dir, m[0]) }))
      .sort((a, b) => a.first - b.first)
    let after = 0
    names.forEach((n, i) => {
      const data = readFileSync(n.path)
      const newest = i === names.length - 1
      const { records, holes, validEnd, skipped } = scanRecords(data, Math.max(after, n.first - 1))
      const count = records.length
      const last = count > 0 ? records[count - 1]!.seq : 0
      if (count > 0) after = last
      this.recovery.corruptBytes += skipped
      const tail = data.length - validEnd
      if (tail > 0) {
        if (newest) {
          // The append that was in progress when the process died: cut it so new appends follow valid data.
          const fd = openSync(n.path, 'r+')
          ftruncateSync(fd, validEnd)
          closeSync(fd)
          this.recovery.tornBytes += tail
        } else this.recovery.corruptBytes += tail
      }
      if (holes.size > 0 || (tail > 0 && !newest)) this.recovery.damaged.push(n.path)
      this.recovery.records += count
      this.segments.push({ first: n.first, path: n.path, last, size: validEnd, holes })
    })
    this.recovery.segments = this.segments.length
    const newest = this.segments[this.segments.length - 1]
    this.nextSeq = Math.max(after + 1, newest ? newest.first : 1)
    // What a previous run left may still be only in the page cache (it was killed, the machine
    // was not): on disk before any of it is sent.
    for (const s of this.segments) {
      const fd = openSync(s.path, 'r')
      fdatasyncSync(fd)
      closeSync(fd)
    }
    this.syncedSeq = after
    if (newest) {
      // Compacting a damaged file would rewrite history; appends go to a fresh segment instead.
      this.fd = openSync(newest.path, 'a+', 0o600)
      if (statSync(newest.path).size !== newest.size) this.rotate()
    } else this.rotate()
  }

  /** Sequence the next appended record gets. */
  get next(): number {
    return this.nextSeq
  }

  get lastSeq(): number {
    return this.nextSeq - 1
  }

  get bytes(): number {
    let n = 0
    for (const s of this.segments) n += s.size
    return n
  }

  /** Oldest record's position. */
  start(): Cursor {
    return { segment: this.segments[0]!.first, offset: 0 }
  }

  /**
   * Starts a new segment at the next sequence. The new file is opened first: when that fails
   * (no inodes, no descriptors) the active segment, still open, stays the one appended to.
   */
  private rotate(): void {
    const first = this.nextSeq
    const active = this.segments[this.segments.length - 1]
    // An empty active segment already starts here; a second file of the same name would be it.
    if (active && active.first === first && this.fd >= 0) return
    const path = join(this.dir, `${String(first).padStart(16, '0')}.seg`)
    // Readable too: a segment deleted or cut under the spool is read back through it (repairActive).
    const fd = openSync(path, 'a+', 0o600)
    if (this.fd >= 0) {
      // Synced and closed off the event loop: a synchronous fdatasync here stalled calls.
      const old = this.fd
      const synced = new Promise<void>((resolve, reject) =>
        fdatasync(old, (err) => {
          close(old, () => {})
          if (err) reject(err)
          else resolve()
        }),
      )
      // Each retirement includes the ones before it, so waiting on the latest waits on all. A
      // failed one is reported once, by the syncAsync() that waits on it.
      const before = this.retiring.catch(() => {})
      this.retiring = Promise.all([before, synced]).then(() => {})
      this.retiring.catch(() => {})
    }
    this.fd = fd
    this.segments.push({ first, path, last: 0, size: 0, holes: new Map() })
  }

  /** When the lock and the active segment were last found as left (performance.now()); the lock error is set once it is found lost, for good. */
  private lockCheckedAt = 0
  private lockLost: SpoolError | null = null
  /** Set by read() when a segment held fewer bytes than appended to it: the next append looks at once. */
  private suspect = false
  /**
   * Segments found deleted or cut short under the spool, rewritten from what was left or passed
   * over: the sink takes them (takeRepairs), says what was lost, and, after a rewrite, resends from
   * the oldest record, since the offsets it read by have moved.
   */
  private repairs: SegmentRepair[] = []

  /**
   * Appends stop, for good, once the lock is no longer this directory's: another process may be
   * appending there by then, and two writers corrupt a spool. Looked at once a second at most,
   * and so is the active segment (repairActive).
   */
  private assertHeld(): void {
    if (this.lockLost) throw this.lockLost
    const now = performance.now()
    if (now - this.lockCheckedAt < 1000 && !this.suspect) return
    if (!this.lock.held()) {
      this.lockLost = new SpoolError(`the lock on spool ${this.dir} was removed (its spool.lock deleted or replaced, or the directory): another process may append there, so this one stops; restart it once the directory is its alone`)
      throw this.lockLost
    }
    this.repairActive()
    this.lockCheckedAt = now
    this.suspect = false
  }

  /**
   * The active segment deleted (a tmp cleaner, an operator) or cut short under the running spool:
   * appends went on into a file no restart would read, or past its end where reads do not look,
   * and the sender skipped them without a word. Now, at the next append (within a second), what
   * the file still holds is read back through the spool's own descriptor, written to a new file
   * under the segment's name, and a new segment is started, so a restart numbers on from here
   * (an empty or missing newest segment made it count from an old sequence, which the collector
   * refuses for ever). What was cut away is lost: said by the sink, by sequence.
   */
  private repairActive(): void {
    const seg = this.segments[this.segments.length - 1]!
    const st = fstatSync(this.fd)
    if (st.nlink > 0 && st.size === seg.size) return
    const cause = st.nlink === 0 ? 'deleted' : st.size < seg.size ? 'cut short' : 'written to by another process'
    const data = Buffer.allocUnsafe(st.size)
    let got = 0
    while (got < st.size) {
      const n = readSync(this.fd, data, got, st.size - got, got)
      if (n === 0) break
      got += n
    }
    const { records } = scanRecords(data.subarray(0, got), seg.first - 1)
    const kept = Buffer.concat(records.map((r) => data.subarray(r.at, r.end)))
    const tmp = `${seg.path}.tmp`
    const fd = openSync(tmp, 'w', 0o600)
    try {
      for (let off = 0; off < kept.length; ) off += writeSync(fd, kept, off)
      fdatasyncSync(fd)
    } finally {
      closeSync(fd)
    }
    renameSync(tmp, seg.path)
    const held = new Set(records.map((r) => r.seq))
    const lost: number[] = []
    for (let q = seg.first; q <= seg.last; q++) if (!held.has(q)) lost.push(q)
    if (this.reader?.first === seg.first) this.closeReader()
    closeSync(this.fd)
    this.fd = openSync(seg.path, 'a+', 0o600)
    seg.size = kept.length
    seg.holes = new Map()
    this.repairs.push({ path: seg.path, cause, kept: records.length, lost, rewritten: true })
    // Kept only where it is named by a sequence it holds: a restart reads on from here.
    if (seg.last >= seg.first) this.rotate()
  }

  /** The segments repaired since the last call (see repairActive). */
  takeRepairs(): SegmentRepair[] {
    const r = this.repairs
    this.repairs = []
    return r
  }

  /** Set when the active segment's end could not be put back after a failed append: the next append starts a new one. */
  private mustRotate = false

  /**
   * Appends records with the next sequences, in one write. `encode(seq)` returns the payload for
   * that sequence. Returns the last sequence used. Synchronous: when it returns, the records are
   * in the kernel (they survive the process being killed, not the machine losing power; sync()
   * is for that).
   */
  append(count: number, encode: (seq: number) => Uint8Array): number {
    this.assertHeld()
    const active = this.segments[this.segments.length - 1]!
    if (this.mustRotate || active.size >= this.segmentBytes) {
      try {
        this.rotate()
        this.mustRotate = false
      } catch (err) {
        // No new segment (EMFILE, no inodes): the active one grows past segment_bytes rather
        // than lose the record, unless its end is in doubt.
        if (this.mustRotate) throw err
      }
    }
    const seg = this.segments[this.segments.length - 1]!
    let used = 0
    let seq = this.nextSeq
    for (let i = 0; i < count; i++) {
      const payload = encode(seq)
      const need = used + HEADER + payload.length
      if (need > this.buf.length) {
        const bigger = Buffer.allocUnsafe(Math.max(need, this.buf.length * 2))
        this.buf.copy(bigger, 0, 0, used)
        this.buf = bigger
      }
      used = encodeRecord(seq++, payload, this.buf, used)
    }
    // All or nothing: the sequences and the segment's size move only once every byte is in. A
    // short write then an error (ENOSPC mid-record) would otherwise leave bytes reads do not
    // expect, and records after them that no read would reach.
    let off = 0
    try {
      while (off < used) off += writeSync(this.fd, this.buf, off, used - off)
    } catch (err) {
      if (off > 0) {
        try {
          ftruncateSync(this.fd, seg.size)
        } catch {
          this.mustRotate = true
        }
      }
      throw err
    }
    seg.size += used
    this.nextSeq = seq
    seg.last = seq - 1
    return seg.last
  }

  /** Everything appended, on disk now (flush, close). The rotated-out segments are synced by path. */
  sync(): void {
    if (this.fd >= 0) fdatasyncSync(this.fd)
    for (const s of this.segments.slice(0, -1)) {
      if (s.last <= this.syncedSeq) continue
      const fd = openSync(s.path, 'r')
      fdatasyncSync(fd)
      closeSync(fd)
    }
    this.syncedSeq = this.lastSeq
  }

  /** fdatasync on the libuv threadpool: appends go on meanwhile. Raises syncedSeq to what was appended before it began. */
  async syncAsync(): Promise<void> {
    const fd = this.fd
    const upTo = this.lastSeq
    if (fd >= 0) {
      try {
        await new Promise<void>((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())))
      } catch (err) {
        // Rotated out (and closed) meanwhile: its own sync, awaited below, covers it.
        if (this.fd === fd) throw err
      }
    }
    // Every rotation since began syncs the segment it retired: those cover records up to upTo too.
    for (let r = this.retiring; ; r = this.retiring) {
      await r
      if (r === this.retiring) break
    }
    if (upTo > this.syncedSeq) this.syncedSeq = upTo
  }

  /**
   * Reads up to `maxRecords`/`maxBytes` records from `cursor`, skipping sequences <= `after`.
   * Returns the records and the cursor after them. The payloads are views of a buffer the next
   * read() reuses: use (or copy) them before reading again.
   */
  read(cursor: Cursor, maxRecords: number, maxBytes: number, after: number, upTo = Number.MAX_SAFE_INTEGER): { records: SpoolRecord[]; cursor: Cursor } {
    const records: SpoolRecord[] = []
    let fill = 0
    let bytes = 0
    let { segment, offset } = cursor
    let seen = cursor.seq ?? 0
    const active = this.segments[this.segments.length - 1]
    for (const seg of this.segments) {
      if (seg.first < segment) continue
      if (seg.first > segment) offset = 0
      if (offset === 0) seen = seg.first - 1
      segment = seg.first
      if (offset >= seg.size) continue
      if (this.reader?.first !== seg.first) {
        this.closeReader()
        let opened: number
        try {
          opened = openSync(seg.path, 'r')
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
          // The active one: put back from the spool's own descriptor at the next append.
          this.passOver(seg, seg.first - 1, seg === active, 'deleted')
          if (seg === active) throw err
          // An older one deleted before it was read (a tmp cleaner takes the oldest files first):
          // its records are gone. Said (takeRepairs) and passed over; before, sending stopped at
          // it until a restart, and the spool filled behind it.
          seg.size = 0
          seg.holes = new Map()
          continue
        }
        this.reader = { first: seg.first, fd: opened }
      }
      const fd = this.reader.fd
      {
        while (offset < seg.size && records.length < maxRecords && bytes < maxBytes) {
          const hole = seg.holes.get(offset)
          if (hole !== undefined) {
            offset = hole
            continue
          }
          const want = Math.min(seg.size - offset, Math.max(maxBytes - bytes, HEADER + 1024))
          // Into the reused read buffer, each chunk after the last: the records returned are views of it.
          let chunk: Buffer
          if (fill + want <= this.readBuf.length) {
            chunk = this.readBuf.subarray(fill, fill + want)
            fill += want
          } else chunk = Buffer.allocUnsafe(want)
          const got = readSync(fd, chunk, 0, want, offset)
          // Fewer bytes than were appended: the file was cut under the spool (repairActive).
          if (got < want) this.suspect = true
          let at = 0
          let reachedLimit = false
          while (at < got && records.length < maxRecords) {
            if (at > 0 && seg.holes.has(offset + at)) break
            const r = parseRecord(chunk, at, got, 0)
            if (!r) break
            if (r.seq > upTo) {
              reachedLimit = true
              break
            }
            at += HEADER + r.payload.length
            seen = r.seq
            if (r.seq > after) {
              records.push(r)
              bytes += HEADER + r.payload.length
            }
          }
          if (reachedLimit) {
            offset += at
            return { records, cursor: { segment, offset, seq: seen } }
          }
          if (at === 0) {
            // A record larger than the chunk: read exactly it next time round.
            const len = chunk.readUInt32LE(0)
            if (got < HEADER || len > MAX_RECORD) {
              // Unreadable after recovery: the disk changed under us; skip the rest, and say so.
              offset = seg.size
              this.passOver(seg, seen, seg === active)
              break
            }
            const one = Buffer.allocUnsafe(HEADER + len)
            readSync(fd, one, 0, one.length, offset)
            const r = parseRecord(one, 0, one.length, 0)
            if (!r) {
              offset = seg.size
              this.passOver(seg, seen, seg === active)
              break
            }
            if (r.seq > upTo) return { records, cursor: { segment, offset, seq: seen } }
            seen = r.seq
            if (r.seq > after) records.push({ seq: r.seq, payload: r.payload })
            bytes += one.length
            offset += one.length
            continue
          }
          offset += at
        }
      }
      if (records.length >= maxRecords || bytes >= maxBytes) break
    }
    return { records, cursor: { segment, offset, seq: seen } }
  }

  /**
   * The rest of a segment found unreadable past `seen` (cut short or overwritten under the spool,
   * or deleted): an older one's records after it are gone, said through takeRepairs; before, they
   * were skipped without a word. The active one is put back by repairActive at the next append instead.
   */
  private passOver(seg: Segment, seen: number, isActive: boolean, cause: SegmentRepair['cause'] = 'cut short'): void {
    if (isActive) {
      this.suspect = true
      return
    }
    const lost: number[] = []
    for (let q = Math.max(seen, seg.first - 1) + 1; q <= seg.last; q++) lost.push(q)
    this.repairs.push({ path: seg.path, cause, kept: Math.max(0, seen - seg.first + 1), lost, rewritten: false })
  }

  private closeReader(): void {
    if (this.reader) closeSync(this.reader.fd)
    this.reader = null
  }

  /**
   * Deletes every older segment whose records are all acknowledged. The newest segment is not
   * rotated early: a file created and deleted per ack measurably cost the sidecar CPU under load;
   * its acked records are resent after a restart and deduplicated by the collector.
   */
  acknowledge(upTo: number): number {
    const active = this.segments[this.segments.length - 1]!
    // One segment past segment_bytes (appends went on in it when no new file could be made, or
    // a backlog landed at once) and every record in it acked: start the next, so it can go. Else
    // it stayed for ever, and over spool_max_bytes the spool refused all egress, restarts too.
    if (this.segments.length === 1 && active.size >= this.segmentBytes && active.last <= upTo) {
      try {
        this.rotate()
      } catch {
        // No new segment yet: tried again at the next ack.
      }
    }
    let removed = 0
    while (this.segments.length > 1) {
      const s = this.segments[0]!
      if (s.size > 0 && s.last > upTo) break
      if (this.reader?.first === s.first) this.closeReader()
      rmSync(s.path, { force: true })
      this.segments.shift()
      removed++
    }
    return removed
  }

  close(): void {
    this.closeReader()
    if (this.fd >= 0) {
      fdatasyncSync(this.fd)
      closeSync(this.fd)
      this.fd = -1
    }
    this.lock.release()
  }
}
