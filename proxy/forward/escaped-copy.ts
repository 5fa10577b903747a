// A copy of a secret some of whose characters an echo escaped, and not others: Go's html/template
// writes a base64 secret's `+` as `\u002b` and its `/` as `\/` inside a <script> string, and
// encoders differ in which characters they escape (one `\u002f`, another `&#x2b;` only, a
// proxy `%252B`). Whole spellings (body-scrub.ts echoSpellings) cover an encoder that escapes
// what a known library does; a mixed one cut the secret into runs each shorter than the least
// overwritten (leastShown) and went to the agent whole. Here a secret is matched character by
// character: a letter or digit as itself, any other ASCII character as itself or any escape of
// it. Found from its runs of letters and digits (which no encoder escapes), extended both ways.

/** A secret matched escape by escape: its bytes, and for each byte an escape can stand for, the escapes. */
export interface EscapedNeedle {
  readonly secret: Buffer
  /**
   * By byte value: the spellings of that character, longest first, or undefined for a letter or
   * digit. Longest first: `\/` read backwards ends in `/`, and taken as the character itself it
   * left its backslash to stop the copy short.
   */
  readonly spellings: readonly (readonly Buffer[] | undefined)[]
  /** The most bytes a copy can take in a body: every escapable character in its longest escape. */
  readonly longestCopy: number
  /** Runs of the secret no escape touches, where copies are found (positions in the secret). */
  readonly anchors: readonly { at: number; bytes: Buffer }[]
}

const HTML_NAMED: Record<string, string[]> = { '&': ['&amp;'], '<': ['&lt;'], '>': ['&gt;'], '"': ['&quot;'], "'": ['&apos;'], '+': ['&plus;'], '/': ['&sol;'], '=': ['&equals;'] }

/** Itself and every escape of it a body may hold: JSON and JavaScript (`\u002b`, `\x2b`, `\/`), HTML references, percent-encoding once or twice, `+` for a space. */
function spellingsOf(byte: number): Buffer[] {
  const ch = String.fromCharCode(byte)
  const h = byte.toString(16).padStart(2, '0')
  const H = h.toUpperCase()
  const all = [ch, `\\u00${h}`, `\\u00${H}`, `\\x${h}`, `\\x${H}`, `\\${ch}`, `&#${byte};`, `&#x${h};`, `&#x${H};`, `%${H}`, `%${h}`, `%25${H}`, `%25${h}`, ...(HTML_NAMED[ch] ?? [])]
  if (ch === ' ') all.push('+')
  return [...new Set(all)].sort((a, b) => b.length - a.length).map((s) => Buffer.from(s, 'latin1'))
}

const ALNUM = /[A-Za-z0-9]/
/** What percent-encoding, JSON and HTML leave as it is, every encoder of theirs (RFC 3986's unreserved, less letters and digits). */
const UNRESERVED = /[-._~]/
/**
 * Anchor lengths tried, longest first: the longest whose anchors cover every copy that matters is
 * taken (a longer anchor is a rarer candidate, and a set of needles stays cheap enough for a native
 * indexOf each: body-scrub.ts ONE_PASS_AT). Shorter than the last shows too little to find copies by.
 */
const ANCHOR_LENGTHS = [16, 12, 8]

/**
 * The escaped needle of `text`, whose copies are overwritten from `least` characters of it (see
 * body-scrub.ts leastShown), or null when no run of it is long enough to find a copy by, or when
 * no encoder escapes some of its characters and not others: it holds nothing but letters, digits,
 * bytes beyond ASCII and the characters no JSON, HTML or URL encoder escapes (`-._~`: a JWT, a
 * base64url key), which an encoder escaping everything else spells whole, or not at all.
 */
export function escapedNeedle(text: string, least: number): EscapedNeedle | null {
  const secret = Buffer.from(text, 'utf8')
  const spellings: (Buffer[] | undefined)[] = []
  let longestCopy = 0
  let escapable = false
  for (const b of secret) {
    if (b < 0x80 && !ALNUM.test(String.fromCharCode(b))) {
      if (!UNRESERVED.test(String.fromCharCode(b))) escapable = true
      const s = (spellings[b] ??= spellingsOf(b))
      longestCopy += Math.max(...s.map((x) => x.length))
    } else longestCopy++
  }
  if (!escapable) return null
  let anchors: { at: number; bytes: Buffer }[] = []
  for (const length of ANCHOR_LENGTHS) {
    const { chosen, covered } = anchorsOf(secret, spellings, least, length)
    anchors = chosen
    if (covered) break
  }
  if (anchors.length === 0) return null
  return { secret, spellings, longestCopy, anchors }
}

