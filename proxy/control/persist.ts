// The revocations the sidecar last heard from the broker (its last snapshot, with the deltas since
// applied), kept in a local file: a restarted sidecar loads it before it serves a single call and
// enforces it until the broker's next snapshot replaces it, so stopping the broker and restarting a
// sidecar does not lift a revocation. Written atomically (a 0600 temp file, fsynced, renamed over),
// from a timer and never on the request path, coalesced: a burst of deltas is one or two writes.
// A file that cannot be read or parsed fails start-up (fail closed); deleting it is the override,
// and the sidecar then starts knowing no revocation until the broker's first snapshot.
import { closeSync, fsyncSync, openSync, renameSync, unlinkSync, writeSync } from 'node:fs'
import { open, rename, unlink } from 'node:fs/promises'
import { basename, dirname, extname, join } from 'node:path'
import type { Config } from '../../lib/config/schema.js'
import type { Logger } from '../../lib/log.js'
import { isExpired, type KnownRevocation, type RevocationKind } from './state.js'
import { readFailure, readSettingText } from '../../lib/bounded-read.js'

export const STATE_FORMAT = 'latchkey-sidecar-revocations'

/**
 * Where sidecar.control.state_file defaults to: next to this sidecar's own audit state, which is
 * already one per sidecar and on its writable volume (/var/lib/latchkey in the image). With the
 * JSON-lines sink, `<audit file without extension>.revocations.json` in its directory
 * (/var/lib/latchkey/audit.jsonl -> /var/lib/latchkey/audit.revocations.json); with the collector,
 * `<spool_dir>.revocations.json` beside the spool directory.
 */
export function defaultStateFile(config: Config): string {
  const collector = config.audit.collector
  if (collector) return `${collector.spool_dir.replace(/\/+$/, '')}.revocations.json`
  const path = config.audit.jsonl.path
  return join(dirname(path), `${basename(path, extname(path))}.revocations.json`)
}

export class RevocationFileError extends Error {
  constructor(
    message: string,
    /** The file is there but cannot be read here (not wrong): check-config only warns. */
    readonly unreadable = false,
  ) {
    super(message)
  }
}

interface Stored {
  kind: RevocationKind
  value: string
  created_at: number
}

interface StateDocument {
  format: typeof STATE_FORMAT
  version: 1
  agent_id: string
  saved_at: string
  /** When the broker's last snapshot arrived (null: none yet; what is here came from an earlier file). */
  snapshot_at: string | null
  revocations: Stored[]
}

export interface LoadedState {
  revocations: KnownRevocation[]
  /** jti and task revocations past the broker's retention, dropped. */
  expired: number
  snapshotAt: string | null
}

const KINDS: ReadonlySet<string> = new Set(['agent', 'task', 'jti'])

