// Path globs and the readings of a request path an upstream might act on.
//
// The sidecar forwards the path as the URL parser normalised it, but servers disagree about
// %2F, backslashes, `;params` and doubled slashes. So policy judges a path under every reading
// a server plausibly uses: a deny rule matches if ANY reading matches (case-insensitively), an
// allow rule only if EVERY reading matches. Ambiguity therefore always falls towards deny.

const UNRESERVED = /^[A-Za-z0-9\-._~]$/
/**
 * A dot, space or tab ending a segment, and (for the replace) each whole run of them that does.
 * A run is only tried from its start (the lookbehind): tried from every dot of `/.....x`, as a
 * plain `(?:\.|%20|%09)+(\/|$)` is, a 16 KB path cost 0.6 s of the event loop.
 */
const SEGMENT_END_TRIMMABLE = /(?:\.|%20|%09)(?:\/|$)/
const SEGMENT_END_RUNS = /(?<!\.|%20|%09)(?:\.|%20|%09)+(\/|$)/g
/** Spaces and tabs ending a segment (runs from their start, as above). */
const SEGMENT_END_SPACES = /(?:%20|%09)(?:\/|$)/
const SEGMENT_END_SPACES_G = /(?<!%20|%09)(?:%20|%09)+(\/|$)/g
/** Where a server that decodes `%3F` / `%23` before parsing the target ends the path. */
const QUERY_OR_FRAGMENT = /%3F|%23|[?#]/
/** The leading slashes and authority a URL parser reads at the start of `//host/path`. */
const AUTHORITY = /^\/{2,}[^/]*/

/** Default-ignorable characters (Unicode's property: soft hyphen, zero-width and directional marks, variation selectors, fillers, tags), which NFKC_Casefold drops. */
const INVISIBLE = /\p{Default_Ignorable_Code_Point}/gu
/** Whitespace, Unicode's included (JavaScript's `\s`, and NEL, which Python's isspace() adds), ending a segment; each run tried from its start only (see SEGMENT_END_RUNS). */
const UNICODE_SPACE_ENDING_SEGMENT = /(?<![\s\u0085])[\s\u0085]+(\/|$)/g
/** Whitespace as itself, not percent-encoded: only a decoded reading holds any. */
const PLAIN_SPACE = /[\s\u0085]/

/** Decodes %XX only where it stands for an unreserved character; upper-cases the rest. */
function decodeUnreserved(path: string): string {
  if (!path.includes('%')) return path
  return path.replace(/%([0-9A-Fa-f]{2})/g, (m, hex: string) => {
    const ch = String.fromCharCode(parseInt(hex, 16))
    return UNRESERVED.test(ch) ? ch : m.toUpperCase()
  })
}

/** Further decodings judged: a stack of proxies and frameworks each decoding once more. */
export const MAX_EXTRA_DECODINGS = 3

/** One decoding of every printable ASCII %XX (UTF-8 sequences stay encoded: see readingsOf). */
function decodeAsciiOnce(path: string): string {
  return path.replace(/%([2-7][0-9A-Fa-f])/g, (m, hex: string) => (hex.toLowerCase() === '7f' ? m : String.fromCharCode(parseInt(hex, 16))))
}

/**
 * The path as servers that decode it again read it, one entry per further decoding. Each reads
 * what one decoding of the WHOLE path gives, every escape at once: `%252F` is `%2F` to it, and so
 * is `%25%32%46` (rewriting only `%25` followed by two hex digits missed the second). Only an
 * encoded `%` can make a decoding say something new, so decodings go on while one remains.
 */
export function furtherDecodings(path: string): string[] {
  const decodings: string[] = []
  let p = path
  for (let i = 0; i < MAX_EXTRA_DECODINGS && p.includes('%25'); i++) decodings.push((p = decodeAsciiOnce(p)))
  return decodings
}

/**
 * Readings of one decoding of a path at most. The transforms are repeated until nothing new
 * appears; a path with more readings than this (only a path built to combine dot segments,
 * doubled slashes, `;params` and trailing dots or spaces has more than a few) is not judged on
 * some of them: pathReadings answers null, and the policy denies it.
 */
export const MAX_READINGS = 256

/** The distinct readings of a (URL-normalised) path, the first the canonical one; null when there are too many to judge (MAX_READINGS). */
export function pathReadings(path: string): string[] | null {
  const readings = readingsOf(path)
  if (readings === null) return null
  if (path.includes('%25')) {
    for (const p of furtherDecodings(path)) {
      const more = readingsOf(p)
      if (more === null) return null
      for (const r of more) if (!readings.includes(r)) readings.push(r)
    }
  }
  return readings
}

function readingsOf(path: string): string[] | null {
  const canonical = decodeUnreserved(path)
  const readings = [canonical]
  const add = (p: string) => {
    if (!readings.includes(p)) readings.push(p)
  }
  // Encoded separators decoded, as some servers and frameworks do before routing: %2F and %5C
  // as `/`, %3B as the `;` that starts path parameters.
  add(canonical.replace(/%2F|%5C/g, '/').replace(/\\/g, '/').replace(/%3B/g, ';'))
  // Then, until nothing new appears (each can expose the next: `/;/admin` drops to `//admin`,
  // which collapses to `/admin`): doubled slashes collapsed, as most servers do; path parameters
  // (`/admin;jsessionid=x`) dropped, as servlet containers do; dot segments resolved; trailing
  // dots and spaces on a segment dropped, as Windows servers do (`/admin./x`, `/admin%20/x`).
  // Compatibility forms folded (NFKC), as servers that normalise Unicode do: fullwidth
  // `/％ａdmin` is `/admin` to them. (A request's path is valid UTF-8, see checkedPath; a
  // second decoding of it need not be, and has no such reading.) A path that starts with `//`
  // is, to a server that resolves its request target as a URL reference (Node's documented
  // `new URL(req.url, base)`, Python's urlsplit), an authority and then a path: `//x/admin` is
  // `/admin` to it (every leading slash is skipped first, as the URL parser does).
  if (/%[89A-F][0-9A-F]/.test(canonical)) {
    let decoded: string | null = null
    try {
      decoded = decodeURIComponent(canonical)
    } catch {
      // not UTF-8 once decoded again
    }
    const folded = decoded?.normalize('NFKC')
    if (decoded !== null && folded !== decoded) add(folded!)
    // Characters that show nothing (soft hyphen, zero-width, BOM) dropped, and Unicode spaces
    // ending a segment trimmed, as Python's str.strip() and Java's String.strip() do:
    // `/admin%C2%A0` and `/admin%E3%80%80` are `/admin` to a server that strips what it routes.
    const bare = decoded === null ? null : folded!.replace(INVISIBLE, '').replace(UNICODE_SPACE_ENDING_SEGMENT, '$1')
    if (bare !== null && bare !== folded) add(bare)
    // Dotless ı and dotted İ: no normalisation makes them i, and a deny glob's case-blind match
    // (JavaScript's, even with Unicode case folding) does not either; Java's equalsIgnoreCase and
    // Python's re.IGNORECASE (Django's `(?i)` routes) take both for i: `/admın` is `/admin` to them.
    if (decoded !== null && /[ıİ]/.test(folded!)) add(folded!.replace(/[ıİ]/g, 'i'))
  }
  for (;;) {
    const before = readings.length
    for (const p of [...readings]) {
      // A backslash left plain by a decoding (`%5C`, or fullwidth `＼` folded) is a separator to
      // the servers the %5C reading is for (IIS), whatever else that reading decoded or folded:
      // `/x%5C..%5C%EF%BD%81dmin` is `/admin` to one that also folds Unicode.
      if (p.includes('\\')) add(p.replace(/\\/g, '/'))
      // Whitespace a decoding left plain is trimmed where it ends a segment, in every reading: it
      // may come to end one only once a `\` is a separator (`/admin%20%EF%BC%BCx`: `/admin /x`).
      if (PLAIN_SPACE.test(p)) add(p.replace(UNICODE_SPACE_ENDING_SEGMENT, '$1'))
      add(p.replace(/\/{2,}/g, '/'))
      if (p.includes(';')) add(p.replace(/;[^/]*/g, ''))
      // Resolved as a path: `/.` first, so a reading that begins `//` is not parsed as an authority
      // (a host the URL parser refuses, `//%20../`, threw here), which the rule below reads it as.
      if (/(^|\/)\.\.?(\/|$)/.test(p)) add(new URL('/.' + p, 'http://x').pathname)
      if (SEGMENT_END_TRIMMABLE.test(p)) {
        add(p.replace(SEGMENT_END_RUNS, '$1'))
        // Spaces trimmed but dots kept, as a server trimming whitespace does: `..%20` is `..`.
        if (SEGMENT_END_SPACES.test(p)) add(p.replace(SEGMENT_END_SPACES_G, '$1'))
      }
      if (p.startsWith('//')) add(p.replace(AUTHORITY, '') || '/')
      // An encoded `?` or `#` decoded before the query is split off (Apache's mod_rewrite,
      // CVE-2024-38474: `/admin%3F.php` is `/admin`), or one a further decoding left plain:
      // the path ends there.
      const cut = p.search(QUERY_OR_FRAGMENT)
      if (cut !== -1) add(p.slice(0, cut) || '/')
    }
    if (readings.length === before) return readings
    if (readings.length > MAX_READINGS) return null
  }
}

/** A compiled glob, asked whether a reading matches it. A RegExp is one. */
export interface PathMatcher {
  test(path: string): boolean
}

/**
 * A glob as a sequence: literal characters (each in the spellings a reading may give it), `?`,
 * `*` (`[^/]*`: within a segment), `**` within a segment (`.*`: across segments), and `/**` as a
 * whole segment (`(?:/.*)?`: nothing, or a `/` and anything). A deny glob also ends in an
 * optional format suffix and trailing slash, with `/.*` as a further ending where it ended in `/**`.
 */
type GlobPart = { kind: 'literal'; spellings: string[] } | { kind: 'one' } | { kind: 'segment' } | { kind: 'any' } | { kind: 'anyDepth' }
type GlobEnd = 'exact' | 'deny' | 'denyAnyDepth'

interface ParsedGlob {
  parts: GlobPart[]
  end: GlobEnd
}

function parseGlob(glob: string, deny: boolean): ParsedGlob {
  const parts: GlobPart[] = []
  const chars = [...glob]
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i]!
    if (c === '*' && chars[i + 1] === '*') {
      // A whole segment (`/**` ending the glob or followed by `/`) is any depth, none included:
      // `/x/**` is `/x` too, and `/**/admin` is `/admin`, `/a/**/b` is `/a/b` (as gitignore,
      // Ant and minimatch have it), so "admin anywhere" leaves no `/admin` open.
      const segment = chars[i - 1] === '/' && (i + 2 === chars.length || chars[i + 2] === '/')
      if (segment) {
        parts.pop() // the `/`, which is part of what ANY_DEPTH matches
        parts.push({ kind: 'anyDepth' })
      } else parts.push({ kind: 'any' })
      i++
    } else if (c === '*') parts.push({ kind: 'segment' })
    else if (c === '?') parts.push({ kind: 'one' })
    else if (c === '%' && /^[0-9A-Fa-f]{2}$/.test(chars.slice(i + 1, i + 3).join(''))) {
      // An escape, as readings have it: an unreserved character decoded, any other upper-cased.
      const hex = chars.slice(i + 1, i + 3).join('')
      const ch = String.fromCharCode(parseInt(hex, 16))
      parts.push({ kind: 'literal', spellings: [UNRESERVED.test(ch) ? ch : `%${hex.toUpperCase()}`] })
      i += 2
    } else parts.push({ kind: 'literal', spellings: spellingsOf(c, deny) })
  }
  if (!deny) return { parts, end: 'exact' }
  const last = parts.at(-1)
  if (parts.length > 1 && last?.kind === 'literal' && last.spellings.length === 1 && last.spellings[0] === '/') parts.pop()
  if (parts.at(-1)?.kind !== 'anyDepth') return { parts, end: 'deny' }
  parts.pop()
  return { parts, end: 'denyAnyDepth' }
}

