// Notices a changed secrets.file and has the StaticSecretSource read it again. A Kubernetes Secret
// is mounted as a directory whose files are symlinks through `..data`, which kubelet swaps for a new
// timestamped directory in one rename: fs.watch misses that (it watches the old inode), and the new
// file may even keep the old mtime. So the file is stat'ed (through its symlinks) every interval and
// its resolved path, mtime, size and inode compared; a change is read after a short settle.
import { realpath, stat } from 'node:fs/promises'
import type { SecretsReload, StaticSecretSource } from './static-source.js'

/** How long after a change is seen the file is read: a writer not renaming may not be done. */
export const SETTLE_MS = 50

/** What identifies one version of the file: a change to any part is read again. */
export async function signature(file: string): Promise<string> {
  try {
    const [real, st] = await Promise.all([realpath(file), stat(file)])
    return `${real}\0${st.mtimeMs}\0${st.size}\0${st.ino}`
  } catch (err) {
    // Gone or unreadable for now: a signature too, so its return is noticed (and its absence read, and refused).
    return `error:${(err as NodeJS.ErrnoException).code ?? 'unknown'}`
  }
}

export class SecretsFileWatcher {
  private timer: NodeJS.Timeout | undefined
  private last: string
  /** One reload at a time: a SIGHUP during a poll's read waits for it, then reads again. */
  private running: Promise<unknown> = Promise.resolve()
  private closed = false
  /** A poll is queued or running: the next tick is skipped, not queued behind it. */
  private polling = false

  constructor(
    private readonly file: string,
    private readonly source: StaticSecretSource,
    /** The sidecar's further check of a new set (a value a header cannot carry), else null. */
    private readonly check: Parameters<StaticSecretSource['reload']>[0],
    /** Told each reload's outcome (the metric, the log line). */
    private readonly onReload: (r: SecretsReload, why: 'changed' | 'sighup') => void,
    intervalMs: number,
    /** The file's signature taken before start-up read it: a change after that is read at the first poll. */
    atStart: string,
  ) {
    this.last = atStart
    if (intervalMs > 0) {
      this.timer = setInterval(() => void this.poll(), intervalMs)
      this.timer.unref()
    }
  }

  /** Reads the file again now (SIGHUP), whatever its stat says. */
  reloadNow(): Promise<SecretsReload> {
    return this.serially(async () => {
      this.last = await signature(this.file)
      return this.reload('sighup')
    })
  }

  close(): void {
    this.closed = true
    if (this.timer) clearInterval(this.timer)
    this.timer = undefined
  }

  private poll(): Promise<unknown> {
    if (this.polling) return Promise.resolve()
    this.polling = true
    return this.serially(async () => {
      const seen = await signature(this.file)
      if (seen === this.last || this.closed) return
      await new Promise((resolve) => setTimeout(resolve, SETTLE_MS).unref())
      // What is read is at least as new as this: a change during the settle is read now, or at the next poll.
      this.last = await signature(this.file)
      if (!this.closed) this.reload('changed')
    }).finally(() => (this.polling = false))
  }

  private reload(why: 'changed' | 'sighup'): SecretsReload {
    const r = this.source.reload(this.check)
    this.onReload(r, why)
    return r
  }

  private serially<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.running.then(fn, fn)
    this.running = next.catch(() => undefined)
    return next
  }
}
