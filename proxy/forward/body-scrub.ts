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
// (JSON, with `\/` or without; percent-encoding, either hex case, `+` for a space; HTML), the
// secret with every byte percent-encoded, and each of those texts holding a character encoders
// escape with any of its characters other than letters and digits escaped and the rest not
// (escaped-copy.ts: Go's html/template's `\u002b` beside `\/`, matched escape by escape). Compressed
// bodies cannot be read this way: a credentialed call asks for `identity`, and one that comes
// back encoded anyway is decoded before it gets here, or refused (see ResponseRelay). Not only a
// whole copy: one cut short (or begun late) is overwritten too, once it shows enough of a needle
// that what it leaves out could be guessed (leastShown).
//
// Not only the call's own credential: every one the source holds for the binding (another task's
// token, one a refresh superseded: CredentialSource.held) is looked for, so an upstream that shows
// one request's token to another (a "last request" view, a cached echo) hands no task another's.
// The needles of a set are put together once per set (the source hands out the same array while
// it is unchanged) from each credential's own, worked out once. What the scan looks for is a
// needle's anchors (anchorsOf): a few bytes of it that any copy long enough to matter holds, each
// found copy then extended both ways as far as it agrees with its needle. A set of a few
// credentials is scanned as one is, a native indexOf per anchor; where those would cost more
// than one pass (ONE_PASS_AT: N tokens held, or a short secret's many short anchors), one pass
// over the bytes with a rolling hash of each position's next k bytes against the anchors' (taken
// away from a needle's start: one broker's JWTs share their header), so the cost grows with the
// bytes, not with N.
import type { Credential, CredentialBinding } from '../context.js'
import { NONE_HELD } from '../credentials/held.js'
import { beginsEscaped, escapedNeedle, extendEscaped, type EscapedNeedle } from './escaped-copy.js'

export interface BodyNeedles {
  readonly needles: readonly Buffer[]
  /** Needles by their first byte: where a held-back tail may begin. */
  readonly byFirstByte: readonly (readonly Buffer[] | undefined)[]
  /** The fewest bytes a copy is overwritten at (the least of the needles' leastShown). */
  readonly fewest: number
  readonly longest: number
  /** Where the scan looks for each needle: every copy long enough to be overwritten holds one. */
  readonly anchors: readonly Anchor[]
  /** Written over a match: a byte no needle contains, so an overwrite never makes a new one. */
  readonly mask: number
  /** Which byte values the needles use (1: used), for the mask of a set put together from several. */
  readonly used: Uint8Array
  /** For many needles: the one-pass index (see the top of the file); null: indexOf per needle. */
  readonly index: NeedleIndex | null
  /** The texts matched escape by escape (escaped-copy.ts): an echo that escaped some of their characters and not others. */
  readonly escaped: readonly EscapedNeedle[]
  /** Bytes an escaped copy can begin with (1: can): where a held-back tail may begin one. */
  readonly escapedFirst: Uint8Array
}

/**
 * Some bytes of a needle at `at` (see anchorsOf): a copy of `least` bytes or more holds
 * one of its needle's anchors whole, wherever in the needle it begins (see anchorsOf).
 */
interface Anchor {
  readonly needle: Buffer
  /** The needle's place in its set: with the alignment, what names a copy (copyAt). */
  readonly id: number
  readonly at: number
  readonly bytes: Buffer
  /** leastShown of the needle. */
  readonly least: number
  /** An anchor of an escaped needle (`needle` is then its secret): its copies are extended escape by escape. */
  readonly escaped?: EscapedNeedle
}

interface NeedleIndex {
  /** Bytes hashed at each position: the shortest anchor's length, at most MAX_K. */
  readonly k: number
  /** 31^(k-1), to roll the oldest byte out. */
  readonly pow: number
  /** Anchors by the hash of their first k bytes. */
  readonly byHash: ReadonlyMap<number, readonly Anchor[]>
  /** A bit per hash (modulo its size): most positions are passed over on one read. */
  readonly filter: Uint32Array
  readonly filterMask: number
}

/**
 * When a set is scanned in one pass: once the sum over its anchors of 1/length passes this. A
 * native indexOf skips ahead by up to its pattern's length, and costs (measured, 16 KiB of JSON)
 * some 4.5 / length ns a byte; the one pass some 3 ns a byte however many anchors it looks for.
 */
