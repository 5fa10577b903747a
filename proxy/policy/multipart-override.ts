// A method override carried in a multipart form: Rack::MethodOverride (Rails), PHP (Symfony,
// Laravel) and Spring's HiddenHttpMethodFilter all read `_method` from a multipart POST's fields.
// Uploads are large and stream, so, as a JSON body is (json-override.ts), the body is scanned as
// it passes, each chunk before it is sent on, and an override the policy refuses ends the forward
// with the chunk that completes it unsent.
//
// The scan over-approximates rather than parse as one framework does: the frameworks differ
// (PHP takes LF line endings, folded header lines and lines with no colon as continuations, a
// form with no closing boundary; Rack reads a name from any header's `name=`, or from a
// Content-ID), and a field one of them reads must not be missed. So after any line that starts
// with `--` (every boundary does, whichever the form's is), the lines up to the next empty one are
// a part's headers, and if any `name` parameter in them, or a Content-ID, names `_method` (in
// any quoting, case or encoding, with PHP's mangling or in brackets), what follows is its value,
// up to the next line that starts with `--` or the body's end. A file that quotes such a part is
// read as one too: refused where its "method" is refused, which no real upload meets.
import { isOverrideName, notAToken, overrideMethod } from './body-override.js'

/** A `_method` value longer than this is no method. */
const MAX_VALUE = 256
/** A line outside a part's headers or an override's value is not kept past this: only its end is looked for. */
const KEPT_LINE = 1024
/** Of a part's headers, this much of what came last is kept for the next piece to be read with: a `name=…` cut across reads or lines. */
const HEADER_TAIL = 512
/** A header line longer than this is judged in windows as it comes. */
const KEPT_HEADER_LINE = 64 * 1024
/** Headers that could name `_method` hold those letters, or escape or encode some of them. */
const MAYBE_OVERRIDE = /method|%|\\/i

/** Each `name` (or `name*`) parameter in a part's headers, quoted or not, whatever header holds it. */
const NAME_PARAM = /(?:^|[;\s:])name\*?\s*=\s*("(?:[^"\\]|\\.)*"?|'[^']*'?|[^;\s]*)/gi
/** Rack names a part by its Content-ID when it has no name. */
const CONTENT_ID = /(?:^|\n)[ \t]*content-id[ \t]*:[ \t]*([^\n]*)/gi

/** Whether Rack or PHP would read this body as a multipart form (compared case-folded). */
export function isMultipartBody(contentType: string | undefined): boolean {
  return contentType !== undefined && contentType.toLowerCase().includes('multipart/')
}

/**
 * Reads a multipart body chunk by chunk for fields named `_method` and calls `onOverride` with
 * the method each names, upper-cased, as soon as its value ends (or, for the last field of a form
 * with no closing boundary, at `end`). Throws LK_BAD_REQUEST for a value that is not one method
 * token, and whatever `onOverride` throws.
 */
export class MultipartOverrideScanner {
  /** Outside any part's headers; in a part's headers (after a `--` line); in an override's value. */
  private state: 'body' | 'headers' | 'value' = 'body'
  /** Outside headers: the line being read, not yet ended by LF (only its start, for a line that cannot matter). */
  private partial = ''
  /** The current line is past KEPT_LINE and cannot matter: its end is all that is looked for. */
  private skipping = false
  /** In headers: what came last of them (lines joined by LF), the current line, whether it has any text, and whether they name `_method`. */
  private tail = ''
  private current = ''
  private lineHasContent = false
  private named = false
  private value = ''

  constructor(private readonly onOverride: (method: string) => void) {}

  feed(chunk: Buffer): void {
    let text = chunk.toString('latin1')
    if (this.partial !== '') {
      text = this.partial + text
      this.partial = ''
    }
    let at = 0
    while (at < text.length) {
      const lf = text.indexOf('\n', at)
      if (this.state === 'headers') {
        // Headers are read as they come, never held whole: a `--` line in a file followed by a long text is no part.
        this.headerText(text.slice(at, lf === -1 ? text.length : lf))
        if (lf === -1) return
        this.headerLineEnded()
      } else if (this.skipping) {
        if (lf === -1) return
        this.skipping = false
      } else if (lf === -1) {
        return this.unfinished(text.slice(at))
      } else {
        this.line(text.slice(at, lf > at && text.charCodeAt(lf - 1) === 13 ? lf - 1 : lf))
      }
      at = lf + 1
    }
  }

  /** The body has ended: a `_method` value still open is what PHP takes for it. */
  end(): void {
    if (this.partial !== '') this.line(this.partial.endsWith('\r') ? this.partial.slice(0, -1) : this.partial)
    this.partial = ''
    if (this.state === 'value') this.valueEnded()
    this.state = 'body'
  }