/**
 * As few anchors of `length` bytes no escape changes as cover every `least` characters of the
 * secret (the copies that matter), each as late as the first window not yet covered allows: a
 * long token needs one or two, and a body is scanned for those alone. `covered`: no window was
 * left without one (one with escapable characters every few bytes is left to the whole spellings).
 */
function anchorsOf(secret: Buffer, spellings: readonly (readonly Buffer[] | undefined)[], least: number, length: number): { chosen: { at: number; bytes: Buffer }[]; covered: boolean } {
  const fits: number[] = []
  let run = 0
  for (let i = 0; i < secret.length; i++) {
    run = spellings[secret[i]!] === undefined ? run + 1 : 0
    if (run >= length) fits.push(i - length + 1)
  }
  const chosen: { at: number; bytes: Buffer }[] = []
  let covered = true
  let k = 0
  for (let s = 0; s + least <= secret.length; ) {
    while (k < fits.length && fits[k]! < s) k++
    let best = -1
    for (let j = k; j < fits.length && fits[j]! + length <= s + least; j++) best = fits[j]!
    if (best === -1) {
      covered = false
      // The first window the next place fits, if any (it lies past this one's end: later than s).
      if (k === fits.length) break
      s = fits[k]! + length - least
      continue
    }
    chosen.push({ at: best, bytes: secret.subarray(best, best + length) })
    s = best + 1
  }
  return { chosen, covered }
}

/** A copy's extent: data[start, end) holds secret[from, to) (and, where data ended inside an escape, the start of secret[to]'s). */
export interface EscapedExtent {
  start: number
  end: number
  from: number
  to: number
}

/**
 * The copy through an anchor: secret[at, at + len) is at data[i, i + len). Extended both ways as
 * far as data spells the secret; forward, data ending part-way through an escape takes those bytes
 * into the copy (the escape may go on in the next chunk, and they wait with the copy).
 */
export function extendEscaped(data: Buffer, n: EscapedNeedle, i: number, at: number, len: number): EscapedExtent {
  const { secret, spellings } = n
  const { end, to } = forwardEscaped(data, n, i + len, at + len)
  let start = i
  let from = at
  backward: while (from > 0 && start > 0) {
    const b = secret[from - 1]!
    const forms = spellings[b]
    if (forms === undefined) {
      if (data[start - 1] !== b) break
      start--
      from--
      continue
    }
    for (const f of forms) {
      if (f.length > start) continue
      if (data.compare(f, 0, f.length, start - f.length, start) === 0) {
        start -= f.length
        from--
        continue backward
      }
    }
    break
  }
  return { start, end, from, to }
}

/** Whether data[p..] is, to its end, the start of a copy (escapes included, the last perhaps cut): what must wait for the next chunk. */
export function beginsEscaped(data: Buffer, p: number, n: EscapedNeedle): boolean {
  if (p >= data.length) return false
  const { end, to } = forwardEscaped(data, n, p, 0)
  return end === data.length && to < n.secret.length
}

/**
 * How far data[end..] spells secret[to..], escape by escape: where data and the secret part, the
 * secret ends, or data does. Data ending part-way through what may be an escape takes those bytes
 * in (`end` is then data's length, `to` short of the character they may spell).
 */
function forwardEscaped(data: Buffer, n: EscapedNeedle, end: number, to: number): { end: number; to: number } {
  const { secret, spellings } = n
  forward: while (to < secret.length && end < data.length) {
    const b = secret[to]!
    const forms = spellings[b]
    if (forms === undefined) {
      if (data[end] !== b) break
      end++
      to++
      continue
    }
    for (const f of forms) {
      const room = data.length - end
      if (f.length > room) {
        // Data ends inside what may be this escape: its bytes so far belong to the copy.
        if (data.compare(f, 0, room, end, data.length) === 0) return { end: data.length, to }
        continue
      }
      if (data.compare(f, 0, f.length, end, end + f.length) === 0) {
        end += f.length
        to++
        continue forward
      }
    }
    break
  }
  return { end, to }
}