const ONE_PASS_AT = 3 / 4.5
/** An anchor's longest: a native indexOf skips ahead by up to an anchor's length, so a long needle's is long. */
const ANCHOR = 64
/** The most bytes the one-pass scan hashes at each position. */
const MAX_K = 16
/** A copy missing no more than this many of a needle's bytes is overwritten, however long the needle. */
const MISSING_AT_MOST = 16

/**
 * The fewest bytes of a needle a copy shows to be overwritten: all but MISSING_AT_MOST of them,
 * and at least three quarters (and 8; a needle of 8 or fewer, only whole). An upstream that cuts
 * what it quotes (a debug page that keeps a header's first 500 bytes, an error message that
 * quotes "the token eyJ…" short of its end) would otherwise hand the agent all of a secret but
 * its last characters: a JWT short of one is 64 guesses from whole. Copies shorter than this are
 * the prefixes every token of a kind shares (`sk_live_`, a JWT's header and, for another token of
 * the same user, its claims: a signature is longer than 16 bytes) and an upstream's own masking
 * (`sk-…abcd`), which show too little to matter and are left as they are.
 */
export function leastShown(length: number): number {
  if (length <= 8) return length
  return Math.max(8, Math.ceil((3 * length) / 4), length - MISSING_AT_MOST)
}

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
  if (!n) byCredential.set(credential, (n = compileNeedles([credential.value, ...binding.encodedForms(credential)], everyBytePercentEncoded(credential.value))))
  return n
}

/**
 * The secret with every byte percent-encoded, in either hex case: an echo that escapes all of it,
 * which the head's scrub reads by decoding, a body's by these needles (the echo spellings escape
 * only what encodeURIComponent does). The secret's alone: its forms so spelled are not looked for.
 */
function everyBytePercentEncoded(secret: string): string[] {
  let upper = ''
  for (const b of Buffer.from(secret)) upper += '%' + b.toString(16).toUpperCase().padStart(2, '0')
  return [upper, upper.toLowerCase()]
}

/**
 * Several credentials' needles as one set, none worked out again: a change to a set of N costs
 * some N × 60 references, not N credentials' spellings. Credentials of the same value are taken
 * once (heldNeedles); two different ones share no needle but by chance, which costs only time.
 */
