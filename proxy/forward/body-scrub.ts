// Response bodies on a credentialed call, checked for the credential as they stream. An upstream
// that reflects the request (an echo or debug endpoint, an error page quoting the token it
// refused) would hand the agent the secret it must never hold. Each match is overwritten in place
// with a byte of the same count, so Content-Length and the rest of the body stay as they were.
//
// Streaming without losing a match cut across chunks: the bytes at the end of a chunk that could
// begin a needle are held back until the next chunk (or the end) says whether they do. Nothing
// else is held, so a stream of events (SSE, NDJSON) flows as it comes: an event ends in a newline,
// which begins no needle. Anything already relayed cannot be the start of a later match: it was
// relayed because no needle could begin there.
//
// What is looked for: the secret and the forms the header scrubber knows (binding.encodedForms:
// base64 of any text holding it, hex, Basic's header), each as is and as an echo escapes it once
// (JSON, with `\/` or without; percent-encoding, either hex case, `+` for a space; HTML). Compressed
// bodies cannot be read this way: a credentialed call asks for `identity`, and one that comes
// back encoded anyway is decoded before it gets here, or refused (see ResponseRelay).
import type { Credential, CredentialBinding } from '../context.js'

export interface BodyNeedles {
  readonly needles: readonly Buffer[]
  /** Needles by their first byte: where a held-back tail may begin. */
  readonly byFirstByte: readonly (readonly Buffer[] | undefined)[]
  readonly shortest: number
  readonly longest: number
  /** Written over a match: a byte no needle contains, so an overwrite never makes a new one. */
  readonly mask: number
}

const byBinding = new WeakMap<CredentialBinding, WeakMap<Credential, BodyNeedles>>()

/** Worked out once per (binding, credential): a token serves many calls. */
export function bodyNeedlesFor(binding: CredentialBinding, credential: Credential): BodyNeedles {
  let byCredential = byBinding.get(binding)
  if (!byCredential) byBinding.set(binding, (byCredential = new WeakMap()))
  let n = byCredential.get(credential)
  if (!n) byCredential.set(credential, (n = compileNeedles([credential.value, ...binding.encodedForms(credential)])))
  return n
}

export function compileNeedles(texts: readonly string[]): BodyNeedles {
  const spelled = new Set<string>()
  for (const text of texts) for (const v of echoSpellings(text)) spelled.add(v)
  const seen = new Set<string>()
  const needles: Buffer[] = []
  for (const s of spelled) {
    // A form that is UTF-8 bytes read one per character (what a header carries) is those bytes
    // in a body; read as UTF-8 it is how a double-encoding echo writes them. Both are looked for.
    const encodings: Buffer[] = [Buffer.from(s, 'utf8')]
    if (/^[\0-\xff]*$/.test(s)) encodings.push(Buffer.from(s, 'latin1'))
    for (const b of encodings) {
      const key = b.toString('hex')
      if (b.length > 0 && !seen.has(key)) {
        seen.add(key)
        needles.push(b)
      }
    }
  }
  const byFirstByte: Buffer[][] = []
  for (const b of needles) (byFirstByte[b[0]!] ??= []).push(b)
  return {
    needles,
    byFirstByte,
    shortest: Math.min(...needles.map((b) => b.length)),
    longest: Math.max(...needles.map((b) => b.length)),
    mask: maskByte(needles),
  }
}

/**
 * `text` as is, and as the common echoes write it once, each the way a library of its kind does:
 * - JSON: JavaScript's JSON.stringify; with `\/` (PHP); `<`, `>`, `&` as `\u003c`… (Go's
 *   encoding/json, Rails); beyond ASCII as `\uXXXX` (Python's json.dumps);
 * - percent-encoding: JavaScript's encodeURIComponent (keeps `!*'()`); every reserved character
 *   (Python's quote(safe=''), Go's QueryEscape, PHP's rawurlencode); Python's quote(), which keeps
 *   `/`; each with `+` for a space, and in lower-case hex;
 * - HTML: named references (`&quot;`, `&#39;` or `&#x27;`); Go's html/template (`&#34;`, `&#43;`);
 *   every special character as a decimal or a hex reference.
 * Not covered: hex digits of mixed case within one escape run, and escaping of every character.
 */
