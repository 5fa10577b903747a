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

/** What `/**` ending a glob compiles to: the path itself, or anything under it. */
const ANY_DEPTH = '(?:/.*)?'

/**
 * Compiles a glob: `*` one segment's worth, `?` one character (encoded or not), `**` any depth; `/x/**` also
 * matches `/x`. Readings are URL-encoded (the parser writes `é` as `%C3%A9`, a space as `%20`),
 * so a glob written as a person writes it (`/café/**`, `/my docs/**`) or half-encoded
 * (`/%73ecret`) is brought to that form, as each of its characters may be spelled in a reading.
 * A deny glob ignores case (letters beyond ASCII too), a trailing slash (Express, Rails, Spring
 * before 6 and ASP.NET Core route `/admin/` to `/admin`'s handler, and `/admin` to `/admin/`'s)
 * and a format suffix (below).
 */
export function compileGlob(glob: string, deny: boolean): RegExp {
  let src = ''
  const chars = [...glob]
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i]!
    if (c === '*' && chars[i + 1] === '*') {
      const atEndAfterSlash = chars[i - 1] === '/' && i + 2 === chars.length
      if (atEndAfterSlash) {
        src = src.slice(0, -1) + ANY_DEPTH
      } else {
        src += '.*'
      }
      i++
    } else if (c === '*') src += '[^/]*'
    // One character as readings spell it: itself, an escape, or a UTF-8 sequence of escapes (é is %C3%A9).
    else if (c === '?') src += '(?:%[0-9A-Fa-f]{2}(?:%[89ABab][0-9A-Fa-f]){0,3}|[^/])'
    else if (c === '%' && /^[0-9A-Fa-f]{2}$/.test(chars.slice(i + 1, i + 3).join(''))) {
      // An escape, as readings have it: an unreserved character decoded, any other upper-cased.
      const hex = chars.slice(i + 1, i + 3).join('')
      const ch = String.fromCharCode(parseInt(hex, 16))
      src += UNRESERVED.test(ch) ? escapeRegex(ch) : `%${hex.toUpperCase()}`
      i += 2
    } else src += literal(c, deny)
  }
  if (!deny) return new RegExp(`^${src}$`)
  if (src.length > 1 && src.endsWith('/')) src = src.slice(0, -1)
  // A format suffix ends the path too: Rails routes `/admin.json` to `/admin`'s action (every
  // route takes `(.:format)`), as Spring's suffix patterns did. Not before a deeper path: `/v1/**`
  // is not `/v1.2/x`.
  const end = '(?:\\.[^/]*)?/?'
  return new RegExp(src.endsWith(ANY_DEPTH) ? `^${src.slice(0, -ANY_DEPTH.length)}(?:${end}|/.*)$` : `^${src}${end}$`, 'i')
}

/** Characters the URL parser percent-encodes in a path (and `#`, which it would take for a fragment). */
const ENCODED_IN_PATH = /[^\x21-\x7e]|["#<>`{}]/

/** One character of a glob: itself, or, where the parser encodes it, its encoding or (in a decoded reading) itself. */
function literal(c: string, anyCase: boolean): string {
  if (!ENCODED_IN_PATH.test(c)) return escapeRegex(c)
  const spellings = new Set<string>()
  for (const v of anyCase ? [c, c.toLowerCase(), c.toUpperCase()] : [c]) {
    spellings.add(escapeRegex(v))
    try {
      spellings.add(encodeURIComponent(v))
    } catch {
      // A lone surrogate has no UTF-8 form: only its own spelling can match.
    }
  }
  return `(?:${[...spellings].join('|')})`
}

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}
