// A file read whole at start-up (a config, the secrets file, a policy file, the agent registry),
// read with a cap: readFileSync reads until the end, and a path that names /dev/zero, a FIFO fed
// without end, or a file gone wrong grew the process without limit (check-config of /dev/zero
// reached 7 GB). At most `limit` + 1 bytes are ever read: one more than the limit says it is over.
import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs'

/**
 * The most a config file (the sidecar's, the broker's, the collector's, the agent registry) may
 * be: the largest real one is some KiB.
 */
export const MAX_CONFIG_BYTES = 4 * 1024 * 1024

/** A file over the limit its reader sets; `limit` in bytes. */
export class FileTooLarge extends Error {
  readonly code = 'LK_FILE_TOO_LARGE'
  constructor(
    readonly path: string,
    readonly limit: number,
  ) {
    super(`${path}: larger than ${byteSize(limit)}`)
  }
}

/**
 * A FIFO that no process holds open for writing: there is nothing to read, and a blocking open of
 * it waits for a writer for ever (`latchkey check-config` of one, or a sidecar whose config or
 * secrets.file is one, hung at start, silent).
 */
export class NoWriter extends Error {
  readonly code = 'LK_NO_WRITER'
  constructor(readonly path: string) {
    super(`${path}: a FIFO no process writes to`)
  }
}

/** Waits `ms` on this thread (the reads here are synchronous): a pipe's writer has not written yet. */
function pause(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms)
}

/** `bytes` for people: 4 MiB, 256 KiB, 1000 bytes. */
export function byteSize(bytes: number): string {
  if (bytes >= 1024 * 1024 && bytes % (1024 * 1024) === 0) return `${bytes / (1024 * 1024)} MiB`
  if (bytes >= 1024 && bytes % 1024 === 0) return `${bytes / 1024} KiB`
  return `${bytes} bytes`
}

/**
 * The file's bytes, at most `limit` of them, else FileTooLarge. A pipe (`<(cat file)`) is read to
 * its end as a file is; a FIFO no process writes to is NoWriter. Errors opening or reading
 * (ENOENT, EACCES, EISDIR) are thrown as they are.
 */
export function readFileBounded(path: string, limit: number): Buffer {
  // Non-blocking, so that opening a FIFO never waits for a writer (it does nothing to a file's
  // reads); a pipe whose writer has not written yet answers EAGAIN, and is waited for below.
  const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK)
  try {
    const chunks: Buffer[] = []
    let total = 0
    for (;;) {
      // Never more than one byte past the limit, however much the source has.
      const chunk = Buffer.allocUnsafe(Math.min(64 * 1024, limit + 1 - total))
      let n: number
      try {
        n = readSync(fd, chunk, 0, chunk.length, null)
      } catch (err) {
        // A writer holds the pipe open and has not written yet (`<(slow-command)`): as a blocking read would, wait.
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err
        pause(10)
        continue
      }
      // The end at once, of a FIFO: no writer had it open (or one that wrote nothing), not an empty config.
      if (n === 0 && total === 0 && fstatSync(fd).isFIFO()) throw new NoWriter(path)
      if (n === 0) break
      chunks.push(n === chunk.length ? chunk : chunk.subarray(0, n))
      total += n
      if (total > limit) throw new FileTooLarge(path, limit)
    }
    return Buffer.concat(chunks, total)
  } finally {
    closeSync(fd)
  }
}

/**
 * The most any other file a setting names may be: a certificate, a CA bundle, a key, a JWK set, a
 * token, the sidecar's revocation state. The largest real ones (a distribution's CA bundle, a
 * state file with thousands of revocations) are some hundreds of KiB; the cap is for the file
 * that never ends (/dev/zero, a FIFO), which grew the process until it died.
 */
export const MAX_SETTING_FILE_BYTES = 16 * 1024 * 1024

/** Why a read failed, for a message that names the file itself: `ENOENT`, or `larger than 16 MiB`. */
export function readFailure(err: unknown): string {
  if (err instanceof FileTooLarge) return `larger than ${byteSize(err.limit)}`
  if (err instanceof NoWriter) return 'a FIFO no process writes to: nothing to read'
  return (err as NodeJS.ErrnoException)?.code ?? (err as Error)?.message ?? 'error'
}

/** readFileBounded at MAX_SETTING_FILE_BYTES, as text. */
export function readSettingText(path: string, encoding: BufferEncoding = 'utf8'): string {
  return readFileBounded(path, MAX_SETTING_FILE_BYTES).toString(encoding)
}
