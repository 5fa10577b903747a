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
