// Response bodies on a credentialed call, checked for the credential as they stream. An upstream
// that reflects the request (an echo or debug endpoint, an error page quoting the token it
// refused) would hand the agent the secret it must never hold. Each match is overwritten in place
// with a byte of the same count, so Content-Length and the rest of the body stay as they were.
//
// Streaming without losing a match cut across chunks: the bytes at the end of a chunk that could
// begin a needle are held back until the next chunk (or the end) says whether they do. Nothing
// else is held, so a stream of events (SSE, NDJSON) flows as it comes: an event ends in a newline,
// which begins no needle. A stream of bare text (a model's tokens written as they come, no
// framing) ends its chunks anywhere, and a token ending in a needle's first letter (every JWT
// begins `e`) waited for the next, for as long as the model paused. So a held tail of at most
// RELEASE_MAX bytes is let go when no more body comes for a moment (release(), timed by the
// relay): at worst those first bytes of a needle reach the agent, never the rest, for the bytes
// let go are kept, and a match beginning in them is overwritten from where the agent's copy
// stops. A longer tail is a longer part of the secret: it waits, as before.
//
// What is looked for: the secret and the forms the header scrubber knows (binding.encodedForms:
// base64 of any text holding it, hex, Basic's header), each as is and as an echo escapes it once
// (JSON, with `\/` or without; percent-encoding, either hex case, `+` for a space; HTML). Compressed
// bodies cannot be read this way: a credentialed call asks for `identity`, and one that comes
// back encoded anyway is decoded before it gets here, or refused (see ResponseRelay).
//
// Not only the call's own credential: every one the source holds for the binding (another task's
// token, one a refresh superseded: CredentialSource.held) is looked for, so an upstream that shows
// one request's token to another (a "last request" view, a cached echo) hands no task another's.
// The needles of a set are put together once per set (the source hands out the same array while
// it is unchanged) from each credential's own, worked out once. A set of a few credentials is
// scanned as one is, a native indexOf per needle; past INDEX_ABOVE needles (N tokens held: N
// times some 60), one pass over the bytes with a rolling hash of each position's last k bytes
// against the needles' last k bytes (their ends differ: one broker's JWTs share their header),
// so the cost grows with the bytes, not with N.
import type { Credential, CredentialBinding } from '../context.js'
import { NONE_HELD } from '../credentials/held.js'

export interface BodyNeedles {
  readonly needles: readonly Buffer[]
  /** Needles by their first byte: where a held-back tail may begin. */
  readonly byFirstByte: readonly (readonly Buffer[] | undefined)[]
  readonly shortest: number
  readonly longest: number
  /** Written over a match: a byte no needle contains, so an overwrite never makes a new one. */
  readonly mask: number
  /** Which byte values the needles use (1: used), for the mask of a set put together from several. */
  readonly used: Uint8Array
  /** For many needles: the one-pass index (see the top of the file); null: indexOf per needle. */
  readonly index: NeedleIndex | null
}

interface NeedleIndex {
  /** Bytes hashed at each position: the shortest needle's length, at most MAX_K. */
  readonly k: number
  /** 31^(k-1), to roll the oldest byte out. */
  readonly pow: number
  /** Needles by the hash of their last k bytes. */
  readonly byHash: ReadonlyMap<number, readonly Buffer[]>
  /** A bit per hash (modulo its size): most positions are passed over on one read. */
  readonly filter: Uint32Array
  readonly filterMask: number
}

/** Needles past which a set is scanned in one pass (one credential makes some 20 to 60). */
const INDEX_ABOVE = 96
const MAX_K = 16

const byBinding = new WeakMap<CredentialBinding, WeakMap<Credential, BodyNeedles>>()

/** A held set's needles, put together when the set changes (see bodyNeedlesFor). */
interface HeldNeedles {
  members: ReadonlySet<Credential>
  all: BodyNeedles
  /** With a call's own credential added, for one the set lacks (it expired meanwhile). */
  withOwn: WeakMap<Credential, BodyNeedles>
}
const heldByBinding = new WeakMap<CredentialBinding, WeakMap<readonly Credential[], HeldNeedles>>()

