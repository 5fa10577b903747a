// One process per spool directory. Two sidecars appending to one spool interleave their records
// and numbers, and the damage surfaced only later, as events lost for good. The lock is a POSIX
// record lock taken through SQLite (Node has no flock): the kernel drops it when its holder dies,
// however it dies, so a sidecar restarted after a SIGKILL never finds a stale lock, while a second
// live process (or a second sidecar in this one) is refused at start-up.
import { statSync } from 'node:fs'
import { join } from 'node:path'
import { openDatabase } from '../../lib/sqlite.js'

export interface SpoolLock {
  /**
   * Whether the lock is still the one on this directory: false once its file was removed or
   * replaced (an operator clearing a "stale" lock, the directory deleted), when another process
   * can take a lock of its own there.
   */
  held(): boolean
  release(): void
}

/** Takes the directory's lock, or throws `busy(path)` when another holder has it. */
export function lockSpoolDir(dir: string, busy: (path: string) => Error): SpoolLock {
  const path = join(dir, 'spool.lock')
  // No busy wait: a live holder does not let go, and start-up must say so at once.
  const db = openDatabase(path, { timeout: 0 })
  try {
    // Nothing is ever written to it: no journal file beside it (an inode, and one more name in the spool).
    db.exec('PRAGMA journal_mode = MEMORY')
    db.exec('PRAGMA locking_mode = EXCLUSIVE')
    db.exec('BEGIN EXCLUSIVE')
  } catch (err) {
    db.close()
    if ((err as { code?: string }).code === 'SQLITE_BUSY') throw busy(path)
    throw err
  }
  const inode = statSync(path).ino
  return {
    held: () => statSync(path, { throwIfNoEntry: false })?.ino === inode,
    release: () => {
      if (db.open) db.close()
    },
  }
}
