// A method override carried in a POST form: `_method=DELETE` makes the POST a DELETE to Laravel,
// Symfony, Rails (Rack::MethodOverride), Spring's HiddenHttpMethodFilter and Express's
// method-override. The query and header spellings are stripped (pipeline.ts, forward/headers.ts).
// A body cannot be edited in flight, so where the method matters to the policy an urlencoded
// form is scanned as it streams, each chunk before it is sent on, and an override the policy
// refuses ends the forward with the chunk that completes it unsent (the body is never whole
// upstream, and no framework routes a body it has not read whole). JSON bodies (Laravel reads
// `_method` there too) and multipart forms are scanned the same way (json-override.ts,
// multipart-override.ts). Nothing is held: `curl --data-binary`, which calls any upload a form,
// streams a file of any size.
import type { Decider, ResolvedAddress, Target } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { decodeBytewise, namesParameter } from '../credentials/bindings.js'

const OVERRIDE_NAMES = ['_method']
/** What the frameworks accept as an override (Symfony: any upper-case token; these are the ones in use). */
const OVERRIDABLE = ['GET', 'HEAD', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'PURGE']
/** A method token (RFC 9110), as a framework would take it once upper-cased. */
const OVERRIDE_TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$/

/**
 * Whether a framework would read a body of this Content-Type as an urlencoded form. A form as
 * they tell one: PHP ends the media type at `;`, `,` or a space, Rack at `;` or `,`
 * (`application/x-www-form-urlencoded, text/plain` is a form to both), and Rack reads a POST
 * with no media type at all as a form.
 */
export function isFormBody(contentType: string | undefined): boolean {
  const type = (contentType ?? '').trim().split(/[;,\s]/, 1)[0]!.toLowerCase()
  return type === '' || type === 'application/x-www-form-urlencoded'
}

/** Charsets in which `_method` and its value are the bytes the scanners read (ASCII's, one byte a letter). */
const ASCII_COMPATIBLE = new Set(['utf-8', 'utf8', 'us-ascii', 'ascii', 'iso-8859-1', 'latin1', 'iso-8859-15', 'windows-1252', 'cp1252'])

/**
 * Throws LK_BAD_REQUEST for a body the scanners cannot read as the upstream will, where its
 * method override matters: compressed (Express's body-parser inflates gzip and deflate), or in a
 * charset whose letters are other bytes (body-parser reads JSON in UTF-16 or UTF-32, Tomcat a
 * form in UTF-16 or EBCDIC). Neither is what agents send.
 */
export function uncheckableBody(contentEncoding: string | undefined, contentType: string | undefined): void {
  if (contentEncoding !== undefined && contentEncoding.trim().toLowerCase() !== 'identity') {
    throw new LatchkeyError('LK_BAD_REQUEST', 'a compressed body (Content-Encoding) to an upstream whose policy depends on the method cannot be checked for a method override (_method)')
  }
  for (const m of (contentType ?? '').matchAll(/;\s*charset\s*=\s*"?([^";\s]*)/gi)) {
    if (!ASCII_COMPATIBLE.has(m[1]!.toLowerCase())) {
      throw new LatchkeyError('LK_BAD_REQUEST', `a body in charset "${m[1]!.slice(0, 40).replace(/[^\x21-\x7e]/g, '?')}" to an upstream whose policy depends on the method cannot be checked for a method override (_method); send it in UTF-8`)
    }
  }
}

/**
 * Whether this POST's policy would change were it another method: only then is its body scanned.
 * Every method a rule names is tried too: Symfony takes any upper-case token as an override, so
 * a deny of PROPFIND or LINK is as much at stake as one of DELETE.
 */