/**
 * What a credentialed call's body is checked for: its own credential and every other the source
 * holds for the binding (`held`). One credential's needles are worked out once per (binding,
 * credential): a token serves many calls. A set's are put together when the held array changes;
 * a call whose set is its own credential alone (a static secret) gets that credential's needles.
 */
export function bodyNeedlesFor(binding: CredentialBinding, credential: Credential, held: readonly Credential[] = NONE_HELD): BodyNeedles {
  if (held.length === 0 || (held.length === 1 && held[0] === credential)) return ownNeedles(binding, credential)
  let byHeld = heldByBinding.get(binding)
  if (!byHeld) heldByBinding.set(binding, (byHeld = new WeakMap()))
  let h = byHeld.get(held)
  if (!h) byHeld.set(held, (h = { members: new Set(held), all: combineNeedles(heldNeedles(binding, held)), withOwn: new WeakMap() }))
  if (h.members.has(credential)) return h.all
  let n = h.withOwn.get(credential)
  if (!n) h.withOwn.set(credential, (n = combineNeedles([ownNeedles(binding, credential), h.all])))
  return n
}

function ownNeedles(binding: CredentialBinding, credential: Credential): BodyNeedles {
  let byCredential = byBinding.get(binding)
  if (!byCredential) byBinding.set(binding, (byCredential = new WeakMap()))
  let n = byCredential.get(credential)
  if (!n) byCredential.set(credential, (n = compileNeedles([credential.value, ...binding.encodedForms(credential)])))
  return n
}

/**
 * Several credentials' needles as one set, none worked out again: a change to a set of N costs
 * some N × 60 references, not N credentials' spellings. Credentials of the same value are taken
 * once (heldNeedles); two different ones share no needle but by chance, which costs only time.
 */
export function combineNeedles(parts: readonly BodyNeedles[]): BodyNeedles {
  const needles: Buffer[] = []
  const used = new Uint8Array(256)
  for (const p of parts) {
    for (const b of p.needles) needles.push(b)
    for (let i = 0; i < 256; i++) used[i]! |= p.used[i]!
  }
  return assemble(needles, used)
}

/** One part per distinct value: a set may hold two credentials of one value (an issuer that answers the same token twice). */
function heldNeedles(binding: CredentialBinding, held: readonly Credential[]): BodyNeedles[] {
  const values = new Set<string>()
  const parts: BodyNeedles[] = []
  for (const c of held) {
    if (values.has(c.value)) continue
    values.add(c.value)
    parts.push(ownNeedles(binding, c))
  }
  return parts
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
  const used = new Uint8Array(256)
  for (const b of needles) for (const x of b) used[x] = 1
  return assemble(needles, used)
}

function assemble(needles: Buffer[], used: Uint8Array): BodyNeedles {
  const byFirstByte: Buffer[][] = []
  let shortest = Infinity
  let longest = -Infinity
  for (const b of needles) {
    ;(byFirstByte[b[0]!] ??= []).push(b)
    if (b.length < shortest) shortest = b.length
    if (b.length > longest) longest = b.length
  }
  return { needles, byFirstByte, shortest, longest, mask: maskByte(used), used, index: needles.length > INDEX_ABOVE ? indexNeedles(needles, shortest) : null }
}

/** Rolls the hash of `k` bytes ending at `end`: the same arithmetic as the scan (BodyScrubber.scanIndexed). */
function hashOf(b: Buffer, end: number, k: number): number {
  let h = 0
  for (let i = end - k; i < end; i++) h = (Math.imul(h, 31) + b[i]!) | 0
  return h
}

