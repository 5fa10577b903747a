/**
 * An error as one line for people: ours with a code (LK_*) and Node's system errors (a `code` such
 * as ENOENT, EACCES or ERR_INVALID_URL) by their message; a stack only for what has no code, an
 * internal bug.
 */
export function describeFailure(err: unknown): string {
  if (!(err instanceof Error)) return String(err)
  return typeof (err as { code?: unknown }).code === 'string' ? err.message : (err.stack ?? err.message)
}
