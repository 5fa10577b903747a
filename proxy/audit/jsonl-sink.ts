// The first AuditSink: JSON lines appended to a local file. The request path only pushes a
// string onto an array; a timer batches them into one append, so the hot path does no I/O.
import { openSync, write, fsyncSync, closeSync } from 'node:fs'
import type { AuditEvent, AuditSink } from '../context.js'
import { serializeAuditEvent } from './serialize.js'

export class JsonlAuditSink implements AuditSink {
  private readonly fd: number
  private pending: string[] = []
  private timer: NodeJS.Timeout | null = null
  private inFlight: Promise<void> = Promise.resolve()
  private closed = false
  /** Count of events that could not be written; exposed as a metric. */
  failures = 0

  constructor(
    readonly path: string,
    private readonly flushMs: number,
    private readonly onError: (err: NodeJS.ErrnoException) => void = () => {},
  ) {
    this.fd = openSync(path, 'a', 0o600)
  }

  write(event: AuditEvent): void {
    if (this.closed) return
    this.pending.push(serializeAuditEvent(event))
    if (!this.timer) this.timer = setTimeout(() => void this.flush(), this.flushMs)
  }

  flush(): Promise<void> {
    if (this.timer) {
      clearTimeout(this.timer)
      this.timer = null
    }
    if (this.pending.length === 0) return this.inFlight
    const lines = this.pending
    this.pending = []
    const data = Buffer.from(lines.join('\n') + '\n')
    // Appends are chained so batches land in order.
    this.inFlight = this.inFlight.then(
      () =>
        new Promise<void>((resolve) => {
          const writeFrom = (offset: number) =>
            write(this.fd, data, offset, data.length - offset, null, (err, n) => {
              if (err) {
                this.failures += lines.length
                this.onError(err)
                return resolve()
              }
              if (offset + n < data.length) return writeFrom(offset + n)
              resolve()
            })
          writeFrom(0)
        }),
    )
    return this.inFlight
  }

  async close(): Promise<void> {
    if (this.closed) return
    await this.flush()
    this.closed = true
    fsyncSync(this.fd)
    closeSync(this.fd)
  }
}
