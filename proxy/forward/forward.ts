// The forward stage: one undici dispatch per call, streaming both ways with back-pressure.
// The handler follows undici's callback order (start → response start → data* → end | error)
// and reports exactly once through `done`.
import type { IncomingMessage, ServerResponse, IncomingHttpHeaders } from 'node:http'
import type { Dispatcher, Pool } from 'undici'
import type { CallContext, Credential } from '../context.js'
import type { LatchkeyError } from '../errors.js'
import { inboundResponseHeaders, type OutboundHeaders } from './headers.js'
import { upstreamError } from './upstream-errors.js'
import { perCredential } from '../credentials/per-credential.js'

export type ForwardDone = (err: LatchkeyError | null) => void

class ResponseRelay implements Dispatcher.DispatchHandler {
  private controller: Dispatcher.DispatchController | null = null
  private finished = false

  constructor(
    private readonly ctx: CallContext,
    private readonly res: ServerResponse,
    private readonly done: ForwardDone,
    /** Report (and so audit) before the response's last bytes are written: see AuditSink.recordBeforeResponse. */
    private readonly recordFirst = false,
  ) {
    res.once('close', () => {
      // The agent went away mid-response: stop the upstream too.
      if (!this.finished) this.controller?.abort(new Error('client closed'))
    })
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.controller = controller
  }

  onResponseStart(_c: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    this.ctx.status = statusCode
    this.ctx.upstreamMs = performance.now() - this.ctx.t0
    const clean = inboundResponseHeaders(headers)
    if (this.ctx.credential) scrubCredential(clean, this.ctx.credential)
    // undici usually delivers head, body and end in one tick: corked until the next, a small
    // response leaves in one write instead of three. Later chunks of a stream flow uncorked.
    this.res.cork()
    process.nextTick(uncork, this.res)
    if (statusMessage) this.res.writeHead(statusCode, statusMessage, clean as Record<string, string | string[]>)
    else this.res.writeHead(statusCode, clean as Record<string, string | string[]>)
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.ctx.bytesOut += chunk.length
    if (!this.res.write(chunk)) {
      controller.pause()
      this.res.once('drain', () => controller.resume())
    }
  }

  onResponseEnd(): void {
    this.finished = true
    if (this.recordFirst) this.done(null)
    this.res.end()
    // Send the response now; the bookkeeping in `done` must not hold it back until the next tick.
    this.res.uncork()
    if (!this.recordFirst) this.done(null)
  }

  onResponseError(_c: Dispatcher.DispatchController, err: Error): void {
    if (this.finished) return
    this.finished = true
    const mapped = upstreamError(err)
    if (this.res.headersSent) {
      // Part of the response is already with the agent: the only honest signal left is a cut.
      this.ctx.errorCode = mapped.code
      this.ctx.errorReason = mapped.reason
      this.res.destroy()
      this.done(null)
    } else {
      this.done(mapped)
    }
  }
}

/**
 * An upstream that reflects the request into a response header (a redirect carrying the query
 * key, a debug header) would hand the agent the credential it must never hold.
 */
function scrubCredential(headers: IncomingHttpHeaders, credential: Credential): void {
  const secret = credential.value
  const encoded = urlEncodedSecret(credential)
  for (const name in headers) {
    const v = headers[name]
    if (v === undefined) continue
    if (typeof v === 'string' ? carries(v, secret, encoded) : v.some((x) => carries(x, secret, encoded))) {
      headers[name] = '[removed by latchkey: it contained the injected credential]'
    }
  }
}

function carries(value: string, secret: string, encoded: string | null): boolean {
  return value.includes(secret) || (encoded !== null && value.includes(encoded))
}

/** The secret as a URL would carry it, computed once per credential; null when it is the same text. */
const urlEncodedSecret = perCredential((c) => {
  const encoded = encodeURIComponent(c.value)
  return encoded === c.value ? null : encoded
})

function uncork(res: ServerResponse): void {
  res.uncork()
}

async function* counted(body: IncomingMessage, ctx: CallContext): AsyncIterable<Buffer> {
  for await (const chunk of body) {
    ctx.bytesIn += (chunk as Buffer).length
    yield chunk as Buffer
  }
}

export function forward(
  pool: Pool,
  ctx: CallContext,
  req: IncomingMessage,
  res: ServerResponse,
  path: string,
  headers: OutboundHeaders,
  done: ForwardDone,
  recordFirst = false,
): void {
  const contentLength = req.headers['content-length']
  let body: IncomingMessage | AsyncIterable<Buffer> | null = null
  if (contentLength !== undefined) {
    const n = Number(contentLength)
    if (n > 0) {
      body = req
      ctx.bytesIn = n
    }
  } else if (req.headers['transfer-encoding'] !== undefined) {
    body = counted(req, ctx)
  }
  pool.dispatch(
    {
      path,
      method: req.method as Dispatcher.HttpMethod,
      headers: headers as Record<string, string | string[]>,
      // undici documents async iterables as bodies; its type declaration lists only Readable.
      body: body as IncomingMessage | null,
      // An agent's request is never replayed behind its back.
      idempotent: false,
    },
    new ResponseRelay(ctx, res, done, recordFirst),
  )
}
