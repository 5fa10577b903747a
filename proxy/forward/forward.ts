// The forward stage: one undici dispatch per call, streaming both ways with back-pressure.
// The handler follows undici's callback order (start → response start → data* → end | error)
// and reports exactly once through `done`.
import type { IncomingMessage, ServerResponse, IncomingHttpHeaders } from 'node:http'
import { finished, type Transform } from 'node:stream'
import { createBrotliDecompress, createGunzip } from 'node:zlib'
import { createDeflateDecoder } from './deflate.js'
import type { Dispatcher, Pool } from 'undici'
import type { CallContext, Target } from '../context.js'
import { LatchkeyError, type ErrorCode } from '../errors.js'
import { watchBodyStall } from './body-stall.js'
import { inboundResponseHeaders, type OutboundHeaders } from './headers.js'
import { afterSending, bodyError, upstreamError } from './upstream-errors.js'
import { safeReasonPhrase, scrubResponseHeaders } from './scrub.js'
import { BodyScrubber, bodyNeedlesFor } from './body-scrub.js'
import { lingerOnClose } from '../listen/linger.js'
import { NONE_HELD } from '../credentials/held.js'
import { recordEnd } from '../call-outcome.js'
import { FOLLOWED_URLS, resolveLocation } from './route-location.js'
import { RequestLineScanner, watchRequestLine } from './body-request-line.js'

export type ForwardDone = (err: LatchkeyError | null) => void

/**
 * Looks at each chunk of the agent's request body before it is sent on, `last` set on the chunk
 * that completes it (an empty one when the end comes after the last bytes); throwing ends the
 * forward with that error, the chunk unsent: undici closes the upstream connection mid-body, and
 * a body whose end is withheld is never whole upstream (a Content-Length short, or a chunked
 * body's last chunk unsent).
 */
export type BodyInspector = (chunk: Buffer, last: boolean) => void

const NO_BYTES = Buffer.alloc(0)

/** How long a paused body's short held tail waits for more before it goes to the agent (timeRelease). */
const RELEASE_MS = 20

/**
 * A URL a response names (a Location, a Link's, FOLLOWED_URLS') as the agent is to get it, or
 * null when it names the sidecar itself (a redirect is then refused, any other dropped): see
 * Pipeline.relocate.
 */
export type Relocate = (location: string, target: Target) => string | null

/**
 * Puts the response's Set-Cookie headers (`headers`, changed in place) under the reverse route
 * `target` names, or drops them: see forward/route-cookie.ts and Pipeline.scopeCookies. Called
 * only for a call on a route whose response sets a cookie.
 */
export type ScopeCookies = (headers: IncomingHttpHeaders, target: Target) => void

export interface ForwardTimeouts {
  /**
   * timeouts.body_ms: an agent's streamed request body silent this long ends the call
   * (watchBodyStall), as does an agent taking none of the response this long; 0, never.
   */
  bodyGapMs: number
  /**
   * timeouts.headers_ms, counted again from the first interim (1xx) response to the final one:
   * undici restarts its own headers timer at each 1xx, so an upstream sending 102s without end
   * held the call for ever (onInterim); 0, never.
   */
  headersMs: number
}

const NO_TIMEOUTS: ForwardTimeouts = { bodyGapMs: 0, headersMs: 0 }

/**
 * Interim responses taken before the final one, and their headers' bytes in all. Each is parsed
 * and dropped, with no agent reading to slow the upstream: 1,000 heads of 55 KB cost a sidecar
 * 10 s of CPU. A real server sends a few small ones (103 Early Hints, an old WebDAV server's 102
 * Processing now and then).
 */
export const MAX_INTERIM_RESPONSES = 1000
export const MAX_INTERIM_HEADER_BYTES = 256 * 1024

/** Reason phrases relayed as the upstream wrote them only when plain printable ASCII; else the standard one. */
const PRINTABLE = /^[\t\x20-\x7e]*$/

class ResponseRelay implements Dispatcher.DispatchHandler, Gathered {
  private controller: Dispatcher.DispatchController | null = null
  private finished = false
  /** On a credentialed call: what the body passes through before the agent gets it. */
  private scrubber: BodyScrubber | null = null
  /** A response without a Content-Length: its small chunks are gathered until the tick ends (onResponseData). */
  private coalescing = false
  /** The response is corked until the tick ends (onResponseStart). */
  private corked = false
  private tickPending = false
  /** Waiting for the agent to take what was written (relay); `stalled` cuts it after body_ms. */
  private draining = false
  private stalled: NodeJS.Timeout | null = null
  /** Lets a short held tail go when the body pauses (timeRelease). */
  private releaseTimer: NodeJS.Timeout | null = null
  /**
   * A credentialed body the upstream encoded though asked for none (some APIs always compress):
   * decoded here, so it can be checked for the credential, and relayed as identity.
   */
  private decoder: Transform | null = null
  private decoderFull = false
  private decoderPaused = false
  private upstreamEnded = false
  // Gathered: the small chunks not yet relayed.
  first: Buffer | null = null
  copy: Buffer | null = null
  length = 0
  /**
   * With recordFirst and a Content-Length: bytes of the body still to relay. Its last byte is held
   * (lastByte) until the call is recorded: else a body relayed whole before the upstream's end
   * arrived was the agent's before its event was in the kernel.
   */
  private toRelay = 0
  private lastByte: Buffer | null = null