function echoSpellings(text: string): string[] {
  const json = JSON.stringify(text).slice(1, -1)
  const out = [text, json, json.replace(/\//g, '\\/'), json.replace(/[<>&]/g, unicodeEscape), json.replace(/[^ -~]/g, unicodeEscape)]
  const js = encodeURIComponent(text)
  const strict = js.replace(/[!*'()]/g, percentOf)
  for (const p of [js, strict, strict.replace(/%2F/g, '/')]) {
    for (const q of [p, p.replace(/%20/g, '+')]) out.push(q, q.replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()))
  }
  const named = text.replace(/[&<>"']/g, (c) => HTML[c]!)
  out.push(named, named.replace(/&#39;/g, '&#x27;'), text.replace(/[&<>"'+]/g, (c) => GO_HTML[c]!))
  out.push(text.replace(/[&<>"'+/=]/g, (c) => `&#${c.charCodeAt(0)};`), text.replace(/[&<>"'+/=]/g, (c) => `&#x${c.charCodeAt(0).toString(16)};`), text.replace(/[&<>"'+/=]/g, (c) => `&#x${c.charCodeAt(0).toString(16).toUpperCase()};`))
  return out
}
const HTML: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }
const GO_HTML: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;', '+': '&#43;' }
const unicodeEscape = (c: string) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`
const percentOf = (c: string) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`

function maskByte(needles: readonly Buffer[]): number {
  const used = new Uint8Array(256)
  for (const b of needles) for (const x of b) used[x] = 1
  for (const c of '*x#-_.~0') if (!used[c.charCodeAt(0)]) return c.charCodeAt(0)
  const free = used.indexOf(0)
  // Only needles using all 256 byte values leave none free; a match is then still overwritten.
  return free === -1 ? 0x2a : free
}

/** One response body's pass: push() each chunk, end() once; what they return goes to the agent. */
export class BodyScrubber {
  private held: Buffer | null = null
  /** Matches overwritten so far. */
  found = 0

  constructor(private readonly n: BodyNeedles) {}

  /** What of `chunk` (after anything held) may go to the agent now, or null when all of it waits. */
  push(chunk: Buffer): Buffer | null {
    let data = this.held === null ? chunk : Buffer.concat([this.held, chunk])
    // undici's chunk may be a view of its read buffer: it is copied before anything is written in it.
    let own = data !== chunk
    this.held = null
    const n = this.n
    if (data.length >= n.shortest) {
      for (const needle of n.needles) {
        let i = data.indexOf(needle)
        while (i !== -1) {
          if (!own) {
            data = Buffer.from(data)
            own = true
          }
          data.fill(n.mask, i, i + needle.length)
          this.found++
          i = data.indexOf(needle, i + needle.length)
        }
      }
    }
    const from = this.mayBeginNeedle(data)
    if (from < data.length) {
      this.held = Buffer.from(data.subarray(from))
      data = data.subarray(0, from)
    }
    return data.length > 0 ? data : null
  }

  /** What was held back at the end of the body: less than any needle, so it is relayed as it is. */
  end(): Buffer | null {
    const rest = this.held
    this.held = null
    return rest
  }

  /** The first position from which the rest of `data` is the start of some needle (data.length if none). */
  private mayBeginNeedle(data: Buffer): number {
    const { byFirstByte, longest } = this.n
    const len = data.length
    for (let p = Math.max(0, len - longest + 1); p < len; p++) {
      const candidates = byFirstByte[data[p]!]
      if (candidates === undefined) continue
      const rest = len - p
      for (const needle of candidates) {
        if (needle.length <= rest) continue
        let k = 1
        while (k < rest && needle[k] === data[p + k]) k++
        if (k === rest) return p
      }
    }
    return len
  }
}