export function methodMatters(decider: Decider, target: Target, address: ResolvedAddress | undefined): boolean {
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
 * How much of a field name is kept to be judged, once what frameworks drop from its start (PHP:
 * spaces; qs and Rack: brackets) is gone: `_method` in any spelling fits many times over (21
 * bytes percent-encoded). The rest of a longer name (an upload curl calls a form, a CSV with no
 * `=`) is not held.
 */
const KEPT_NAME = 256
/** What frameworks drop from a name's start, in any encoding; a `%` not yet complete waits for its next chunk. */
const IGNORED_LEAD = /^(?:[ +[\]]|%(?:20|5[bBdD]))+/
/** A name that could be `_method` holds those letters, or encodes some of them. */
const MAYBE_OVERRIDE = /method|%/i
/** An override value longer than this, as sent (percent-encoded: 3 bytes a letter), is no method. */
const MAX_OVERRIDE_VALUE = 1024
/**
 * A UTF-8 BOM leading the body, read as latin1: body-parser (Express) decodes a form with
 * iconv-lite, which drops it, so `\ufeff_method=DELETE` is a `_method` to method-override's body
 * getter; PHP, Rack and Tomcat keep it in the name. Cut across chunks, it waits in the name whole.
 */
const LEADING_BOM = /^\xEF\xBB\xBF/
const FORM_DELIMITERS = /[=&;]/g
const PAIR_END = /[&;]/g
/** The next byte that can begin a field: runs of separators (`&&&&`) are skipped in one search. */
const FIELD_START = /[^&;]/g

/**
 * Reads an urlencoded form chunk by chunk for `_method` fields (any spelling namesParameter
 * knows: case, percent-encoding, PHP's mangling, qs and Rack's brackets) and calls `onOverride`
 * with the method each names, upper-cased, as soon as its value ends: at the next `&` or `;`, or
 * at `end` for the last field. Throws LK_BAD_REQUEST for an override that is not one method
 * token, and for two that differ (which one a framework takes is a guess).
 */
export class FormOverrideScanner {
  private name = ''
  private value = ''
  /** Past the current field's `=`. */
  private inValue = false
  /** In the value of a field that is no override: only its end is looked for. */
  private skipping = false
  /** Still in the body's first field's name, where a UTF-8 BOM may lead it (LEADING_BOM). */
  private first = true
  private seen: string | null = null

  constructor(private readonly onOverride: (method: string) => void) {}

  feed(chunk: Buffer): void {
    const text = chunk.toString('latin1')
    let at = 0
    while (at < text.length) {
      if (this.skipping) {
        PAIR_END.lastIndex = at
        if (PAIR_END.exec(text) === null) return
        this.skipping = this.inValue = false
        this.name = ''
        at = PAIR_END.lastIndex
        continue
      }
      if (!this.inValue && this.name === '') {
        FIELD_START.lastIndex = at
        if (FIELD_START.exec(text) === null) return
        at = FIELD_START.lastIndex - 1
      }
      const delimiters = this.inValue ? PAIR_END : FORM_DELIMITERS
      delimiters.lastIndex = at
      const found = delimiters.exec(text)
      const upto = found === null ? text.length : found.index
      if (this.inValue) {
        this.value += text.slice(at, upto)
        if (this.value.length > MAX_OVERRIDE_VALUE) notAToken('form')
      } else if (this.name.length < KEPT_NAME) {
        // At most a chunk's worth is looked at: what leads it is dropped first, then the kept part cut.
        let name = this.name + text.slice(at, upto)
        if (this.first) name = name.replace(LEADING_BOM, '')
        this.name = name.replace(IGNORED_LEAD, '').slice(0, KEPT_NAME)
      }
      if (found === null) return
      this.first = false
      at = upto + 1
      if (found[0] !== '=') this.fieldEnded()
      else if (this.isOverride()) this.inValue = true
      else this.skipping = this.inValue = true
    }
  }

  /** The body has ended: its last field ends with it. */
  end(): void {
    if (!this.skipping && (this.inValue || this.name !== '')) this.fieldEnded()
    this.skipping = this.inValue = false
    this.name = this.value = ''
  }

  private isOverride(): boolean {
    return isOverrideName(this.name)
  }

  /** A field without its value skipped ended: judged if its name is `_method` (with no `=`, an empty value). */
  private fieldEnded(): void {
    const override = this.inValue || this.isOverride()
    const value = this.inValue ? decodeBytewise(this.value) : ''
    this.name = this.value = ''
    this.inValue = false
    if (!override) return
    const method = overrideMethod(value, 'form')
    // Frameworks disagree on which of several they take: all of them must be the same one.
    if (this.seen !== null && this.seen !== method) throw new LatchkeyError('LK_BAD_REQUEST', 'the form carries two different method overrides (_method)')
    this.seen = method
    this.onOverride(method)
  }
}

/** The kind of body an override came in, as a refusal names it. */
export type OverrideCarrier = 'form' | 'JSON body' | 'multipart form'

/**
 * The method an override's value names, upper-cased, as a framework takes it; LK_BAD_REQUEST for
 * a value that is not one method token (never guessed at), or none that could be read (null).
 */
export function overrideMethod(value: string | null, carrier: OverrideCarrier): string {
  const method = value?.trim().toUpperCase()
  if (method === undefined || !OVERRIDE_TOKEN.test(method)) notAToken(carrier)
  return method
}

export function notAToken(carrier: OverrideCarrier): never {
  throw new LatchkeyError('LK_BAD_REQUEST', `the ${carrier} carries a method override (_method) that is not one method token`)
}

/**
 * `_method` as a framework reads a field name: any case, percent-decoded, PHP's mangling
 * (`.method`, ` _method`, `_method[]`, a NUL), qs and Rack's brackets. An `=` in it (a multipart
 * name) is part of the name.
 */
export function isOverrideName(name: string): boolean {
  return MAYBE_OVERRIDE.test(name) && namesParameter(name.replace(/=/g, '%3D'), OVERRIDE_NAMES, false)
}