  constructor(
    private readonly ctx: CallContext,
    private readonly res: ServerResponse,
    private readonly done: ForwardDone,
    private readonly relocate: Relocate,
    private readonly scopeCookies: ScopeCookies,
    /**
     * Set when the call is reported (and so audited) before the response's last bytes are
     * written (AuditSink.recordBeforeResponse): whether the sink keeps an event now.
     */
    private readonly recordFirst: (() => boolean) | null = null,
    private readonly timeouts: ForwardTimeouts = NO_TIMEOUTS,
  ) {
    res.once('close', () => {
      // Not kept past the call: it would hold this relay, and the call with it, for body_ms.
      this.clearStall()
      // The agent went away mid-response: stop the upstream too, and say whose doing it was.
      if (!this.finished) this.abort(new LatchkeyError('LK_CLIENT_CLOSED', res.req.complete ? 'the agent closed the connection before the response was complete' : 'the agent closed the connection before its request body was complete'))
    })
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.controller = controller
    if (this.abortedWith) controller.abort(this.abortedWith)
  }

  private abortedWith: Error | null = null
  /** Interim (1xx) responses dropped so far, and the deadline they started for the final one (onInterim). */
  private interims = 0
  private interimBytes = 0
  private interimDeadline: NodeJS.Timeout | null = null

  /** Ends the call with `err` (reported through `done`), wherever the forward is. */
  abort(err: Error): void {
    if (this.upstreamEnded && this.decoder !== null) {
      // The upstream is done; only the decoding was left (the agent gone, or not reading): it ends here.
      if (this.finished) return
      const e = upstreamError(err, this.ctx.method)
      return this.cutShort(e.code, e.reason)
    }
    if (this.controller) this.controller.abort(err)
    else this.abortedWith = err
  }

