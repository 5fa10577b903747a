// A sidecar's task handle: the proxy credential an agent names its task with. Made by the
// sidecar's task registry, recognised by the sidecar (never sent upstream) and by the broker
// (never stored as a task ID): one definition of its shape for all three.
import { randomBytes } from 'node:crypto'
import { STRICT_UTF8 } from './strict-utf8.js'

/** `lkt_` and 128 random bits in base64url (22 characters). */
export const TASK_HANDLE = /lkt_[A-Za-z0-9_-]{22}/

/** A fresh handle. */
export function newTaskHandle(): string {
  return 'lkt_' + randomBytes(16).toString('base64url')
}

/** Exactly a handle, nothing around it. */
export const WHOLE_TASK_HANDLE = new RegExp(`^${TASK_HANDLE.source}$`)

const EVERY_TASK_HANDLE = new RegExp(TASK_HANDLE.source, 'g')
/** What a trail keeps in place of a handle. */
export const HANDLE_REMOVED = 'lkt_[removed]'
/** Rounds of percent-decoding looked through (`%256C` is `l` after two). */
const DECODING_ROUNDS = 3

/**
 * `text` (a path, a host, a reason quoting either) with every task handle in it removed: what a
 * log or an audit event may keep of what an agent wrote. An agent calling its task API by a
 * spelling of the sidecar's address the sidecar does not take for its own (`0.0.0.0`,
 * `[::ffff:127.0.0.1]`) is refused by policy, and its path was recorded, handle and all. A handle
 * that shows only once the text is percent-decoded (up to three rounds) is removed where it was
 * written, encoded or not, and the rest is kept as written. Kept decoded whole, as it was, any
 * agent writing something handle-shaped (`%6Ckt_` and 22 letters) had its path recorded as no
 * upstream got it: `%2F` as `/`, `%3F` as `?`, `%D0%B0dmin` as a Cyrillic `аdmin`.
 */
export function withoutTaskHandles(text: string): string {
  if (text.includes('lkt_')) text = text.replace(EVERY_TASK_HANDLE, HANDLE_REMOVED)
  let decoded = text
  for (let round = 0; round < DECODING_ROUNDS && decoded.includes('%'); round++) {
    try {
      decoded = decodeURIComponent(decoded)
    } catch {
      break
    }
    // Then again, as another handle may show only after more rounds (each pass leaves less text).
    if (TASK_HANDLE.test(decoded)) return withoutTaskHandles(removedWhereWritten(text, round + 1) ?? decoded.replace(EVERY_TASK_HANDLE, HANDLE_REMOVED))
  }
  return text
}

/**
 * `text` with every handle its `rounds`-th decoding holds removed where it was written, the rest
 * as it is; null where that cannot be done (the text as written is kept decoded then, as it was).
 */
function removedWhereWritten(text: string, rounds: number): string | null {
  let decoded = text
  /** For each UTF-16 unit of `decoded` (and its end), where it starts in `text`. */
  let from: number[] | null = null
  for (let round = 0; round < rounds; round++) {
    const next = decodeMapped(decoded)
    if (next === null) return null
    const prev: number[] | null = from
    from = prev === null ? next.from : next.from.map((i) => prev[i]!)
    decoded = next.text
  }
  const kept = removeSpans(text, decoded, from!)
  return kept !== text ? kept : null
}

/** `text` with the source of every handle in `decoded` (mapped back by `from`) put as HANDLE_REMOVED. */
function removeSpans(text: string, decoded: string, from: number[]): string {
  let out = ''
  let at = 0
  for (const m of decoded.matchAll(EVERY_TASK_HANDLE)) {
    const start = from[m.index]!
    const end = from[m.index + m[0].length]!
    if (start < at) continue
    out += text.slice(at, start) + HANDLE_REMOVED
    at = end
  }
  return out + text.slice(at)
}

/**
 * One round of decodeURIComponent (null where it would throw), with where each decoded UTF-16
 * unit starts in `text` (`from[text.length]`: its end).
 */
function decodeMapped(text: string): { text: string; from: number[] } | null {
  let out = ''
  const from: number[] = []
  let i = 0
  while (i < text.length) {
    if (text.charCodeAt(i) !== 37) {
      out += text[i]
      from.push(i)
      i++
      continue
    }
    const bytes: number[] = []
    const at: number[] = []
    while (i < text.length && text.charCodeAt(i) === 37) {
      const hex = text.slice(i + 1, i + 3)
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) return null
      bytes.push(parseInt(hex, 16))
      at.push(i)
      i += 3
    }
    let run: string
    try {
      run = STRICT_UTF8.decode(Uint8Array.from(bytes))
    } catch {
      return null
    }
    let b = 0
    for (const ch of run) {
      out += ch
      for (let k = 0; k < ch.length; k++) from.push(at[b]!)
      const cp = ch.codePointAt(0)!
      b += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4
    }
  }
  from.push(text.length)
  return { text: out, from }
}