/** Characters the URL parser percent-encodes in a path (and `#`, which it would take for a fragment). */
const ENCODED_IN_PATH = /[^\x21-\x7e]|["#<>`{}]/

/** One character of a glob: itself, or, where the parser encodes it, its encoding or (in a decoded reading) itself. */
function spellingsOf(c: string, anyCase: boolean): string[] {
  if (!ENCODED_IN_PATH.test(c)) return [c]
  const spellings = new Set<string>()
  for (const v of anyCase ? [c, c.toLowerCase(), c.toUpperCase()] : [c]) {
    spellings.add(v)
    try {
      spellings.add(encodeURIComponent(v))
    } catch {
      // A lone surrogate has no UTF-8 form: only its own spelling can match.
    }
  }
  return [...spellings]
}

/** What `/**` as a whole segment compiles to: nothing (the path itself, `/a/b` for `/a/**` + `/b`), or anything under it. */
const ANY_DEPTH = '(?:/.*)?'
/** One character as readings spell it: itself, an escape, or a UTF-8 sequence of escapes (é is %C3%A9). */
const ONE = '(?:%[0-9A-Fa-f]{2}(?:%[89ABab][0-9A-Fa-f]){0,3}|[^/])'
/**
 * A deny's ending. A format suffix ends the path too: Rails routes `/admin.json` to `/admin`'s
 * action (every route takes `(.:format)`), as Spring's suffix patterns did. Not before a deeper
 * path: `/v1/**` is not `/v1.2/x`.
 */
const DENY_END = '(?:\\.[^/]*)?/?'

/**
 * A glob as a regular expression, matched by backtracking: once a glob has two wildcards that
 * can end in more than one place, that costs time polynomial in the path (compileGlob uses it
 * only where they cannot).
 */
export function globAsRegExp(glob: string, deny: boolean): RegExp {
  return regExpOf(parseGlob(glob, deny))
}

function regExpOf({ parts, end }: ParsedGlob): RegExp {
  let src = ''
  for (const part of parts) {
    if (part.kind === 'literal') src += part.spellings.length === 1 ? escapeRegex(part.spellings[0]!) : `(?:${part.spellings.map(escapeRegex).join('|')})`
    else if (part.kind === 'one') src += ONE
    else if (part.kind === 'segment') src += '[^/]*'
    else if (part.kind === 'any') src += '.*'
    else src += ANY_DEPTH
  }
  if (end === 'exact') return new RegExp(`^${src}$`)
  return new RegExp(end === 'denyAnyDepth' ? `^${src}(?:${DENY_END}|/.*)$` : `^${src}${DENY_END}$`, 'i')
}

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

/** A glob as a GlobAutomaton: the same matches as globAsRegExp's, in time linear in the path whatever the glob. */
export function globAsAutomaton(glob: string, deny: boolean): PathMatcher {
  return new GlobAutomaton(parseGlob(glob, deny), deny)
}

/**
 * Wildcards (`*`, `**`, `?`) a path glob may hold. A path is judged in linear time, but past the
 * states a GlobAutomaton keeps each wildcard adds a pass over it: on a 16 KB path 64 `?*` pairs
 * took 29 ms a reading and 200 `*a` 89 ms, where 32 stay under a millisecond.
 */
export const MAX_GLOB_WILDCARDS = 32

/** The wildcards of a glob as parseGlob reads them (`**` is one). */
export function globWildcards(glob: string): number {
  return glob.match(/\*\*|\*|\?/g)?.length ?? 0
}

/**
 * Compiles a glob: `*` one segment's worth, `?` one character (encoded or not), `**` any depth,
 * none included where it is a whole segment (parseGlob): `/x/**` also matches `/x`, and a `**`
 * segment between two others may stand for none. Readings are URL-encoded (the parser writes `é` as `%C3%A9`, a space as `%20`),
 * so a glob written as a person writes it (`/café/**`, `/my docs/**`) or half-encoded
 * (`/%73ecret`) is brought to that form, as each of its characters may be spelled in a reading.
 * A deny glob ignores case (letters beyond ASCII too), a trailing slash (Express, Rails, Spring
 * before 6 and ASP.NET Core route `/admin/` to `/admin`'s handler, and `/admin` to `/admin/`'s)
 * and a format suffix (DENY_END).
 *
 * Paths are the agent's to choose (16 KB of them), so matching must take time linear in the path
 * whatever the glob: a backtracking regex for `/files/*.*.*` spent 20 s of the event loop on
 * `/files/a.a.a.…/`, trying every way to share the dots among the stars. A glob made of
 * characters with one spelling each, `*` only where a `/` follows it (a whole segment, or its
 * end), and perhaps a `/**` ending (most globs are) is a RegExp, the quickest test: a `[^/]*`
 * followed by `/` can only end where its segment does, so it has one way to match, which
 * backtracking finds at the cost of that segment at most, and an ending is tried once. Any other
 * glob is a GlobAutomaton, which follows every way of matching at once.
 */
export function compileGlob(glob: string, deny: boolean): PathMatcher {
  const parsed = parseGlob(glob, deny)
  const { parts } = parsed
  const slash = (p: GlobPart | undefined) => p?.kind === 'literal' && p.spellings.length === 1 && p.spellings[0] === '/'
  // (A deny's `/**` ending is its DENY_END: one left before it, as in `/a/**/**`, would be a second.)
  const ending = (i: number) => i === parts.length - 1 && parsed.end === 'exact'
  const plain = parts.every((p, i) => (p.kind === 'literal' && p.spellings.length === 1) || (p.kind === 'segment' && slash(parts[i + 1])) || (p.kind === 'anyDepth' && ending(i)))
  return plain ? regExpOf(parsed) : new GlobAutomaton(parsed, deny)
}

// States of a GlobAutomaton's NFA. Each but SPLIT and MATCH reads one UTF-16 code unit (as a
// RegExp without the u flag does).
const CHAR = 0 // the code unit in `arg` (canonicalised, in a case-blind automaton)
const NOT_SLASH = 1 // [^/]
const NOT_NEWLINE = 2 // `.`: any but \n, \r, U+2028, U+2029
const HEX = 3 // [0-9A-Fa-f]
const HEX_CONTINUATION = 4 // [89ABab], a UTF-8 continuation byte's first digit
const SPLIT = 5 // reads nothing: goes on to `out` and to `out2`
const MATCH = 6

/** Whether an NFA state of kind `k` (CHAR: code unit `a`) reads code unit `u` (canonicalised, in a case-blind automaton). */
function reads(k: number, a: number, u: number): boolean {
  if (k === CHAR) return a === u
  if (k === NOT_SLASH) return u !== 0x2f
  if (k === NOT_NEWLINE) return u !== 0x0a && u !== 0x0d && u !== 0x2028 && u !== 0x2029
  if (k === HEX) return (u >= 0x30 && u <= 0x39) || (u >= 0x41 && u <= 0x46) || (u >= 0x61 && u <= 0x66)
  return k === HEX_CONTINUATION && (u === 0x38 || u === 0x39 || u === 0x41 || u === 0x42 || u === 0x61 || u === 0x62)
}

/** The DFA state no path goes on from to a match. */
const DEAD = 0
/** The DFA state a path starts in. */
const START = 1
/** A transition not yet worked out (below DEAD, so that one test finds both). */
const UNKNOWN = -1
/** ASCII code units, whose transitions a DFA state keeps (at `state << 7 | unit`); others are worked out each time (readings are percent-encoded). */
const TABLE_WIDTH = 128
/**
 * DFA states an automaton keeps (512 bytes of transitions each). A glob's paths meet a few dozen;
 * a path that would meet more is followed on the NFA alone from there, and the next starts afresh.
 */
const MAX_DFA_STATES = 128

/**
 * A glob compiled to a nondeterministic automaton over code units, run as Thompson's construction
 * runs one: the set of states the path so far can be in is carried along, each state at most
 * once, so a path of n code units costs at most n times the automaton's size, however many
 * wildcards the glob has and however the path is built against them. Each set met is kept as a
 * DFA state, with its transitions on ASCII code units as they are worked out, so a path that goes
 * where paths went before (most do, and the readings of one path do) costs one table lookup per
 * code unit, about what a RegExp costs. The states kept are bounded (MAX_DFA_STATES): a path built
 * to meet more than that costs the NFA's time from there, not memory.
 *
 * A case-blind (deny) automaton compares code units as a RegExp with the i flag and without the
 * u flag does, by ECMAScript's Canonicalize (canonical below).
 */
class GlobAutomaton implements PathMatcher {
  private readonly kind: Uint8Array
  private readonly arg: Uint16Array
  private readonly out: Int32Array
  private readonly out2: Int32Array
  private readonly nfaStart: number
  private readonly match: number
  private readonly caseBlind: boolean
  // The DFA states met so far: their NFA states, whether they match, their ids by NFA states,
  // and their transitions (TABLE_WIDTH a state, UNKNOWN until worked out).
  private sets: Int32Array[] = []
  private matching = new Uint8Array(0)
  private readonly ids = new Map<string, number>()
  private transitions = new Int32Array(0)
  // Scratch for working out a transition.
  private readonly seen: Uint32Array
  private readonly found: Int32Array
  private readonly spare: Int32Array
  private readonly stack: Int32Array
  private generation = 0

  constructor({ parts, end }: ParsedGlob, caseBlind: boolean) {
    const kind: number[] = []
    const arg: number[] = []
    const out: number[] = []
    const out2: number[] = []
    const state = (k: number, a: number, o: number, o2 = -1) => {
      kind.push(k)
      arg.push(a)
      out.push(o)
      out2.push(o2)
      return kind.length - 1
    }
    // Built from the end back: each piece is given the state that follows it and answers its first.
    const text = (s: string, then: number) => {
      for (let i = s.length - 1; i >= 0; i--) then = state(CHAR, caseBlind ? canonical(s.charCodeAt(i)) : s.charCodeAt(i), then)
      return then
    }
    const either = (a: number, b: number) => state(SPLIT, 0, a, b)
    const repeated = (k: number, then: number) => {
      const loop = either(-1, then)
      out[loop] = state(k, 0, loop)
      return loop
    }
    const escape = (secondDigit: number, then: number) => text('%', state(secondDigit, 0, state(HEX, 0, then)))
    const match = state(MATCH, 0, -1)
    let then = match
    if (end !== 'exact') {
      // DENY_END, and for a glob that ended in `/**`, `/.*` as well.
      const slash = either(text('/', then), then)
      const denyEnd = either(text('.', repeated(NOT_SLASH, slash)), slash)
      then = end === 'denyAnyDepth' ? either(denyEnd, text('/', repeated(NOT_NEWLINE, then))) : denyEnd
    }
    for (let i = parts.length - 1; i >= 0; i--) {
      const part = parts[i]!
      if (part.kind === 'literal') {
        let first = text(part.spellings[0]!, then)
        for (const s of part.spellings.slice(1)) first = either(text(s, then), first)
        then = first
      } else if (part.kind === 'one') {
        // ONE: %XX and up to three %[89AB]X, or any one code unit but `/`.
        let continuations = then
        for (let k = 0; k < 3; k++) continuations = either(escape(HEX_CONTINUATION, continuations), then)
        then = either(escape(HEX, continuations), state(NOT_SLASH, 0, then))
      } else if (part.kind === 'segment') then = repeated(NOT_SLASH, then)
      else if (part.kind === 'any') then = repeated(NOT_NEWLINE, then)
      else then = either(text('/', repeated(NOT_NEWLINE, then)), then)
    }
    this.kind = Uint8Array.from(kind)
    this.arg = Uint16Array.from(arg)
    this.out = Int32Array.from(out)
    this.out2 = Int32Array.from(out2)
    this.nfaStart = then
    this.match = match
    this.caseBlind = caseBlind
    this.seen = new Uint32Array(kind.length)
    this.found = new Int32Array(kind.length)
    this.spare = new Int32Array(kind.length)
    this.stack = new Int32Array(2 * kind.length + 1)
    this.startAgain()
  }

  test(path: string): boolean {
    if (this.sets.length === MAX_DFA_STATES) this.startAgain()
    let transitions = this.transitions
    let d = START
    for (let i = 0, n = path.length; i < n; i++) {
      const u = path.charCodeAt(i)
      let e = u < TABLE_WIDTH ? transitions[(d << 7) | u]! : UNKNOWN
      if (e <= DEAD) {
        if (e === DEAD) return false
        e = this.transition(d, u)
        if (e === UNKNOWN) return this.simulate(this.sets[d]!, path, i)
        if (e === DEAD) return false
        transitions = this.transitions
      }
      d = e
    }
    return this.matching[d] === 1
  }

  /** Puts in `found` the NFA states code unit `u` leads to from those of `set`; answers how many. */
  private step(set: Int32Array, u: number): number {
    const c = this.caseBlind ? canonical(u) : u
    const { kind, arg, out, found } = this
    const generation = this.nextGeneration()
    let count = 0
    for (let j = 0; j < set.length; j++) {
      const s = set[j]!
      if (reads(kind[s]!, arg[s]!, c)) count = this.enter(found, count, out[s]!, generation)
    }
    return count
  }

  /** Works out where DFA state `d` goes on code unit `u`, keeping it; UNKNOWN if that is a new state and there is no room for it. */
  private transition(d: number, u: number): number {
    const count = this.step(this.sets[d]!, u)
    const set = this.found.slice(0, count).sort()
    let e = this.ids.get(set.join())
    if (e === undefined) {
      if (this.sets.length === MAX_DFA_STATES) return UNKNOWN
      e = this.add(set)
    }
    if (u < TABLE_WIDTH) this.transitions[(d << 7) | u] = e
    return e
  }

  /** Whether `path` from `i` on takes the NFA from `set` to a match: the DFA without keeping its states, for a path that meets more of them than are kept. */
  private simulate(set: Int32Array, path: string, i: number): boolean {
    const { kind, arg, out, caseBlind } = this
    let current = this.found
    let next = this.spare
    current.set(set)
    let count = set.length
    for (; i < path.length; i++) {
      const u = caseBlind ? canonical(path.charCodeAt(i)) : path.charCodeAt(i)
      const generation = this.nextGeneration()
      let nextCount = 0
      for (let j = 0; j < count; j++) {
        const s = current[j]!
        if (reads(kind[s]!, arg[s]!, u)) nextCount = this.enter(next, nextCount, out[s]!, generation)
      }
      if (nextCount === 0) return false
      ;[current, next] = [next, current]
      count = nextCount
    }
    for (let j = 0; j < count; j++) if (current[j] === this.match) return true
    return false
  }

  /** Forgets every DFA state but DEAD and START. */
  private startAgain(): void {
    this.sets = []
    this.ids.clear()
    this.matching = new Uint8Array(8)
    this.transitions = new Int32Array(8 * TABLE_WIDTH).fill(UNKNOWN)
    this.add(new Int32Array(0))
    const count = this.enter(this.found, 0, this.nfaStart, this.nextGeneration())
    this.add(this.found.slice(0, count).sort())
  }

  private add(set: Int32Array): number {
    const id = this.sets.length
    this.sets.push(set)
    this.ids.set(set.join(), id)
    if (id === this.matching.length) {
      const matching = new Uint8Array(2 * id)
      matching.set(this.matching)
      this.matching = matching
      const transitions = new Int32Array(2 * id * TABLE_WIDTH).fill(UNKNOWN)
      transitions.set(this.transitions)
      this.transitions = transitions
    }
    this.matching[id] = set.includes(this.match) ? 1 : 0
    return id
  }

  /** Adds to `list` (from `count` on) the NFA states that read, or match, reachable from `s` without reading; answers the new count. */
  private enter(list: Int32Array, count: number, s: number, generation: number): number {
    const { kind, out, out2, seen, stack } = this
    let top = 0
    stack[top++] = s
    while (top > 0) {
      const t = stack[--top]!
      if (seen[t] === generation) continue
      seen[t] = generation
      if (kind[t] === SPLIT) {
        stack[top++] = out2[t]!
        stack[top++] = out[t]!
      } else list[count++] = t
    }
    return count
  }

  private nextGeneration(): number {
    if (this.generation === 0xffff_ffff) {
      this.seen.fill(0)
      this.generation = 0
    }
    return ++this.generation
  }
}

/** Code units' Canonicalize (ECMAScript, a case-blind RegExp without the u flag), as far as computed. */
const CANONICAL = new Uint16Array(0x10000)

/**
 * A code unit as a case-blind RegExp without the u flag compares it (ECMAScript's Canonicalize):
 * its upper case where that is a single code unit, and not ASCII unless the code unit is.
 */
function canonical(u: number): number {
  if (u < 0x80) return u >= 0x61 && u <= 0x7a ? u - 0x20 : u
  let c = CANONICAL[u]!
  if (c === 0) {
    const upper = String.fromCharCode(u).toUpperCase()
    c = upper.length === 1 && upper.charCodeAt(0) >= 0x80 ? upper.charCodeAt(0) : u
    CANONICAL[u] = c
  }
  return c
}