  /**
   * An interim (1xx) response, dropped: counted, and the first starts the deadline for the final
   * one (timeouts.headers_ms from then, or from the request body's end if it is still coming).
   */
  private onInterim(headers: IncomingHttpHeaders): void {
    for (const name in headers) {
      const value = headers[name]!
      this.interimBytes += name.length + (typeof value === 'string' ? value.length : value.reduce((n, v) => n + v.length, 0))
    }
    if (++this.interims > MAX_INTERIM_RESPONSES || this.interimBytes > MAX_INTERIM_HEADER_BYTES) {
      return this.abort(new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream sent more interim (1xx) responses than the sidecar takes before a final one (${MAX_INTERIM_RESPONSES}, or ${MAX_INTERIM_HEADER_BYTES / 1024} KiB of headers)`))
    }
    const ms = this.timeouts.headersMs
    if (this.interims > 1 || ms <= 0) return
    const start = () => {
      if (this.finished || this.ctx.status !== 0) return
      this.interimDeadline = setTimeout(() => {
        this.interimDeadline = null
        if (!this.finished) this.abort(afterSending('LK_UPSTREAM_TIMEOUT', `the upstream sent interim (1xx) responses but no final one within ${ms} ms (timeouts.headers_ms)`, this.ctx.method))
      }, ms).unref()
    }
    const req = this.res.req
    if (req.complete) start()
    else req.once('end', start)
  }

  private clearInterimDeadline(): void {
    clearTimeout(this.interimDeadline!)
    this.interimDeadline = null
  }

  /** A response not relayed for its Location: a 502 saying `why`, its status not the upstream's. */
  private refuseLocation(why: string): void {
    this.ctx.status = 0
    this.abort(new LatchkeyError('LK_UPSTREAM_PROTOCOL', `${why}: not relayed`))
  }

  /** Each URL of FOLLOWED_URLS and each Link URI relayed as relocate gives them (see onResponseStart); one it refuses is dropped. */
  private relocateLinks(clean: Record<string, string | string[] | undefined>): void {
    for (const name of FOLLOWED_URLS) if (clean[name] !== undefined) this.relocateEach(clean, name)
    const link = clean.link
    if (link !== undefined) {
      const target = this.ctx.target!
      const links = (Array.isArray(link) ? link : [link]).map((l) => relocateLinkValue(l, (uri) => this.relocate(uri, target))).filter((l) => l !== '')
      if (links.length === 0) delete clean.link
      else clean.link = links.length === 1 ? links[0]! : links
    }
  }

  /** `clean[name]`, one URL or several, as relocate gives each: one it refuses is left out, the header dropped when none is left. */
  private relocateEach(clean: Record<string, string | string[] | undefined>, name: string): void {
    const value = clean[name]!
    const kept = (Array.isArray(value) ? value : [value]).map((url) => this.relocate(url, this.ctx.target!)).filter((url) => url !== null)
    if (kept.length === 0) delete clean[name]
    else clean[name] = kept.length === 1 ? kept[0]! : kept
  }

  onResponseStart(_c: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    // An interim response is never relayed. The sidecar answers `Expect` itself; and a 103 Early
    // Hints desyncs Python's http.client (requests, urllib3), which takes any 1xx but 100 for the
    // final answer: the real one was then read as the answer to the agent's next request on that
    // proxy connection, whatever origin it went to.
    if (statusCode < 200) return this.onInterim(headers)
    if (this.interimDeadline !== null) this.clearInterimDeadline()
    this.ctx.status = statusCode
    this.ctx.upstreamMs = performance.now() - this.ctx.t0
    const clean = inboundResponseHeaders(headers)
    // 204 must not carry a Content-Length (RFC 9110 §8.6); relaying one invites a client to wait for a body.
    if (statusCode === 204 && clean['content-length'] !== undefined) delete clean['content-length']
    // Relocated before the head is scrubbed: the URL parser reshapes what it resolves (drops tabs,
    // resolves dot segments), and could put together a secret the scrub did not see whole.
    const location = clean.location as string | string[] | undefined
    if (location !== undefined) {
      const redirect = statusCode >= 300 && statusCode < 400
      if (redirect) {
        const locations = Array.isArray(location) ? location : [location]
        if (locations.some(readTwoWays)) return this.refuseLocation('the upstream redirected to a Location that clients read as different URLs (a backslash, three slashes, or http: without //)')
        // Where the sidecar's parser sees no URL, it cannot tell where a client's goes (`//:15001/x`
        // is this host's port 15001 to Python's urllib).
        if (locations.some((l) => resolveLocation(l, this.ctx.target!) === null)) return this.refuseLocation('the upstream redirected to a Location that is not a URL')
      }
      if (redirect) {
        // Which of two a client follows is its own choice: a redirect names one place.
        const relayed = Array.isArray(location) ? null : this.relocate(location, this.ctx.target!)
        if (relayed === null) {
          return this.refuseLocation(Array.isArray(location) ? 'the upstream redirected to more than one Location' : "the upstream redirected to this sidecar's own address, where following it would make another call, with another credential")
        }
        ;(clean as Record<string, string>).location = relayed
      } else {
        // Outside a redirect a Location is followed by the clients that choose to (an Azure SDK's
        // poller, on a 202): one naming the sidecar is dropped, as such a Link is, the call answered.
        this.relocateEach(clean as Record<string, string | string[] | undefined>, 'location')
      }
    }
    // The other URLs a client follows by itself: pagination's `Link: <…>; rel="next"` (Octokit,
    // the GitLab and Stripe SDKs), Content-Location, and a long-running operation's status URL
    // (FOLLOWED_URLS). On a route they are put under it as a Location is; one naming the sidecar
    // is dropped, as such a redirect is refused.
    this.relocateLinks(clean as Record<string, string | string[] | undefined>)
    const { binding, credential } = this.ctx
    if (binding && credential) {
      // Every credential the source holds for the binding, not only this call's: an upstream that
      // shows one request's token to another would hand this task another's (CredentialSource.held).
      const held = this.ctx.credentialSource?.held(binding) ?? NONE_HELD
      scrubResponseHeaders(clean, binding, credential, held)
      statusMessage = safeReasonPhrase(statusMessage, binding, credential, held)
      // The upstream's own Content-Encoding, even where its Connection lists it (dropped from the
      // head as hop-by-hop): the body is in that coding all the same, and relayed unlabelled it
      // went past the scrub compressed, for the agent to gunzip.
      const contentEncoding = headers['content-encoding']
      const coding = encodedBody(clean, contentEncoding, headers['transfer-encoding'], statusCode, this.res.req.method)
      if (coding !== null) {
        const decoder = headers['transfer-encoding'] === undefined || String(headers['transfer-encoding']).trim().toLowerCase() === 'chunked' ? decoderFor(contentEncoding) : null
        if (decoder === null) {
          this.ctx.status = 0
          const what = coding === 'chunked' ? 'a body chunked twice, which HTTP forbids' : `a ${coding}-encoded body though the sidecar asked for none`
          return this.abort(new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream sent ${what}; it cannot be checked for the credential, so it is not relayed`))
        }
        this.decode(decoder, coding, clean)
      } else if ((this.res.req.method === 'HEAD' || statusCode === 304) && decoderMaker(clean['content-encoding']) !== undefined) {
        // No body, but the head of one that would be relayed decoded (a HEAD, a 304 revalidating
        // such a GET): it describes what the agent gets, as that GET's head did.
        describeDecoded(clean)
      }
      // Asked again as the body streams (scrubbed): a token issued meanwhile is held too.
      this.scrubber = new BodyScrubber(bodyNeedlesFor(binding, credential, held))
    }
    // On a reverse route every cookie is put under `/<route>/` (forward/route-cookie.ts): all
    // routes share the sidecar's host, and a jar would send one upstream's cookies to the others.
    // After the scrub: scoping decodes nothing, so spells out no secret the scrub did not see,
    // and a Set-Cookie the scrub replaced (no name=value left) is dropped, not set on the whole host.
    const target = this.ctx.target!
    if (target.route !== null && (clean['set-cookie'] !== undefined || clean['set-cookie2'] !== undefined)) this.scopeCookies(clean, target)
    // node:http sends the head with the first chunk in one write, and ending a response with a
    // Content-Length writes nothing more. A chunked one ends with its own "0\r\n\r\n" write: as
    // undici usually delivers head, body and end in one tick, corking until the next sends a small
    // chunked response in one write instead of two (strace: one writev per response either way).
    // undici parses all that one socket read holds in one synchronous run: by the end of it the
    // body's first bytes or its end have come with the head, or the head goes alone, as the
    // upstream sent it: a client may act on the status, or an API think long, before any body
    // comes. A chunked response looks when its tick ends (endOfTick); one with a Content-Length,
    // at the end of the event loop's turn, with every other response started in it (flushHeads:
    // one setImmediate for all, not a tick of its own for each, which cost 4% CPU a call).
    if (this.recordFirst !== null && this.decoder === null && clean['content-length'] !== undefined) this.toRelay = Number(clean['content-length'])
    if (clean['content-length'] === undefined) {
      this.res.cork()
      this.corked = this.coalescing = this.tickPending = true
      process.nextTick(endOfTick, this)
    } else {
      awaitingBody.push(this)
      if (awaitingBody.length === 1) setImmediate(flushHeads)
    }
    // Answered before the agent finished sending (an early 401 or 413): the rest of its body has
    // nowhere to go, and the connection cannot be trusted for a next request until it is read.
    if (!this.res.req.complete) {
      this.res.shouldKeepAlive = false
      lingerOnClose(this.res.req)
    }
    try {
      if (statusMessage && PRINTABLE.test(statusMessage)) this.res.writeHead(statusCode, statusMessage, clean as Record<string, string | string[]>)
      else this.res.writeHead(statusCode, clean as Record<string, string | string[]>)
    } catch {
      // A head node:http will not write (a character it refuses in a value): a coded 502,
      // never an exception inside undici's parser that would leave the call hanging unaudited.
      this.ctx.status = 0
      this.abort(new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent a response head that cannot be relayed'))
    }
  }

  /**
   * Relays the body decoded: its head says identity, with no Content-Length (the decoded length is
   * not known) and a weak ETag (the same representation, other bytes). Back-pressure holds both
   * ways: a full decoder pauses the upstream, an agent not reading pauses the decoder.
   */
  private decode(decoder: Transform, coding: string, clean: IncomingHttpHeaders): void {
    describeDecoded(clean)
    this.decoder = decoder
    decoder.on('data', (d: Buffer) => this.decoded(d))
    decoder.once('end', () => {
      if (!this.finished) this.complete()
    })
    // `on`, not `once`: a second error (a write racing the destroy) must find a listener too.
    decoder.on('error', () => {
      if (this.finished) return
      this.finished = true
      this.controller?.abort(new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'undecodable body'))
      // The head has gone.
      this.cutShort('LK_UPSTREAM_PROTOCOL', `the upstream's ${coding}-encoded body does not decode`)
    })
  }

  private decoded(d: Buffer): void {
    if (this.finished || this.controller === null) return
    this.ctx.bytesOut += d.length
    this.relay(this.controller, d)
    if (this.draining && !this.decoderPaused) {
      this.decoderPaused = true
      this.decoder!.pause()
      this.res.once('drain', () => {
        this.decoderPaused = false
        this.decoder?.resume()
      })
    }
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (this.decoder !== null) {
      if (this.finished) return
      if (!this.decoder.write(chunk) && !this.decoderFull) {
        this.decoderFull = true
        controller.pause()
        this.decoder.once('drain', () => {
          this.decoderFull = false
          controller.resume()
        })
      }
      return
    }
    this.ctx.bytesOut += chunk.length
    // A chunked response comes to this handler one chunk frame at a time, all the frames of one
    // socket read in one synchronous run of undici's parser: relayed one by one, 200,000 one-byte
    // frames cost the sidecar 0.5-1.6 s of CPU (a write and a frame of its own each, to the agent
    // too). The small ones are gathered (gatherAdd) and relayed together when the tick ends
    // (endOfTick), or at once when BATCH_BYTES are gathered; a chunk that large by itself goes
    // as it came. A response with a Content-Length comes one socket read at a time already.
    if (this.coalescing && (this.length > 0 || chunk.length < BATCH_BYTES)) {
      gatherAdd(this, chunk)
      if (this.length < BATCH_BYTES) {
        if (!this.tickPending) {
          this.tickPending = true
          process.nextTick(endOfTick, this)
        }
        return
      }
      chunk = gatherTake(this)
    }
    this.relay(controller, chunk)
  }

  /** Sends `chunk` on to the agent (through the scrubber), pausing the upstream while the agent's side is full. */
  relay(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    const checked = this.scrubbed(chunk)
    if (this.scrubber !== null) this.timeRelease()
    if (checked !== null) this.send(controller, checked)
  }

  /**
   * A short tail the scrubber holds goes to the agent once no more body has come for RELEASE_MS
   * (body-scrub.ts, "a stream of bare text"); a chunk in the meantime takes it along instead.
   */
  private timeRelease(): void {
    if (this.releaseTimer !== null) clearTimeout(this.releaseTimer)
    this.releaseTimer = this.scrubber!.releasable ? setTimeout(() => this.releaseHeld(), RELEASE_MS).unref() : null
  }

  private releaseHeld(): void {
    this.releaseTimer = null
    if (this.finished || this.controller === null || this.res.destroyed) return
    const out = this.scrubber!.release()
    if (out !== null) this.send(this.controller, out)
  }

  private send(controller: Dispatcher.DispatchController, checked: Buffer): void {
    if (this.toRelay > 0) {
      this.toRelay -= checked.length
      if (this.toRelay <= 0) {
        this.lastByte = Buffer.from(checked.subarray(checked.length - 1))
        checked = checked.subarray(0, checked.length - 1)
        if (checked.length === 0) return
        // The end follows at once (undici's parser reports it in the same run): corked, the rest
        // and the held byte still leave in one write (complete() uncorks).
        this.res.cork()
      }
    }
    // Not paused once the body's last byte is held: the end is already here, and the response is
    // corked until complete() writes it. Paused on a corked response, it waited for a 'drain' that
    // only an uncork brings: a body of 16 KiB or more arriving in one read (17-64 KB here) hung
    // until the upstream's keep-alive timer cut it, and larger ones were cut at their last read.
    if (!this.res.write(checked) && !this.draining && this.lastByte === null) {
      this.draining = true
      controller.pause()
      // An agent that never reads held the call, and the upstream connection, for ever (memory
      // stays bounded by the pause): one that takes nothing for body_ms is cut, as an upstream is.
      const gapMs = this.timeouts.bodyGapMs
      if (gapMs > 0) {
        this.stalled = setTimeout(() => {
          if (!this.finished) this.abort(new LatchkeyError('LK_IDLE_TIMEOUT', `the agent read none of the response for ${gapMs} ms (timeouts.body_ms)`))
        }, gapMs).unref()
      }
      this.res.once('drain', () => {
        this.clearStall()
        this.draining = false
        controller.resume()
      })
    }
  }

  /** What of `chunk` may go to the agent now, past the credential scrubber on a credentialed call. */
  private scrubbed(chunk: Buffer): Buffer | null {
    if (this.scrubber === null) return chunk
    // A stream (SSE, a log tail) outlives the calls around it: a token issued after its head
    // (another task's, a refresh) is looked for from the next chunk that finds nothing held.
    const ctx = this.ctx
    const now = bodyNeedlesFor(ctx.binding!, ctx.credential!, ctx.credentialSource?.held(ctx.binding!) ?? NONE_HELD)
    if (now !== this.scrubber.needles) this.scrubber = this.scrubber.lookingFor(now) ?? this.scrubber
    return this.scrubber.push(chunk)
  }

  private clearStall(): void {
    if (this.stalled === null) return
    clearTimeout(this.stalled)
    this.stalled = null
  }

  /**
   * Ends the call with part of the response already with the agent: the only honest signal left is
   * a cut (see `cut`). A call cut on purpose (revoked, its task ended) keeps that reason, not the
   * abort it caused (recordEnd).
   */
  private cutShort(code: ErrorCode, reason: string): void {
    this.finished = true
    this.decoder?.destroy()
    recordEnd(this.ctx, code, reason)
    cut(this.res)
    this.done(null)
  }

  /** node:http writes a head with the body's first bytes: when none came with it, it is written by itself. */
  flushHeadAlone(): void {
    if (this.ctx.bytesOut === 0 && !this.finished && this.res.headersSent && !this.res.destroyed) this.res.flushHeaders()
  }

  /** The tick in which chunks were gathered (or the head corked) is over: relay them, uncork. */
  endOfTick(): void {
    this.tickPending = false
    if (this.length > 0) {
      const gathered = gatherTake(this)
      if (!this.finished && this.controller !== null) this.relay(this.controller, gathered)
    }
    this.flushHeadAlone()
    if (this.corked) {
      this.corked = false
      this.res.uncork()
    }
  }

  onResponseEnd(): void {
    this.upstreamEnded = true
    // Complete once the decoder has given all it holds.
    if (this.decoder !== null) return void this.decoder.end()
    this.complete()
  }

  /** The whole response has been relayed: end it and report the call. */
  private complete(): void {
    // The last chunks gathered, written as relay() would (the agent's taking them is end()'s affair).
    const checked = this.length > 0 ? this.scrubbed(gatherTake(this)) : null
    const rest = this.scrubber !== null ? this.scrubber.end() : null
    if (this.scrubber !== null) this.ctx.credentialInBody = this.scrubber.found
    if (this.recordFirst !== null) {
      // No agent holds a whole response the trail may not have: a sink that cannot keep the
      // event now (the spool's disk full) has the call cut short instead, and recorded so.
      if (!this.recordFirst()) return this.cutShort('LK_AUDIT_UNAVAILABLE', 'the audit spool could not take the call: its response was cut before its end')
      this.finished = true
      this.done(null)
      // This very event's append failed: it waits in memory, and the response stops short of its end.
      if (!this.recordFirst()) return cut(this.res)
    }
    this.finished = true
    if (checked !== null) this.res.write(checked)
    if (rest !== null) this.res.write(rest)
    if (this.lastByte !== null) this.res.write(this.lastByte)
    this.res.end()
    // Send the response now; the bookkeeping in `done` must not hold it back until the next tick.
    this.res.uncork()
    this.corked = false
    if (this.recordFirst === null) this.done(null)
  }

  onResponseError(_c: Dispatcher.DispatchController, err: Error): void {
    if (this.interimDeadline !== null) this.clearInterimDeadline()
    if (this.finished) return
    // A 204 or 304 has no body whatever its Content-Length says (a 304's may give the length of
    // the representation, RFC 9110 §8.6), yet undici faults the mismatch after the head: the
    // response is complete as it stands, and anything an upstream sent after it is dropped.
    if ((this.ctx.status === 204 || this.ctx.status === 304) && (err as { code?: string }).code === 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH') {
      return this.onResponseEnd()
    }
    this.finished = true
    this.decoder?.destroy()
    // ctx.upstreamMs is set when the final head arrives (onResponseStart): past it, a close is a body cut short.
    const mapped = this.ctx.upstreamMs !== null ? bodyError(err, this.ctx.method) : upstreamError(err, this.ctx.method, false)
    if (this.res.headersSent) {
      this.cutShort(mapped.code, mapped.reason)
    } else {
      this.done(mapped)
    }
  }
}

/**
 * The content or transfer coding of a body that is coming, when it is not `identity` (or, for a
 * transfer coding, `chunked`, which undici undoes): such a body cannot be read for the
 * credential. None comes with a HEAD, a 204 or 304, or a Content-Length of 0. `content` and
 * `transferEncoding` are the upstream's own, before hop-by-hop and Connection-listed headers are dropped.
 */
function encodedBody(headers: IncomingHttpHeaders, content: string | string[] | undefined, transferEncoding: string | string[] | undefined, status: number, method: string | undefined): string | null {
  if ((content === undefined && transferEncoding === undefined) || method === 'HEAD' || status === 204 || status === 304 || headers['content-length'] === '0') return null
  for (const [value, passes] of [[content, 'identity'], [transferEncoding, 'chunked']] as const) {
    if (value === undefined) continue
    let chunked = false
    // Sent twice, a header comes as a list: every value counts.
    for (const coding of (Array.isArray(value) ? value.join(',') : value).split(',')) {
      const c = coding.trim().toLowerCase()
      // Named only when registered: the raw Transfer-Encoding is not scrubbed, and an upstream
      // echoing the request there had the credential quoted in the 502, the audit and the log.
      if (c !== '' && c !== 'identity' && c !== passes) return KNOWN_CODINGS.has(c) ? c : 'unregistered'
      // Chunked twice (RFC 9112 §7.1 forbids it): undici undoes one, and the other's framing
      // would split the credential where the scrub looks for it whole.
      if (c === 'chunked') {
        if (chunked) return 'chunked'
        chunked = true
      }
    }
  }
  return null
}

/** A head rewritten for its body decoded: identity, length unknown, a weak ETag (the same representation, other bytes). */
function describeDecoded(clean: IncomingHttpHeaders): void {
  delete clean['content-encoding']
  delete clean['content-length']
  delete clean['content-md5']
  delete clean['accept-ranges']
  const etag = clean.etag
  if (typeof etag === 'string' && !etag.startsWith('W/')) clean.etag = `W/${etag}`
}

/**
 * A decoder for a body whose Content-Encoding names exactly one coding the sidecar can undo
 * (gzip, deflate, br), in one header line; null for anything else (a list, two lines, an unknown
 * coding), which is refused as before: the more layers, the more ways to read them.
 */
function decoderFor(contentEncoding: string | string[] | undefined): Transform | null {
  return decoderMaker(contentEncoding)?.() ?? null
}

/** What makes the decoder decoderFor gives, without making one (a HEAD or 304 asks only whether there would be one). */
function decoderMaker(contentEncoding: string | string[] | undefined): (() => Transform) | undefined {
  return typeof contentEncoding === 'string' ? DECODERS.get(contentEncoding.trim().toLowerCase()) : undefined
}

const DECODERS = new Map<string, () => Transform>([
  ['gzip', createGunzip],
  ['x-gzip', createGunzip],
  // zlib-wrapped or raw, as undici's fetch and browsers read it (deflate.ts).
  ['deflate', createDeflateDecoder],
  ['br', createBrotliDecompress],
])

/** Content and transfer codings (IANA's registry and their x- aliases): the ones a refusal names. */
const KNOWN_CODINGS = new Set(['gzip', 'x-gzip', 'deflate', 'br', 'zstd', 'compress', 'x-compress', 'dcb', 'dcz', 'aes128gcm', 'exi', 'pack200-gzip', 'chunked'])

/**
 * A Location the sidecar's URL parser (WHATWG) and an RFC 3986 one (curl, Python) resolve to
 * different places, so a redirect checked as one is followed as the other: WHATWG reads `\` as
 * `/` where curl reads it as data (`http://a.test\@127.0.0.1:15001/x`: a.test to one, the
 * sidecar to the other), and `http:/127.0.0.1:15001/x` as a path on the current origin where curl
 * reads 127.0.0.1:15001 as its host.
 */
function readTwoWays(location: string): boolean {
  // Tabs first dropped, as both readers drop them anywhere in a URL: `/\t//bank/x` is `///bank/x` to each.
  if (location.includes('\t')) location = location.replace(/\t/g, '')
  return location.includes('\\') || THIRD_SLASH.test(location) || /^\s*https?:(?!\/\/[^/])/i.test(location)
}

/**
 * `///bank/x`: to WHATWG, host `bank`; to RFC 3986 an empty authority, which Python, Java and
 * others fill with the URL they asked, so from a route's upstream it is the sidecar's route
 * `bank`, with bank's credential.
 */
const THIRD_SLASH = /^\s*\/\/\//

/**
 * Ends a response cut part-way so the agent can tell: where its end is framed (a Content-Length,
 * chunks), a close short of it is a cut; where it is not (an HTTP/1.0 agent reads to the close),
 * a close reads as the whole response, and only a reset says otherwise.
 */
function cut(res: ServerResponse): void {
  const framed = res.getHeader('content-length') !== undefined || (res as ServerResponse & { chunkedEncoding?: boolean }).chunkedEncoding === true
  const socket = res.socket
  if (!framed && socket !== null && !socket.destroyed) socket.resetAndDestroy()
  else res.destroy()
}

/**
 * A Link header (RFC 8288) with each `<URI-Reference>` put through `relocate`; a link-value whose
 * URI it refuses (null) is left out whole. Quoted parameters (`title="<x>"`) are kept as they are.
 */
export function relocateLinkValue(value: string, relocate: (uri: string) => string | null): string {
  const kept: string[] = []
  let current = ''
  let dropped = false
  for (let i = 0; i < value.length; i++) {
    const c = value[i]!
    if (c === '"') {
      let j = i + 1
      while (j < value.length && value[j] !== '"') j += value[j] === '\\' ? 2 : 1
      current += value.slice(i, j + 1)
      i = j
    } else if (c === '<') {
      const end = value.indexOf('>', i)
      if (end === -1) {
        current += value.slice(i)
        break
      }
      const uri = relocate(value.slice(i + 1, end))
      if (uri === null) dropped = true
      else current += `<${uri}>`
      i = end
    } else if (c === ',') {
      if (!dropped) kept.push(current)
      current = ''
      dropped = false
    } else current += c
  }
  if (!dropped) kept.push(current)
  return kept.map((l) => l.trim()).filter((l) => l !== '').join(', ')
}

/** Responses with a Content-Length whose heads came in this turn of the event loop (see onResponseStart). */
const awaitingBody: ResponseRelay[] = []

function flushHeads(): void {
  for (const relay of awaitingBody) relay.flushHeadAlone()
  awaitingBody.length = 0
}

function endOfTick(relay: ResponseRelay): void {
  relay.endOfTick()
}

/**
 * The agent's request body as undici reads it, counted as it is sent. When undici stops reading
 * (the upstream answered early, or hung up), the agent's request is left as it is, not destroyed:
 * its connection must live on to carry that answer (see onResponseStart).
 */
async function* counted(body: IncomingMessage, ctx: CallContext, inspect: BodyInspector | null): AsyncIterable<Buffer> {
  const declared = Number(body.headers['content-length'])
  let requestLine: RequestLineScanner | null = new RequestLineScanner()
  for await (const chunk of body.iterator({ destroyOnReturn: false })) {
    inspect?.(chunk as Buffer, ctx.bytesIn + (chunk as Buffer).length >= declared)
    requestLine = watchRequestLine(requestLine, chunk as Buffer)
    ctx.bytesIn += (chunk as Buffer).length
    yield chunk as Buffer
  }
}

/**
 * A chunked request body as undici reads it: what arrives in one turn of the event loop handed on
 * as one Buffer, counted as it is sent. node:http's parser calls into JavaScript once per chunk
 * frame and drains the tick and microtask queues after each call, so a consumer that takes what
 * it is woken for (as `counted` does) takes every frame by itself: 200,000 one-byte chunks were
 * 183,618 upstream writes (each a syscall and a chunk frame of its own), 3 s of CPU, and 2 s of
 * latency for every other call on the sidecar (bench/chunked-body.mjs).
 *
 * Here each chunk is read as it arrives and copied into the batch (holding the small Buffers
 * themselves until the batch went cost more than copying them: 550 against 360 ms for 200,000,
 * as they lived long enough to be promoted), and the batch goes when the turn ends (setImmediate:
 * after the parser has gone through all that the socket's read held), when it reaches BATCH_BYTES
 * (a first chunk that large goes as it came, uncopied), or when the body ends. The cost left is
 * node's own, per frame (a Buffer and a call into JavaScript each). While undici holds a batch
 * (the upstream is slow to take it) about one more is gathered; then nothing is read, the
 * request's own buffer fills, the parser stops reading the socket, and the agent is held back,
 * as before. The bytes so held are in the request's buffer, which watchBodyStall counts as not
 * the agent's stall.
 * Mirrors node's Readable async iterator otherwise (destroyOnReturn: false, see `counted`).
 */
async function* coalesced(body: IncomingMessage, ctx: CallContext, inspect: BodyInspector | null): AsyncIterable<Buffer> {
  const batch: Gathered = { first: null, copy: null, length: 0 }
  let requestLine: RequestLineScanner | null = new RequestLineScanner()
  // undefined while the body is open; null once it ended; the error that ended it otherwise.
  let error: Error | null | undefined
  let immediate: NodeJS.Immediate | null = null
  let turnOver = false
  let wake = noop
  const signal = (): void => {
    const w = wake
    wake = noop
    w()
  }
  const endTurn = (): void => {
    immediate = null
    if (batch.length === 0) return
    turnOver = true
    signal()
  }
  const gather = (): void => {
    while (batch.length < BATCH_BYTES && !body.destroyed) {
      const chunk = body.read() as Buffer | null
      if (chunk === null) break
      gatherAdd(batch, chunk)
    }
    if (batch.length >= BATCH_BYTES || (batch.length > 0 && turnOver)) signal()
    else if (batch.length > 0 && immediate === null) immediate = setImmediate(endTurn)
  }
  const onReadable = (): void => {
    if (batch.length < BATCH_BYTES) gather()
  }
  body.on('readable', onReadable)
  const cleanup = finished(body, { writable: false }, (err) => {
    error = err ?? null
    signal()
  })
  try {
    for (;;) {
      if (batch.length < BATCH_BYTES) gather()
      if (error) throw error
      if (batch.length > 0 && (batch.length >= BATCH_BYTES || turnOver || error === null)) {
        const chunk = gatherTake(batch)
        turnOver = false
        // Once the body has ended (error null), all of it was read into the batch.
        inspect?.(chunk, error === null)
        requestLine = watchRequestLine(requestLine, chunk)
        ctx.bytesIn += chunk.length
        yield chunk
        continue
      }
      if (error === null) {
        // Ended after its last bytes went: the last chunk of the chunked body upstream is still unsent.
        inspect?.(NO_BYTES, true)
        return
      }
      await new Promise<void>((resolve) => (wake = resolve))
    }
  } finally {
    body.off('readable', onReadable)
    cleanup()
    if (immediate !== null) clearImmediate(immediate)
  }
}

/** A batch of small chunks goes once it holds this much; a first chunk this large goes by itself. */
const BATCH_BYTES = 16 * 1024

/** Small chunks gathered into one: the first kept as it came, all copied into one buffer from the second on. */
interface Gathered {
  first: Buffer | null
  copy: Buffer | null
  length: number
}

function gatherAdd(g: Gathered, chunk: Buffer): void {
  if (g.length === 0) g.first = chunk
  else {
    if (g.copy === null || g.length + chunk.length > g.copy.length) {
      // At most one growth per batch: a batch that overflows its buffer is full.
      const grown = Buffer.allocUnsafe(Math.max(BATCH_BYTES, g.length + chunk.length))
      if (g.copy === null) g.first!.copy(grown)
      else g.copy.copy(grown, 0, 0, g.length)
      g.copy = grown
      g.first = null
    }
    chunk.copy(g.copy, g.length)
  }
  g.length += chunk.length
}

/** What was gathered, as one Buffer; `g` is left empty. */
function gatherTake(g: Gathered): Buffer {
  const out = g.copy === null ? g.first! : g.copy.subarray(0, g.length)
  g.first = g.copy = null
  g.length = 0
  return out
}

function noop(): void {}

/** Whether a request carries a body: chunked, or a Content-Length above 0. */
export function hasRequestBody(req: IncomingMessage): boolean {
  const contentLength = req.headers['content-length']
  return contentLength === undefined ? req.headers['transfer-encoding'] !== undefined : Number(contentLength) > 0
}

export function forward(
  pool: Pool,
  ctx: CallContext,
  req: IncomingMessage,
  res: ServerResponse,
  path: string,
  headers: OutboundHeaders,
  done: ForwardDone,
  relocate: Relocate,
  scopeCookies: ScopeCookies,
  recordFirst: (() => boolean) | null = null,
  timeouts: ForwardTimeouts = NO_TIMEOUTS,
  /** Sees the body's chunks before they go. */
  inspect: BodyInspector | null = null,
): void {
  const chunked = req.headers['content-length'] === undefined && req.headers['transfer-encoding'] !== undefined
  // bytes_in is what was sent on, not what the agent announced: an upload cut short says so.
  // A Content-Length body reaches the parser's callback one socket read at a time already: only a
  // chunked one can come as many tiny frames.
  const body = chunked ? coalesced(req, ctx, inspect) : hasRequestBody(req) ? counted(req, ctx, inspect) : null
  const relay = new ResponseRelay(ctx, res, done, relocate, scopeCookies, recordFirst, timeouts)
  const bodyGapMs = timeouts.bodyGapMs
  ctx.forward = relay
  // A chunked body can turn out malformed after the head has gone: the listener must be able to
  // end this call with a 400 (abortChunkedForward). Only such bodies are tracked.
  if (chunked) chunkedForwards.set(req, relay)
  if (body && bodyGapMs > 0) watchBodyStall(req, bodyGapMs, (err) => relay.abort(err), () => ctx.bytesIn)
  pool.dispatch(
    {
      path,
      method: req.method as Dispatcher.HttpMethod,
      headers: headers as Record<string, string | string[]>,
      // undici documents async iterables as bodies; its type declaration lists only Readable.
      body: body as unknown as IncomingMessage | null,
      // An agent's request is never replayed behind its back.
      idempotent: false,
    },
    relay,
  )
}

const chunkedForwards = new WeakMap<IncomingMessage, { abort(err: Error): void }>()

/** Ends the forward of `req`, whose chunked body the parser found malformed, with `err`. */
export function abortChunkedForward(req: IncomingMessage, err: Error): boolean {
  const relay = chunkedForwards.get(req)
  if (!relay) return false
  chunkedForwards.delete(req)
  relay.abort(err)
  return true
}
