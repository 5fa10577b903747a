// A method override carried in a JSON body: Laravel's request input is the decoded JSON body of
// any request whose Content-Type contains `/json` or `+json`, and Symfony's getMethod() takes a
// POST's `_method` input as its method. So `{"_method":"DELETE"}` POSTed is a DELETE.
//
// A JSON body is often large (a model's prompt), and streams. As a form is (body-override.ts),
// it is scanned as it passes, each chunk before it is sent on, and an override the
// policy refuses ends the forward there: the chunk that completes the override never goes, so the
// upstream holds at most an unfinished body, which no framework dispatches (PHP and Laravel
// decode the body whole before routing).
//
// Only the top-level object's keys matter (Symfony reads `_method` from the top of the input),
// so the scan tracks nesting and strings, and decodes a top-level key or its value with
// JSON.parse, never by hand. A full JSON parser would build every value of a large body to
// answer the same question.
import { notAToken, overrideMethod } from './body-override.js'

/** A key or value longer than this, as written, is not `_method` or a method (escapes included: 6 bytes a letter). */
const MAX_CAPTURE = 256

const QUOTE = 0x22
const BACKSLASH = 0x5c

/** Whether Laravel would read this body as JSON: its Content-Type contains `/json` or `+json` (compared case-folded here). */
export function isJsonBody(contentType: string | undefined): boolean {
  if (contentType === undefined) return false
  const type = contentType.toLowerCase()
  return type.includes('/json') || type.includes('+json')
}

/**
 * Reads a JSON body chunk by chunk for top-level `_method` keys (any case, any escaping) and
 * calls `onOverride` with the method each names, upper-cased, as soon as its string ends. Throws
 * LK_BAD_REQUEST for an override that is not one method token (never guessed at), and whatever
 * `onOverride` throws.
 */
export class JsonOverrideScanner {
  /** Nesting depth: 1 inside the top-level object. */
  private depth = 0
  /** Nothing more to look at: the body is not an object, or its top-level object has closed. */
  private done = false
  private inString = false
  private escaped = false
  /** At depth 1: the next string is a key. */
  private expectKey = false
  /** At depth 1: the last key was `_method`, and its value has not begun. */
  private awaitingValue = false
  /** At depth 2: inside the array a `_method` key has as its value (method-override takes its first string). */
  private inOverrideArray = false
  /** What the string being read is kept for, if anything. */
  private capturing: 'key' | 'value' | null = null
  private readonly captured = Buffer.allocUnsafe(MAX_CAPTURE)
  private capturedLength = 0
  private overflowed = false

  constructor(private readonly onOverride: (method: string) => void) {}

  feed(chunk: Buffer): void {
    if (this.done) return
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!
      if (this.inString) {
        if (this.capturing !== null) this.keep(b)
        if (this.escaped) this.escaped = false
        else if (b === BACKSLASH) this.escaped = true
        else if (b === QUOTE) {
          this.inString = false
          if (this.capturing !== null) this.stringEnded()
        }
        continue
      }
      switch (b) {
        case QUOTE:
          this.inString = true
          if ((this.depth === 1 && (this.expectKey || this.awaitingValue)) || (this.depth === 2 && this.inOverrideArray)) {
            this.capturing = this.expectKey ? 'key' : 'value'
            this.capturedLength = 0
            this.overflowed = false
            this.keep(b)
          }
          this.expectKey = false
          this.awaitingValue = false
          break
        case 0x7b: // {
        case 0x5b: // [
          if (this.depth === 0 && b === 0x5b) return this.stop()
          // `{"_method":["DELETE"]}` is a DELETE to Express's method-override (an array's first
          // value): each string in the array is judged. Anything deeper, or an object, is no
          // method a framework should take, and cannot be judged: refused.
          if (this.awaitingValue) {
            if (b === 0x7b) notAToken('JSON body')
            this.inOverrideArray = true
          } else if (this.inOverrideArray) notAToken('JSON body')
          this.depth++
          this.expectKey = this.depth === 1
          this.awaitingValue = false
          break
        case 0x7d: // }
        case 0x5d: // ]
          if (--this.depth <= 0) return this.stop()
          if (this.depth === 1) this.inOverrideArray = false
          break
        case 0x2c: // ,
          if (this.depth === 1) {
            this.expectKey = true
            this.awaitingValue = false
          }
          break
        case 0x3a: // :
        case 0x20:
        case 0x09:
        case 0x0a:
        case 0x0d:
          break
        default:
          // A byte-order mark before the body; anything else there means the body is no object.
          if (this.depth === 0) {
            if (b === 0xef || b === 0xbb || b === 0xbf) break
            return this.stop()
          }
          // A number, true, false or null: an override only a string can make.
          if (this.depth === 1) this.awaitingValue = false
      }
    }
  }

  /** The body has ended: an override is judged as soon as its string ends, so nothing is left to do. */
  end(): void {}

  private stop(): void {
    this.done = true
  }

  private keep(b: number): void {
    if (this.capturedLength < MAX_CAPTURE) this.captured[this.capturedLength++] = b
    else this.overflowed = true
  }

  private stringEnded(): void {
    const what = this.capturing
    this.capturing = null
    if (what === 'key') {
      this.awaitingValue = !this.overflowed && decoded(this.captured.subarray(0, this.capturedLength))?.toLowerCase() === '_method'
      return
    }
    this.onOverride(overrideMethod(this.overflowed ? null : decoded(this.captured.subarray(0, this.capturedLength)), 'JSON body'))
  }
}

/** A JSON string literal (quotes included) decoded, or null when it is not one. */
function decoded(literal: Buffer): string | null {
  try {
    const value: unknown = JSON.parse(literal.toString('utf8'))
    return typeof value === 'string' ? value : null
  } catch {
    return null
  }
}
