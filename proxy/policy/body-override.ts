// A method override carried in a POST form: `_method=DELETE` makes the POST a DELETE to Laravel,
// Symfony, Rails (Rack::MethodOverride), Spring's HiddenHttpMethodFilter and Express's
// method-override. The query and header spellings are stripped (pipeline.ts, forward/headers.ts);
// a body cannot be edited in flight, so where the method matters to the policy an urlencoded
// form is read first and its override judged as the method it names.
//
// Forms are small by nature, so reading one whole costs nothing an agent notices. JSON bodies
// (Laravel reads `_method` there too) and multipart forms are scanned as they stream instead
// (json-override.ts, multipart-override.ts).
import type { IncomingMessage } from 'node:http'
import type { Decider, Target } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { decodeBytewise, namesParameter } from '../credentials/bindings.js'
import { hasRequestBody, trackChunkedBody } from '../forward/forward.js'
import { watchBodyStall } from '../forward/body-stall.js'

/** Forms read to look for an override: far above a form an API takes, far below memory. */
export const MAX_CHECKED_BODY = 1024 * 1024
const OVERRIDE_NAMES = ['_method']
/** What the frameworks accept as an override (Symfony: any upper-case token; these are the ones in use). */
const OVERRIDABLE = ['GET', 'HEAD', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'PURGE']
/** A method token (RFC 9110), as a framework would take it once upper-cased. */
export const OVERRIDE_TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$/

/**
 * Whether a framework would read `_method` from this request's body: a POST of a form, with a
 * body. A form as they tell one: PHP ends the media type at `;`, `,` or a space, Rack at `;` or
 * `,` (`application/x-www-form-urlencoded, text/plain` is a form to both), and Rack reads a POST
 * with no media type at all as a form.
 */
export function mayOverrideInBody(method: string, req: IncomingMessage): boolean {
  if (method !== 'POST' || !hasRequestBody(req)) return false
  const type = (req.headers['content-type'] ?? '').trim().split(/[;,\s]/, 1)[0]!.toLowerCase()
  return type === '' || type === 'application/x-www-form-urlencoded'
}

/**
 * Whether this POST's policy would change were it another method: only then is its body read.
 * Every method a rule names is tried too: Symfony takes any upper-case token as an override, so
 * a deny of PROPFIND or LINK is as much at stake as one of DELETE.
 */
export function methodMatters(decider: Decider, target: Target, address: string | undefined): boolean {
  const post = decider.decide('POST', target, address)
  const differs = (m: string) => {
    const d = decider.decide(m, target, address)
    return d.action !== post.action || d.rule !== post.rule
  }
  if (OVERRIDABLE.some(differs)) return true
  for (const m of decider.methods) if (differs(m)) return true
  return false
}

/**
 * The method a form's `_method` names, upper-cased, or null when it names none. Throws
 * LK_BAD_REQUEST for a value that is not one method token (never guessed at).
 */
export function formOverride(body: Buffer): string | null {
  const values: string[] = []
  for (const pair of body.toString('latin1').split(/[&;]/)) {
    if (!namesParameter(pair, OVERRIDE_NAMES, false)) continue
    const eq = pair.indexOf('=')
    values.push(eq === -1 ? '' : decodeBytewise(pair.slice(eq + 1)).trim().toUpperCase())
  }
  if (values.length === 0) return null
  // Frameworks disagree on which of several they take: all of them must be the same one.
  const methods = new Set(values)
  if (methods.size > 1 || !OVERRIDE_TOKEN.test(values[0]!)) {
    throw new LatchkeyError('LK_BAD_REQUEST', 'the form carries a method override (_method) that is not one method token')
  }
  return values[0]!
}

export function formTooLarge(max: number): LatchkeyError {
  return new LatchkeyError('LK_BAD_REQUEST', `a form (or a body with no Content-Type, which Rack reads as one) over ${max} bytes to an upstream whose policy depends on the method cannot be checked for a method override (_method)`)
}

/**
 * The whole body of `req`, at most `max` bytes (LK_BAD_REQUEST beyond: it could not be checked).
 * A chunked body found malformed rejects with the listener's 400; an agent leaving, LK_CLIENT_CLOSED;
 * one that stops sending for `gapMs` (timeouts.body_ms), LK_IDLE_TIMEOUT.
 */
export function readCheckedBody(req: IncomingMessage, max: number, gapMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    const stop = (err: Error | null) => {
      req.removeListener('data', onData)
      req.removeListener('end', onEnd)
      req.removeListener('close', onClose)
      if (err) reject(err)
      else resolve(Buffer.concat(chunks, size))
    }
    const onData = (chunk: Buffer) => {
      size += chunk.length
      if (size > max) return stop(formTooLarge(max))
      chunks.push(chunk)
    }
    const onEnd = () => stop(null)
    const onClose = () => {
      if (!req.complete) stop(new LatchkeyError('LK_CLIENT_CLOSED', 'the agent closed the connection before its request body was complete'))
    }
    trackChunkedBody(req, { abort: (err) => stop(err) })
    if (gapMs > 0) watchBodyStall(req, gapMs, stop)
    req.on('data', onData)
    req.once('end', onEnd)
    req.once('close', onClose)
  })
}
