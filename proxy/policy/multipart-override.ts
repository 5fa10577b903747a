// A method override carried in a multipart form: Rack::MethodOverride (Rails), PHP (Symfony,
// Laravel) and Spring's HiddenHttpMethodFilter all read `_method` from a multipart POST's fields.
// Uploads are large and stream, so, as a JSON body is (json-override.ts), the body is scanned as
// it passes, each chunk before it is sent on, and an override the policy refuses ends the forward
// with the chunk that completes it unsent.
//
// The scan over-approximates rather than parse as one framework does: the frameworks differ
// (PHP takes LF line endings, folded header lines, a form with no closing boundary), and a field
// one of them reads must not be missed. So any `Content-Disposition` header line, wherever it
// is and whatever boundary it is under, that names `_method` (in any quoting, case or encoding,
// with PHP's name mangling) makes what follows its part's blank line a value, up to the next line
// that starts with `--`. A file that quotes such a part is read as one too: refused where its
// "method" is refused, which no real upload meets.
import { LatchkeyError } from '../errors.js'
import { OVERRIDE_TOKEN } from './body-override.js'
import { namesParameter } from '../credentials/bindings.js'

/** A header line (folded lines joined) longer than this, naming a field, cannot be checked: refused. */
const MAX_HEADER_LINE = 64 * 1024
/** A `_method` value longer than this is no method. */
const MAX_VALUE = 256
/** A line that is no header and no value is not kept past this: only its end is looked for. */
const KEPT_LINE = 1024

const CONTENT_DISPOSITION = /^[ \t]*content-disposition[ \t]*:/i
/** Each `name` (or `name*`) parameter of a Content-Disposition, quoted or not. */
const NAME_PARAM = /(?:^|[;\s:])name\*?\s*=\s*("(?:[^"\\]|\\.)*"?|'[^']*'?|[^;\s]*)/gi

/** Whether Rack or PHP would read this body as a multipart form (compared case-folded). */
export function isMultipartBody(contentType: string | undefined): boolean {
  return contentType !== undefined && contentType.toLowerCase().includes('multipart/')
}

/**
 * Reads a multipart body chunk by chunk for fields named `_method` and calls `onOverride` with
 * the method each names, upper-cased, as soon as its value ends (or, for the last field of a form
 * with no closing boundary, at `end`). Throws LK_BAD_REQUEST for a value that is not one method
 * token or a header line too long to check, and whatever `onOverride` throws.
 */
export class MultipartOverrideScanner {
  /** The line being read, not yet ended by LF (only its start, for a line that cannot matter). */
  private partial = ''
  /** The current line is past KEPT_LINE and cannot matter: its end is all that is looked for. */
  private skipping = false
  /** A Content-Disposition header being read, folded lines joined; null when none is. */
  private disposition: string | null = null
  /** After a `_method` part's Content-Disposition: its headers, then its value. */
  private state: 'scan' | 'headers' | 'value' = 'scan'
  private value = ''

  constructor(private readonly onOverride: (method: string) => void) {}

  feed(chunk: Buffer): void {
    let text = chunk.toString('latin1')
    let at = 0
    if (this.skipping) {
      const lf = text.indexOf('\n')
      if (lf === -1) return
      this.skipping = false
      at = lf + 1
    } else if (this.partial !== '') {
      text = this.partial + text
      this.partial = ''
    }
    for (;;) {
      const lf = text.indexOf('\n', at)
      if (lf === -1) break
      this.line(text.slice(at, lf > at && text.charCodeAt(lf - 1) === 13 ? lf - 1 : lf))
      at = lf + 1
    }
    this.unfinished(text.slice(at))
  }

  /** The body has ended: a `_method` value still open is what PHP takes for it. */
  end(): void {
    if (this.partial !== '') this.line(this.partial.endsWith('\r') ? this.partial.slice(0, -1) : this.partial)
    this.partial = ''
    if (this.disposition !== null) this.dispositionEnded()
    if (this.state === 'value') this.valueEnded()
  }

  /** The start of a line not yet ended. A value ends as soon as its closing `--` arrives, before the rest of the delimiter. */
  private unfinished(rest: string): void {
    if (this.state === 'value') {
      if (rest.startsWith('--')) this.valueEnded()
      else if (this.value.length + rest.length > MAX_VALUE) notAToken()
    }
    const header = this.disposition !== null || (this.state !== 'value' && CONTENT_DISPOSITION.test(rest.slice(0, KEPT_LINE)))
    if (rest.length <= KEPT_LINE || header || this.state === 'value') {
      if (header && (this.disposition ?? '').length + rest.length > MAX_HEADER_LINE) headerTooLong()
      this.partial = rest
      return
    }
    // A long line of a file's content: only where it ends matters. Had it begun a header, it was kept.
    this.skipping = true
  }

  private line(line: string): void {
    if (this.disposition !== null) {
      // A folded line continues the header (PHP unfolds them).
      if (line.charCodeAt(0) === 32 || line.charCodeAt(0) === 9) {
        this.disposition += ' ' + line.trim()
        if (this.disposition.length > MAX_HEADER_LINE) headerTooLong()
        return
      }
      this.dispositionEnded()
    }
    if (this.state === 'value') {
      if (line.startsWith('--')) return this.valueEnded()
      this.value += (this.value === '' ? '' : '\r\n') + line
      if (this.value.length > MAX_VALUE) notAToken()
      return
    }
    if (CONTENT_DISPOSITION.test(line)) {
      if (line.length > MAX_HEADER_LINE) headerTooLong()
      this.disposition = line
      return
    }
    if (this.state === 'headers' && line === '') {
      this.state = 'value'
      this.value = ''
    }
  }

  private dispositionEnded(): void {
    const names = [...this.disposition!.matchAll(NAME_PARAM)].map((m) => unquoted(m[1]!))
    this.disposition = null
    this.state = names.some(isOverrideName) ? 'headers' : 'scan'
  }

  private valueEnded(): void {
    this.state = 'scan'
    const method = this.value.trim().toUpperCase()
    this.value = ''
    if (!OVERRIDE_TOKEN.test(method)) notAToken()
    this.onOverride(method)
  }
}

function notAToken(): never {
  throw new LatchkeyError('LK_BAD_REQUEST', 'the multipart form carries a method override (_method) that is not one method token')
}

function headerTooLong(): never {
  throw new LatchkeyError('LK_BAD_REQUEST', `a multipart header over ${MAX_HEADER_LINE} bytes to an upstream whose policy depends on the method cannot be checked for a method override (_method)`)
}

/** A parameter value without its quotes and backslash escapes, and an RFC 2231 `charset''` prefix. */
function unquoted(raw: string): string {
  let v = raw
  if (v.startsWith('"')) v = v.slice(1, v.endsWith('"') && v.length > 1 ? -1 : undefined).replace(/\\(.)/g, '$1')
  else if (v.startsWith("'")) v = v.slice(1, v.endsWith("'") && v.length > 1 ? -1 : undefined)
  const charset = /^[A-Za-z0-9_-]*'[^']*'/.exec(v)
  return charset ? v.slice(charset[0].length) : v
}

/** `_method` as a framework reads a field name: any case, percent-decoded, PHP's mangling (`.method`, ` _method`, `_method[]`, a NUL). */
function isOverrideName(name: string): boolean {
  return namesParameter(name.replace(/=/g, '%3D'), ['_method'], false)
}
