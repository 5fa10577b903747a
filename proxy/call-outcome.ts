// Why a call ended, as its audit event records it: the first reason given is the one kept. A cut
// (a revocation, a policy change, idleness, a protocol fault) destroys sockets whose own errors
// come after it, and those must not overwrite what the cut was for.
import type { CallContext } from './context.js'

/** Records `code` and `reason` unless the call already has an outcome; returns whether they were. */
export function recordEnd(ctx: CallContext, code: string, reason: string): boolean {
  if (ctx.errorCode !== null) return false
  ctx.errorCode = code
  ctx.errorReason = reason
  return true
}
