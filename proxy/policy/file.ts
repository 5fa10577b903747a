// A policy file on disk (sidecar.policy_file, broker.control.policy_file): read as strict UTF-8,
// and watched however it is replaced. Shared by the sidecar, its preflight and the broker.
import { statSync, watch, type FSWatcher } from 'node:fs'
import { basename, dirname } from 'node:path'
import { firstNonUtf8Line } from '../../lib/config/load.js'
import { FileTooLarge, readFailure, readFileBounded } from '../../lib/bounded-read.js'

export type PolicyText = { ok: true; text: string } | { ok: false; unreadable: boolean; reason: string }

/**
 * The file's text. Not UTF-8 is refused, naming the line: read leniently, a Latin-1 `/café/**`
 * deny rule would load, and never match the UTF-8 paths agents send. `unreadable`: the file is
 * missing or cannot be read, rather than wrong. Over `maxBytes` (the bundle limit the reader
 * applies, max_bundle_bytes) is refused as compileBundle would, but without reading past it.
 */
export function readPolicyText(file: string, maxBytes: number): PolicyText {
  let bytes: Buffer
  try {
    bytes = readFileBounded(file, maxBytes)
  } catch (err) {
    if (err instanceof FileTooLarge) return { ok: false, unreadable: false, reason: `${file}: policy bundle is over the limit of ${maxBytes} bytes` }
    return { ok: false, unreadable: true, reason: `${file}: cannot read (${readFailure(err)})` }
  }
  const bad = firstNonUtf8Line(bytes)
  if (bad !== null) return { ok: false, unreadable: false, reason: `${file}: line ${bad}: not valid UTF-8 (save the file as UTF-8)` }
  return { ok: true, text: bytes.toString('utf8') }
}

/** How often the file and its directory are looked at, besides what fs.watch reports. */
export const POLICY_CHECK_MS = 1000

/**
 * Calls `onChange` when the file may have changed. fs.watch on the directory (not the file's
 * inode) reports an edit, an atomic rename and a ConfigMap `..data` symlink swap within ~50 ms;
 * but a watch dies with its directory, and a directory removed and made again, or renamed over,
 * left every later edit unseen, with nothing logged. So the file's identity (device, inode, size,
 * times, through symlinks) is also looked at every POLICY_CHECK_MS, a change calls `onChange`,
 * and a directory that is gone or no longer the one watched has its watch set up again.
 * Either way the file is read only once it has held still for `settleMs`: the look each second
 * read a file being written in place, in pieces, half-written, and a prefix that parsed (a deny
 * rule not yet written) was applied.
 */
export function watchPolicyFile(file: string, onChange: () => void, checkMs = POLICY_CHECK_MS, settleMs = 50): { close(): void } {
  const dir = dirname(file)
  const base = basename(file)
  let watcher: FSWatcher | null = null
  let watchedDir: string | null = null
  let debounce: NodeJS.Timeout | undefined
  let seen = identity(file)
  /** Set while a change waits to hold still: the look each second leaves it be; a watch event starts it again. */
  let settling = false
  const settle = (before = identity(file)): void => {
    clearTimeout(debounce)
    settling = true
    debounce = setTimeout(() => {
      const now = identity(file)
      // Still changing: the identity just read is the next look's starting point.
      if (now !== before) return settle(now)
      settling = false
      seen = now
      onChange()
    }, settleMs)
  }
  const arm = (): void => {
    const current = identity(dir, true)
    if (watcher && current === watchedDir) return
    watcher?.close()
    watcher = null
    watchedDir = current
    if (current.startsWith('error:')) return
    try {
      const w = watch(dir, { persistent: false }, (_event, name) => {
        if (name !== null && name !== base && !String(name).startsWith('..')) return
        settle()
      })
      // The directory went away under the watch: the next check sets one up on whatever is there.
      w.on('error', () => {
        w.close()
        if (watcher === w) watcher = null
      })
      watcher = w
    } catch {
      watcher = null
    }
  }
  arm()
  const check = setInterval(() => {
    arm()
    if (settling) return
    const now = identity(file)
    if (now !== seen) settle(now)
  }, checkMs)
  check.unref()
  return {
    close(): void {
      clearInterval(check)
      clearTimeout(debounce)
      watcher?.close()
    },
  }
}

/**
 * What changes when a file is written, replaced or removed, symlinks followed; for a directory
 * (`which`), only which one it is: its times change with every file renamed in or out.
 */
function identity(path: string, which = false): string {
  try {
    const s = statSync(path, { bigint: true })
    return which ? `${s.dev}:${s.ino}` : `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}`
  } catch (err) {
    return `error:${(err as NodeJS.ErrnoException).code ?? 'unknown'}`
  }
}
