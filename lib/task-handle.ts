// A sidecar's task handle: the proxy credential an agent names its task with. Made by the
// sidecar's task registry, recognised by the sidecar (never sent upstream) and by the broker
// (never stored as a task ID): one definition of its shape for all three.
import { randomBytes } from 'node:crypto'

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
 * `[::ffff:127.0.0.1]`) is refused by policy, and its path was recorded, handle and all. Text
 * that holds one only once percent-decoded (up to three rounds) is kept decoded, without it.
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
    if (TASK_HANDLE.test(decoded)) return decoded.replace(EVERY_TASK_HANDLE, HANDLE_REMOVED)
  }
  return text
}