export function combineNeedles(parts: readonly BodyNeedles[]): BodyNeedles {
  const needles: Buffer[] = []
  const escaped: EscapedNeedle[] = []
  const used = new Uint8Array(256)
  for (const p of parts) {
    for (const b of p.needles) needles.push(b)
    for (const e of p.escaped) escaped.push(e)
    for (let i = 0; i < 256; i++) used[i]! |= p.used[i]!
  }
  return assemble(needles, used, escaped)
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

export function compileNeedles(texts: readonly string[], literal: readonly string[] = []): BodyNeedles {
  const spelled = new Set<string>(literal)
  for (const text of texts) for (const v of echoSpellings(text)) spelled.add(v)
  const seen = new Set<string>()
  const needles: Buffer[] = []
  const add = (b: Buffer) => {
    const key = b.toString('hex')
    if (b.length > 0 && !seen.has(key)) {
      seen.add(key)
      needles.push(b)
    }
  }
  for (const s of spelled) {
    // A form that is UTF-8 bytes read one per character (what a header carries) is those bytes
    // in a body; read as UTF-8 it is how a double-encoding echo writes them. Both are looked for.
    add(Buffer.from(s, 'utf8'))
    if (/^[\0-\xff]*$/.test(s)) add(Buffer.from(s, 'latin1'))
  }
  // An echo in UTF-16 (a body sent with `charset=utf-16le`, a Windows service's own text) holds
  // each character in two bytes: the credential and the forms it is sent in are looked for in
  // both byte orders too; not every echo spelling of them (those are an echo's, in UTF-8, and
  // three times the needles would cost every credentialed body).
  for (const text of texts) {
    const le = Buffer.from(text, 'utf16le')
    add(le)
    add(Buffer.from(le).swap16())
  }
  const escaped: EscapedNeedle[] = []
  for (const text of texts) {
    const e = escapedNeedle(text, leastShown(Buffer.byteLength(text)))
    if (e !== null) escaped.push(e)
  }
  const used = new Uint8Array(256)
  for (const b of needles) for (const x of b) used[x] = 1
  for (const e of escaped) for (const forms of e.spellings) if (forms) for (const f of forms) for (const x of f) used[x] = 1
  return assemble(needles, used, escaped)
}

function assemble(needles: Buffer[], used: Uint8Array, escaped: readonly EscapedNeedle[]): BodyNeedles {
  const byFirstByte: Buffer[][] = []
  const anchors: Anchor[] = []
  let fewest = Infinity
  let longest = -Infinity
  for (let id = 0; id < needles.length; id++) {
    const b = needles[id]!
    ;(byFirstByte[b[0]!] ??= []).push(b)
    const least = leastShown(b.length)
    if (least < fewest) fewest = least
    if (b.length > longest) longest = b.length
    anchorsOf(b, id, least, anchors)
  }
  const escapedFirst = new Uint8Array(256)
  for (let j = 0; j < escaped.length; j++) {
    const e = escaped[j]!
    const least = leastShown(e.secret.length)
    if (least < fewest) fewest = least
    if (e.longestCopy > longest) longest = e.longestCopy
    const first = e.spellings[e.secret[0]!]
    if (first) for (const f of first) escapedFirst[f[0]!] = 1
    else escapedFirst[e.secret[0]!] = 1
    for (const a of e.anchors) anchors.push({ needle: e.secret, id: needles.length + j, at: a.at, bytes: a.bytes, least, escaped: e })
  }
  let perByte = 0
  for (const a of anchors) perByte += 1 / a.bytes.length
  return { needles, byFirstByte, fewest, longest, anchors, mask: maskByte(used), used, index: perByte > ONE_PASS_AT ? indexAnchors(anchors) : null, escaped, escapedFirst }
}

/**
 * Anchors of g bytes at step - 1, 2·step - 1… with step = least - g + 1: any `least` bytes of the
 * needle, wherever they begin, hold one whole. A needle has one or two, and none at its start (the
 * header a broker's JWTs share, a key's `sk-proj-`), so other tokens of the same kind are not
 * candidates; but one whose `least` is 8 (a needle of 9 or 10 bytes) has an anchor per byte, 2 or 3.
 */
function anchorsOf(needle: Buffer, id: number, least: number, out: Anchor[]): void {
  // Half of `least` (8 to ANCHOR bytes): a needle then has one or two anchors, not one per byte.
  const g = Math.min(least, ANCHOR, Math.max(8, Math.ceil(least / 2)))
  const step = least - g + 1
  for (let at = step - 1; at <= needle.length - g; at += step) out.push({ needle, id, at, bytes: needle.subarray(at, at + g), least })
}

/** Rolls the hash of `k` bytes from `start`: the same arithmetic as the scan (scanIndexed). */
function hashOf(b: Buffer, start: number, k: number): number {
  let h = 0
  for (let i = start; i < start + k; i++) h = (Math.imul(h, 31) + b[i]!) | 0
  return h
}

function indexAnchors(anchors: readonly Anchor[]): NeedleIndex {
  let k = MAX_K
  for (const a of anchors) if (a.bytes.length < k) k = a.bytes.length
  let pow = 1
  for (let i = 1; i < k; i++) pow = Math.imul(pow, 31)
  const byHash = new Map<number, Anchor[]>()
  let bits = 1 << 12
  while (bits < anchors.length * 16 && bits < 1 << 24) bits <<= 1
  const filter = new Uint32Array(bits >>> 5)
  const filterMask = bits - 1
  for (const a of anchors) {
    const h = hashOf(a.bytes, 0, k)
    const list = byHash.get(h)
    if (list) list.push(a)
    else byHash.set(h, [a])
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

/** A copy found: its place in the data, and which needle at which alignment (to find it once). */
interface Copy {
  start: number
  end: number
  needle: Buffer
  /** Where the needle's first byte falls in the data (may be before 0 or past the end). */
  offset: number
}

/** Copies found in one scan, and the alignments (needle, offset) already tried: each is extended once. */
interface Found {
  copies: Copy[]
  tried: Set<number>
  /** By escaped anchor: where the last copy found through it ends (its later hits inside that copy are not extended again). */
  escapedTo?: Map<Anchor, number>
}

/**
 * The copy of `a`'s needle through an anchor found at data[i] (its first `matched` bytes
 * compared): extended byte by byte both ways as far as data and needle agree, kept when it is at
 * least `a.least` long. An alignment tried before (another anchor of the same copy) is not
 * extended again: a body holding thousands of copies costs a lookup each, not a search.
 */
function copyAt(data: Buffer, a: Anchor, i: number, matched: number, found: Found | null): Found | null {
  if (a.escaped !== undefined) return escapedCopyAt(data, a, a.escaped, i, matched, found)
  const needle = a.needle
  const offset = i - a.at
  found ??= { copies: [], tried: new Set() }
  const key = (offset + ALIGNMENT_BIAS) * ALIGNMENT_IDS + a.id
  if (found.tried.has(key)) return found
  found.tried.add(key)
  let start = i
  while (start > 0 && start > offset && data[start - 1] === needle[start - 1 - offset]) start--
  let end = i + matched
  const needleEnd = offset + needle.length
  while (end < data.length && end < needleEnd && data[end] === needle[end - offset]) end++
  if (end - start >= a.least) found.copies.push({ start, end, needle, offset })
  return found
}
/**
 * copyAt for an escaped needle's anchor: the copy's extent found escape by escape, kept when it
 * spells at least `a.least` characters of the secret. Its `offset` is where the secret would begin
 * were the copy unescaped up to its end, so that whether the secret goes on past the end (what
 * makes a copy wait) reads as for any copy. Tried once per start (a copy holds several anchors).
 */
function escapedCopyAt(data: Buffer, a: Anchor, e: EscapedNeedle, i: number, matched: number, found: Found | null): Found | null {
  // An anchor's hits come in order: one inside the stretch its last hit extended over is that
  // stretch again, unless the secret repeats itself (an anchor twice in it), whose other alignments
  // its plain needles find. Not extending it again keeps a body of such repeats linear: 1 MiB of
  // a repetitive secret's runs cost 1.3 s more otherwise.
  const to = found?.escapedTo?.get(a)
  if (to !== undefined && i < to) return found
  const x = extendEscaped(data, e, i, a.at, matched)
  found ??= { copies: [], tried: new Set() }
  ;(found.escapedTo ??= new Map()).set(a, x.end)
  if (x.to - x.from < a.least) return found
  const key = (x.start + ALIGNMENT_BIAS) * ALIGNMENT_IDS + a.id
  if (found.tried.has(key)) return found
  found.tried.add(key)
  found.copies.push({ start: x.start, end: x.end, needle: a.needle, offset: x.end - x.to })
  return found
}

/** An alignment as one number: offset (at least minus the longest needle) and needle id (fewer than 2^20). */
const ALIGNMENT_BIAS = 1 << 24
const ALIGNMENT_IDS = 1 << 20

/**
 * Every copy in `data` long enough to be overwritten, by end, or null: one pass,
 * a rolling hash of the k bytes from each position, looked up (past a bit filter) among the
 * hashes of the anchors' first k bytes, and each candidate compared and extended.
 */
function scanIndexed(data: Buffer, ix: NeedleIndex): Copy[] | null {
  const { k, pow, byHash, filter, filterMask } = ix
  const len = data.length
  if (len < k) return null
  let found: Found | null = null
  let h = hashOf(data, 0, k)
  for (let i = 0; ; i++) {
    const slot = h & filterMask
    if ((filter[slot >>> 5]! & (1 << (slot & 31))) !== 0) {
      const candidates = byHash.get(h)
      if (candidates !== undefined) {
        for (const a of candidates) {
          if (data.compare(a.needle, a.at, a.at + k, i, i + k) === 0) found = copyAt(data, a, i, k, found)
        }
      }
    }
    if (i + k === len) return byEnd(found)
    h = (Math.imul(h - Math.imul(data[i]!, pow), 31) + data[i + k]!) | 0
  }
}

/** Every copy in `data` long enough to be overwritten (as scanIndexed), or null: a native indexOf per anchor, for a set of a few needles. */
function scanEach(data: Buffer, anchors: readonly Anchor[]): Copy[] | null {
  let found: Found | null = null
  for (const a of anchors) {
    for (let i = data.indexOf(a.bytes); i !== -1; i = data.indexOf(a.bytes, i + 1)) found = copyAt(data, a, i, a.bytes.length, found)
  }
  return byEnd(found)
}

function scan(data: Buffer, n: BodyNeedles): Copy[] | null {
  return n.index !== null ? scanIndexed(data, n.index) : scanEach(data, n.anchors)
}

function byEnd(found: Found | null): Copy[] | null {
  if (found === null || found.copies.length === 0) return null
  return found.copies.length > 1 ? found.copies.sort(byEndThenStart) : found.copies
}

const byEndThenStart = (a: Copy, b: Copy) => a.end - b.end || a.start - b.start

/**
 * Where what waits for the next chunk begins (`length`: nothing waits): at the first copy that
 * reaches the end with its needle going on. No byte that waits is overwritten before the copy it
 * is part of is whole (overwrite stops there): a copy overlapping what waits from before it is
 * overwritten up to it now, and its part in what waits lies inside the copy that waits, which is
 * overwritten whole once it ends. What waits is at most a needle's length, whatever the body: held
 * back from the first copy touching it, a body of copies each overlapping the next (UTF-16 copies,
 * which both byte orders' needles match a byte apart) waited whole, and was scanned again at
 * every chunk: 1 MiB of them held the event loop 25 s.
 */
function waitingFrom(copies: readonly Copy[], length: number): number {
  let from = length
  for (const c of copies) if (c.end === length && c.end - c.offset < c.needle.length && c.start < from) from = c.start
  return from
}

/**
 * Whether `text` holds a copy of a needle long enough to be overwritten (whole, cut short or
 * begun late: see leastShown): for text checked whole, a response head's value, a server's
 * error text.
 */
export function holdsCopy(text: string, n: BodyNeedles): boolean {
  if (text.length < n.fewest) return false
  return scan(Buffer.from(text, /[^\0-\xff]/.test(text) ? 'utf8' : 'latin1'), n) !== null
}

/** The most of a held tail let go by release(): the first bytes of a needle, never enough of a secret to matter. */
export const RELEASE_MAX = 4

/** One response body's pass: push() each chunk, end() once; what they return goes to the agent. */
export class BodyScrubber {
  /** Bytes not yet given to the agent: what may begin a needle, or a copy that may go on. */
  private held: Buffer | null = null
  /**
   * The last bytes the agent has that needles use (see keepContext), checked again with what
   * comes next: a copy begun in them that goes on is overwritten from where the agent's copy stops.
   */
  private context: Buffer | null = null
  /** Bytes let go by release() since the agent was last sent more: at most RELEASE_MAX in all. */
  private letGo = 0
  /** What is held continues a copy long enough to be overwritten: never let go, however short. */
  private heldInCopy = false
  /** Copies overwritten so far. */
  found = 0

  /** What this pass looks for. */
  constructor(readonly needles: BodyNeedles) {}

  /**
   * This pass looking for other needles from here on (the binding's held set changed while a long
   * body streams), or null while bytes are held: they were held for these needles' sake, and go
   * with them. What the agent has and was counted stays.
   */
  lookingFor(n: BodyNeedles): BodyScrubber | null {
    if (this.held !== null) return null
    const next = new BodyScrubber(n)
    next.found = this.found
    next.context = this.context
    next.letGo = this.letGo
    return next
  }

  /** What of `chunk` (after anything held) may go to the agent now, or null when all of it waits. */
  push(chunk: Buffer): Buffer | null {
    let data = this.held === null ? chunk : Buffer.concat([this.held, chunk])
    this.held = null
    const bridge = this.bridge(data)
    const copies = this.copiesIn(data, bridge)
    // A copy reaching the end that its needle goes on past may go on in the next chunk: it waits
    // (overwritten now, what came next would be a shorter copy), with every copy it touches. One
    // begun in what the agent has (a negative start) holds back all that came since.
    let from = copies === null ? data.length : waitingFrom(copies, data.length)
    this.heldInCopy = from < data.length
    if (bridge !== null && data.length < this.needles.longest) {
      // So does a needle begun in a tail let go (release), if all that came since continues it.
      const p = this.mayBeginNeedle(bridge, this.context!.length) - this.context!.length
      if (p < 0 && p < from) from = p
    }
    if (copies !== null) data = this.overwrite(data, chunk, copies, from)
    if (from >= 0) {
      from = Math.min(from, this.mayBeginNeedle(data, from))
      this.letGo = 0
    }
    const cut = Math.max(from, 0)
    this.held = cut < data.length ? Buffer.from(data.subarray(cut)) : null
    if (cut > 0) this.keepContext(data.subarray(0, cut))
    return cut > 0 ? data.subarray(0, cut) : null
  }

  /**
   * Every copy in `data` long enough to be overwritten, by end, or null; with those begun in what
   * the agent already has (the context: found in the bridge, their start before 0 here).
   */
  private copiesIn(data: Buffer, bridge: Buffer | null): Copy[] | null {
    const n = this.needles
    let copies = data.length >= n.fewest ? scan(data, n) : null
    const ctx = this.context
    if (ctx === null || bridge === null) return copies
    const across = bridge.length >= n.fewest ? scan(bridge, n) : null
    if (across === null) return copies
    for (const c of across) {
      if (c.start >= ctx.length || c.end <= ctx.length) continue
      const start = c.start - ctx.length
      const end = c.end - ctx.length
      const offset = c.offset - ctx.length
      // The same copy found in `data` alone (its part there long enough by itself) is this one, cut.
      const same = copies?.findIndex((d) => d.needle === c.needle && d.offset === offset) ?? -1
      if (same !== -1) copies!.splice(same, 1)
      ;(copies ??= []).push({ start, end, needle: c.needle, offset })
    }
    return copies === null ? null : copies.sort(byEndThenStart)
  }

  /** The context and as much of `data` as a copy begun in the context can reach (a few KiB at most, however big the chunk), or null without a context. */
  private bridge(data: Buffer): Buffer | null {
    return this.context === null ? null : Buffer.concat([this.context, data.length > this.needles.longest ? data.subarray(0, this.needles.longest) : data])
  }

  /**
   * Keeps the end of what the agent now has from after its last byte no needle uses (at most
   * longest - 1 bytes, with the context before if `sent` is all needle bytes): a copy going on
   * into the next chunk is all needle bytes, so it begins there or later. Most bodies end in such
   * a byte (a newline, a `}`): nothing is kept for them.
   */
  private keepContext(sent: Buffer): void {
    const { used, longest } = this.needles
    const most = longest - 1
    let from = sent.length
    while (from > 0 && sent.length - from < most && used[sent[from - 1]!] === 1) from--
    if (from === sent.length) this.context = null
    else if (from > 0 || this.context === null || sent.length >= most) this.context = Buffer.from(sent.subarray(from))
    else {
      const before = this.context
      let b = before.length
      while (b > 0 && before.length - b + sent.length < most && used[before[b - 1]!] === 1) b--
      this.context = Buffer.concat([before.subarray(b), sent])
    }
  }

  /**
   * Whether release() would let the held tail go: some is held, only for what could begin a needle
   * (a copy begun late, of which the agent has the start, is not let go: those bytes would make it
   * long enough to matter), and with what was let go before, at most RELEASE_MAX bytes.
   */
  get releasable(): boolean {
    return this.held !== null && !this.heldInCopy && this.held.length + this.letGo <= RELEASE_MAX
  }

  /** The held tail, for the agent now (see the top of the file); null when not releasable. */
  release(): Buffer | null {
    if (!this.releasable) return null
    const out = this.held!
    this.held = null
    this.letGo += out.length
    this.keepContext(out)
    return out
  }

  /** What was held back at the end of the body, with any copy in it (now ended) overwritten. */
  end(): Buffer | null {
    let rest = this.held
    if (rest === null) return null
    const copies = this.copiesIn(rest, this.bridge(rest))
    if (copies !== null) rest = this.overwrite(rest, null, copies, rest.length)
    this.held = null
    this.context = null
    return rest
  }

  /**
   * `data` with every copy ending by `until` overwritten (the rest wait) from 0 on (the agent has
   * what is before: a copy begun there is overwritten from where the agent's part stops), counted
   * as one echo where it overlaps the last counted. Every copy is found in the bytes as they came
   * before any is overwritten: one overwritten first would hide a longer one overlapping it (a
   * Basic header's base64 past the secret's base64 core: its last group, `…ZQ==`, went out and
   * gave the last character away).
   */
  private overwrite(data: Buffer, chunk: Buffer | null, copies: readonly Copy[], until: number): Buffer {
    let countedTo = -Infinity
    for (const c of copies) {
      // A copy reaching into what waits is overwritten up to it (see waitingFrom), and counted with the copy that waits.
      if (c.start >= until) continue
      // undici's chunk may be a view of its read buffer: it is copied before anything is written in it.
      if (data === chunk) data = Buffer.from(data)
      data.fill(this.needles.mask, Math.max(c.start, 0), Math.min(c.end, until))
      if (c.end <= until && c.start >= countedTo) {
        this.found++
        countedTo = c.end
      }
    }
    return data
  }

  /** The first position before `before` from which the rest of `data` is the start of some needle (data.length if none). */
  private mayBeginNeedle(data: Buffer, before: number): number {
    const { byFirstByte, longest, escaped, escapedFirst } = this.needles
    const len = data.length
    for (let p = Math.max(0, len - longest + 1); p < before; p++) {
      if (escapedFirst[data[p]!] === 1) for (const e of escaped) if (beginsEscaped(data, p, e)) return p
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