function indexNeedles(needles: readonly Buffer[], shortest: number): NeedleIndex {
  const k = Math.min(shortest, MAX_K)
  let pow = 1
  for (let i = 1; i < k; i++) pow = Math.imul(pow, 31)
  const byHash = new Map<number, Buffer[]>()
  let bits = 1 << 12
  while (bits < needles.length * 16 && bits < 1 << 24) bits <<= 1
  const filter = new Uint32Array(bits >>> 5)
  const filterMask = bits - 1
  for (const b of needles) {
    const h = hashOf(b, b.length, k)
    const list = byHash.get(h)
    if (list) list.push(b)
    else byHash.set(h, [b])
    const slot = h & filterMask
    filter[slot >>> 5]! |= 1 << (slot & 31)
  }
  return { k, pow, byHash, filter, filterMask }
}

/**
 * `text` as is, and as the common echoes write it once, each the way a library of its kind does:
 * - JSON: JavaScript's JSON.stringify; with `\/` (PHP); `<`, `>`, `&` as `\u003c`… (Go's
 *   encoding/json, Rails); beyond ASCII as `\uXXXX` (Python's json.dumps); `"`, `&`, `'`, `+`,
 *   `<`, `>`, `` ` `` and beyond ASCII as `\u002B`…, in upper-case hex (.NET's System.Text.Json,
 *   ASP.NET Core's default: a base64 secret's `+` is written `\u002B`);
 * - percent-encoding: JavaScript's encodeURIComponent (keeps `!*'()`); every reserved character
 *   (Python's quote(safe=''), Go's QueryEscape, PHP's rawurlencode); Python's quote(), which keeps
 *   `/`; each with `+` for a space, and in lower-case hex;
 * - HTML: named references (`&quot;`, `&#39;` or `&#x27;`); Go's html/template (`&#34;`, `&#43;`);
 *   every special character as a decimal or a hex reference.
 * Not covered: hex digits of mixed case within one escape run, and escaping of every character.
 */