  /** The start of a line not yet ended. A value ends as soon as its closing `--` arrives, before the rest of the delimiter. */
  private unfinished(rest: string): void {
    if (this.state === 'value') {
      if (rest.startsWith('--')) {
        this.valueEnded()
        // The rest of the delimiter line is read with the next part's headers: it names nothing.
        this.startHeaders()
        this.lineHasContent = true
        return
      }
      if (this.value.length + rest.length > MAX_VALUE) notAToken('multipart form')
    }
    if (rest.length <= KEPT_LINE || this.state === 'value') this.partial = rest
    // A long line of a file's content: only where it ends matters.
    else this.skipping = true
  }

  private line(line: string): void {
    if (this.state === 'value') {
      if (line.startsWith('--')) {
        this.valueEnded()
        return this.startHeaders()
      }
      this.value += (this.value === '' ? '' : '\r\n') + line
      if (this.value.length > MAX_VALUE) notAToken('multipart form')
      return
    }
    if (line.startsWith('--')) this.startHeaders()
  }

  private startHeaders(): void {
    this.state = 'headers'
    this.tail = this.current = ''
    this.lineHasContent = this.named = false
  }

  /** More of the current header line. A line longer than KEPT_HEADER_LINE is read in windows, never held whole. */
  private headerText(piece: string): void {
    piece = piece.replace(/\r/g, '')
    if (piece === '') return
    // A `--` line where headers were expected begins another part: nothing before it names this one.
    if (!this.lineHasContent && piece.startsWith('--')) this.startHeaders()
    this.lineHasContent = true
    this.current += piece
    if (this.current.length > KEPT_HEADER_LINE) {
      // Only what cannot still grow is judged: a name ending HEADER_TAIL from the window's end is whole.
      this.judgeHeaders(this.tail + this.current, HEADER_TAIL)
      this.tail = (this.tail + this.current).slice(-HEADER_TAIL)
      this.current = ''
    }
  }

  /** A header line ended; an empty one ends the part's headers, and what follows is a value, looked at if they name `_method`. */
  private headerLineEnded(): void {
    if (this.lineHasContent) {
      this.judgeHeaders(this.tail + this.current, 0)
      this.tail = (this.tail + this.current + '\n').slice(-HEADER_TAIL)
      this.current = ''
      this.lineHasContent = false
      return
    }
    this.state = this.named ? 'value' : 'body'
    this.value = this.tail = ''
  }

  /** Marks the part as `_method` if `text` names it, read as it stands and with its lines joined as PHP joins a line with no colon; `unsettled`: how much of its end may still grow. */
  private judgeHeaders(text: string, unsettled: number): void {
    // What was judged before cannot make a match alone: one that is new ends in the new text, and a
    // `name=…` naming `_method` in any spelling is far shorter than the overlap kept.
    if (this.named || !MAYBE_OVERRIDE.test(text.slice(-(this.current.length + 64)).replace(/\n/g, ''))) return
    if (namesOverride(text, text.length - unsettled) || namesOverride(text.replace(/\n/g, ''), text.length - unsettled)) this.named = true
  }

  private valueEnded(): void {
    this.state = 'body'
    const value = this.value
    this.value = ''
    this.onOverride(overrideMethod(value, 'multipart form'))
  }
}


/** Whether a part's headers name it `_method`, by any `name` parameter or by a Content-ID, in a match ending by `settled`. */
function namesOverride(headers: string, settled: number): boolean {
  if (!MAYBE_OVERRIDE.test(headers)) return false
  for (const m of headers.matchAll(NAME_PARAM)) if (m.index + m[0].length <= settled && isOverrideName(unquoted(m[1]!))) return true
  for (const m of headers.matchAll(CONTENT_ID)) if (m.index + m[0].length <= settled && isOverrideName(unquoted(m[1]!.trim().replace(/^<(.*)>$/, '$1')))) return true
  return false
}

/** A parameter value without its quotes and backslash escapes, and an RFC 2231 `charset''` prefix. */
function unquoted(raw: string): string {
  let v = raw
  if (v.startsWith('"')) v = v.slice(1, v.endsWith('"') && v.length > 1 ? -1 : undefined).replace(/\\(.)/g, '$1')
  else if (v.startsWith("'")) v = v.slice(1, v.endsWith("'") && v.length > 1 ? -1 : undefined)
  const charset = /^[A-Za-z0-9_-]*'[^']*'/.exec(v)
  return charset ? v.slice(charset[0].length) : v
}