/** Reads the state file; null when there is none. Throws RevocationFileError when it cannot be read or is not one. */
export function readStateFile(path: string, nowMs: number): LoadedState | null {
  let text: string
  try {
    text = readSettingText(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null
    throw new RevocationFileError(`sidecar.control.state_file ${path}: cannot read (${readFailure(err)}); the sidecar will not start without the revocations it last knew`, true)
  }
  const bad = (why: string) =>
    new RevocationFileError(
      `sidecar.control.state_file ${path}: not a usable revocation state file (${why}); the sidecar will not start without the revocations it last knew. ` +
        'Delete the file to start with none: the broker\'s next snapshot brings them back',
    )
  let doc: Partial<StateDocument>
  try {
    doc = JSON.parse(text) as Partial<StateDocument>
  } catch (err) {
    throw bad(`invalid JSON: ${(err as Error).message}`)
  }
  if (doc === null || typeof doc !== 'object' || doc.format !== STATE_FORMAT) throw bad(`format is not "${STATE_FORMAT}"`)
  if (doc.version !== 1) throw bad(`unknown version ${JSON.stringify(doc.version)}`)
  if (!Array.isArray(doc.revocations)) throw bad('no revocations array')
  const revocations: KnownRevocation[] = []
  let expired = 0
  for (const [i, r] of (doc.revocations as unknown[]).entries()) {
    const e = r as Partial<Stored> | null
    if (e === null || typeof e !== 'object' || typeof e.kind !== 'string' || !KINDS.has(e.kind) || typeof e.value !== 'string' || e.value === '' || !Number.isSafeInteger(e.created_at) || e.created_at! < 0) {
      throw bad(`revocations[${i}] is not {kind: agent|task|jti, value, created_at}`)
    }
    const known: KnownRevocation = { kind: e.kind, value: e.value, createdAt: e.created_at! }
    if (isExpired(known, nowMs)) expired++
    else revocations.push(known)
  }
  return { revocations, expired, snapshotAt: typeof doc.snapshot_at === 'string' ? doc.snapshot_at : null }
}

export interface StateFileOptions {
  agentId: string
  log: Logger
  now: () => number
  /** How long a change waits for more before the file is written. */
  delayMs?: number
  /** After a failed write, how long before the next try. */
  retryMs?: number
  onWrite?: (outcome: 'ok' | 'error') => void
}

/** Writes the state file from `read()`: now (sync, at start-up), or soon after `schedule()` (coalesced). */
export class StateFileWriter {
  private timer: NodeJS.Timeout | undefined
  private writing: Promise<void> | null = null
  private dirty = false
  private closed = false
  /** When the broker's last snapshot arrived. */
  snapshotAt: string | null = null

  constructor(
    readonly path: string,
    private readonly read: () => KnownRevocation[],
    private readonly o: StateFileOptions,
  ) {}

  private document(): string {
    const now = this.o.now()
    const revocations = this.read()
      .filter((r) => !isExpired(r, now))
      .map((r): Stored => ({ kind: r.kind, value: r.value, created_at: r.createdAt ?? 0 }))
    const doc: StateDocument = { format: STATE_FORMAT, version: 1, agent_id: this.o.agentId, saved_at: new Date(now).toISOString(), snapshot_at: this.snapshotAt, revocations }
    return JSON.stringify(doc) + '\n'
  }

  private get tmp(): string {
    return `${this.path}.${process.pid}.tmp`
  }

  /** At start-up: proves the file can be written (or throws RevocationFileError) and drops what expired from it. */
  writeNow(): void {
    const tmp = this.tmp
    try {
      try {
        unlinkSync(tmp)
      } catch {
        // none left over
      }
      const fd = openSync(tmp, 'wx', 0o600)
      try {
        writeSync(fd, this.document())
        fsyncSync(fd)
      } finally {
        closeSync(fd)
      }
      renameSync(tmp, this.path)
    } catch (err) {
      try {
        unlinkSync(tmp)
      } catch {
        // never created
      }
      throw new RevocationFileError(`sidecar.control.state_file ${this.path}: cannot write (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); revocations would not survive a restart`)
    }
  }

  /** Something changed: the file is rewritten soon, once for any number of changes meanwhile. */
  schedule(): void {
    this.dirty = true
    if (this.closed || this.timer || this.writing) return
    this.timer = setTimeout(() => this.flush(), this.o.delayMs ?? 50)
    this.timer.unref()
  }

  private flush(retryAfterError = false): void {
    this.timer = undefined
    this.writing = this.drain().then(
      () => {
        this.writing = null
        if (this.dirty && !this.closed) this.schedule()
      },
      (err: Error) => {
        this.writing = null
        this.dirty = true
        this.o.onWrite?.('error')
        if (!retryAfterError) this.o.log.error({ path: this.path, err: err.message }, 'revocation state file not written; retrying (a restart now would load an older list)')
        if (this.closed) return
        this.timer = setTimeout(() => this.flush(true), this.o.retryMs ?? 1000)
        this.timer.unref()
      },
    )
  }

  private async drain(): Promise<void> {
    while (this.dirty) {
      this.dirty = false
      await this.write(this.document())
      this.o.onWrite?.('ok')
    }
  }

  private async write(text: string): Promise<void> {
    const tmp = this.tmp
    await unlink(tmp).catch(() => {})
    try {
      const fh = await open(tmp, 'wx', 0o600)
      try {
        await fh.writeFile(text)
        await fh.sync()
      } finally {
        await fh.close()
      }
      await rename(tmp, this.path)
    } catch (err) {
      await unlink(tmp).catch(() => {})
      throw err
    }
  }

  /** Writes what is pending, then stops. */
  async close(): Promise<void> {
    this.closed = true
    clearTimeout(this.timer)
    this.timer = undefined
    await this.writing
    if (!this.dirty) return
    this.dirty = false
    try {
      await this.write(this.document())
    } catch (err) {
      this.o.log.error({ path: this.path, err: (err as Error).message }, 'revocation state file not written at shutdown')
    }
  }
}