function echoSpellings(text: string): string[] {
  const json = JSON.stringify(text).slice(1, -1)
  const out = [text, json, json.replace(/\//g, '\\/'), json.replace(/[<>&]/g, unicodeEscape), json.replace(/[^ -~]/g, unicodeEscape), dotnetJson(text)]
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
/** A JSON string's content as System.Text.Json's default encoder writes it (JavaScriptEncoder.Default). */
function dotnetJson(text: string): string {
  return text.replace(/[\\"<>&'+`]|[^ -~]/g, (c) => DOTNET_SHORT[c] ?? `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`)
}
const DOTNET_SHORT: Record<string, string> = { '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t', '\b': '\\b', '\f': '\\f' }
const percentOf = (c: string) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`

function maskByte(used: Uint8Array): number {
  for (const c of '*x#-_.~0') if (!used[c.charCodeAt(0)]) return c.charCodeAt(0)
  const free = used.indexOf(0)
  // Only needles using all 256 byte values leave none free; a match is then still overwritten.
  return free === -1 ? 0x2a : free
}

/**
 * Every needle's place in `data`, as [start, end, start, end…] by end, or null: one pass, a
 * rolling hash of the k bytes ending at each position, looked up (past a bit filter) among the
 * hashes of the needles' last k bytes, and each candidate compared whole.
 */
function scanIndexed(data: Buffer, ix: NeedleIndex): number[] | null {
  const { k, pow, byHash, filter, filterMask } = ix
  const len = data.length
  if (len < k) return null
  let matches: number[] | null = null
  let h = hashOf(data, k, k)
  for (let end = k; ; end++) {
    const slot = h & filterMask
    if ((filter[slot >>> 5]! & (1 << (slot & 31))) !== 0) {
      const candidates = byHash.get(h)
      if (candidates !== undefined) {
        for (const needle of candidates) {
          const start = end - needle.length
          if (start >= 0 && data.compare(needle, 0, needle.length, start, end) === 0) (matches ??= []).push(start, end)
        }
      }
    }
    if (end === len) return matches
    h = (Math.imul(h - Math.imul(data[end - k]!, pow), 31) + data[end]!) | 0
  }
}

/**
 * Every needle's place in `data`, as scanIndexed gives them ([start, end…] by end), or null: a
 * native indexOf per needle, for a set of a few.
 */
function scanEach(data: Buffer, needles: readonly Buffer[]): number[] | null {
  let matches: number[] | null = null
  for (const needle of needles) {
    for (let i = data.indexOf(needle); i !== -1; i = data.indexOf(needle, i + needle.length)) (matches ??= []).push(i, i + needle.length)
  }
  if (matches === null || matches.length === 2) return matches
  const pairs: [number, number][] = []
  for (let m = 0; m < matches.length; m += 2) pairs.push([matches[m]!, matches[m + 1]!])
  return pairs.sort((a, b) => a[1] - b[1] || a[0] - b[0]).flat()
}

/** The most of a held tail let go by release(): the first bytes of a needle, never enough of a secret to matter. */
export const RELEASE_MAX = 4

/** One response body's pass: push() each chunk, end() once; what they return goes to the agent. */
export class BodyScrubber {
  private held: Buffer | null = null
  /** Bytes let go by release() that may begin a needle: the agent has them, the next chunk is checked with them. */
  private released: Buffer | null = null
  /** Matches overwritten so far. */
  found = 0

  constructor(private readonly n: BodyNeedles) {}

  /** What of `chunk` (after anything held) may go to the agent now, or null when all of it waits. */
  push(chunk: Buffer): Buffer | null {
    const sent = this.released === null ? 0 : this.released.length
    let data = this.held === null && sent === 0 ? chunk : Buffer.concat(this.pending(chunk))
    this.held = null
    const n = this.n
    if (data.length >= n.shortest) {
      // Every match is found in the bytes as they came, then all are overwritten: one overwritten
      // first would hide a longer one overlapping it (a Basic header's base64 past the secret's
      // base64 core: its last group, `…ZQ==`, went out and gave the last character away).
      const matches = n.index !== null ? scanIndexed(data, n.index) : scanEach(data, n.needles)
      if (matches !== null) {
        // undici's chunk may be a view of its read buffer: it is copied before anything is written in it.
        if (data === chunk) data = Buffer.from(data)
        // Counted as one echo where a match overlaps the last counted.
        let countedTo = 0
        for (let m = 0; m < matches.length; m += 2) {
          data.fill(n.mask, matches[m]!, matches[m + 1]!)
          if (matches[m]! >= countedTo) {
            this.found++
            countedTo = matches[m + 1]!
          }
        }
      }
    }
    const from = this.mayBeginNeedle(data)
    if (from < sent) {
      // A needle may begin in what the agent already has: all that came since continues it.
      this.released = from === 0 ? this.released : Buffer.from(data.subarray(from, sent))
      this.held = data.length > sent ? Buffer.from(data.subarray(sent)) : null
      return null
    }
    this.released = null
    if (from < data.length) {
      this.held = Buffer.from(data.subarray(from))
      data = data.subarray(sent, from)
    } else if (sent > 0) data = data.subarray(sent)
    return data.length > 0 ? data : null
  }

  private pending(chunk: Buffer): Buffer[] {
    const parts: Buffer[] = []
    if (this.released !== null) parts.push(this.released)
    if (this.held !== null) parts.push(this.held)
    parts.push(chunk)
    return parts
  }

  /** Whether release() would let the held tail go: some is held, and with what was let go before, at most RELEASE_MAX bytes. */
  get releasable(): boolean {
    return this.held !== null && this.held.length + (this.released === null ? 0 : this.released.length) <= RELEASE_MAX
  }

  /** The held tail, for the agent now (see the top of the file); null when not releasable. */
  release(): Buffer | null {
    if (!this.releasable) return null
    const out = this.held!
    this.held = null
    this.released = this.released === null ? out : Buffer.concat([this.released, out])
    return out
  }

  /** What was held back at the end of the body: less than any needle, so it is relayed as it is. */
  end(): Buffer | null {
    const rest = this.held
    this.held = null
    this.released = null
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
