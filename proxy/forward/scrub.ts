// Response-side credential hygiene. An upstream that reflects the request into its response head
// (a redirect carrying the query key, a debug header, WWW-Authenticate, Set-Cookie, even the
// reason phrase or a header's name) would hand the agent the credential it must never hold.
// Every part of the head an upstream chooses goes through here, on every path that relays one
// (forward and WebSocket upgrade). Bodies are checked as they stream by body-scrub.ts.
import type { IncomingHttpHeaders } from 'node:http'
import { unescape } from 'node:querystring'
import type { Credential, CredentialBinding } from '../context.js'
import { NONE_HELD } from '../credentials/held.js'
import { compileNeedles, holdsCopy, type BodyNeedles } from './body-scrub.js'
import { FOLLOWED_URLS } from './route-location.js'

export const REMOVED = '[removed by latchkey: it contained the injected credential]'
/** Said in place of a remote server's text that reveals a credential the sidecar sent it (revealsSecret). */
export const WITHHELD = 'its error text quoted a credential the sidecar sent and is not repeated'

/**
 * Whether `text` reveals the credential: the secret itself or one of its encoded forms (Basic's
 * base64 of `user:secret`, base64 or hex of the secret), as is or after undoing, up to three
 * times over, the escapes an upstream applies when it echoes text: percent-encoding (either hex
 * case, `+` or `%20` for a space), JSON/JavaScript string escapes (`\/`, `\u002f`) and HTML
 * character references (`&#x2F;`, `&amp;`). Letter case is not folded.
 */
export function revealsCredential(text: string, binding: CredentialBinding, credential: Credential, held: readonly Credential[] = NONE_HELD): boolean {
  for (const n of needleSet(binding, credential, held)) if (reveals(text, n, false)) return true
  return false
}

/** What is looked for, worked out once per (binding, credential): a token serves many calls. */
interface Needles {
  secret: string
  /** The secret with every space read as `+` (see reveals). */
  wanted: string
  /**
   * The same after 1, 2 and 3 rounds of unescaping: a secret that itself holds an escape (`%25`)
   * changes under the rounds that undo an echo's escapes, and must be compared as changed.
   */
  wantedAfter: readonly string[]
  lowerWantedAfter: readonly string[]
  /** Lower-cased, for header names, which arrive lower-cased. */
  lowerSecret: string
  lowerWanted: string
  forms: readonly string[]
  lowerForms: readonly string[]
  /** No needle, nor a copy long enough to matter, is shorter, and unescaping only shortens text: anything shorter cannot reveal it. */
  shortest: number
  /** Whether the secret holds a space or `+`, which form-encoding swaps. */
  plusy: boolean
  /** The body scrubber's needles for the same texts: a copy cut short or begun late (holdsCopy). */
  copies: BodyNeedles
  /** The same, lower-cased, for header names: made when a name long enough to hold a copy comes. */
  lowerCopies: BodyNeedles | null
  /** These needles as a set of one (needleSet), made once. */
  alone: readonly Needles[]
}

const needlesByBinding = new WeakMap<CredentialBinding, WeakMap<Credential, Needles>>()

function needlesFor(binding: CredentialBinding, credential: Credential): Needles {
  let byCredential = needlesByBinding.get(binding)
  if (!byCredential) needlesByBinding.set(binding, (byCredential = new WeakMap()))
  let n = byCredential.get(credential)
  if (!n) byCredential.set(credential, (n = needles(credential.value, binding.encodedForms(credential))))
  return n
}

/** The needles of a held set (CredentialSource.held), worked out when the set changes, not per call. */
interface NeedleSet {
  members: ReadonlySet<Credential>
  set: readonly Needles[]
  /** The set with a call's own credential first, for one the set lacks (it expired meanwhile). */
  withOwn: WeakMap<Credential, readonly Needles[]>
}

const setsByBinding = new WeakMap<CredentialBinding, WeakMap<readonly Credential[], NeedleSet>>()

/**
 * What a credentialed call's response head is checked for: its own credential and every other
 * the source holds for the binding (`held`: another task's token, one a refresh superseded).
 * Cached by the held array, which a source keeps while its set is unchanged: a call allocates
 * nothing, and a change costs a lookup per value (needlesFor caches each one's needles).
 */
function needleSet(binding: CredentialBinding, credential: Credential, held: readonly Credential[]): readonly Needles[] {
  // The call's own credential alone (a static secret): its needles, as before sets were looked for.
  if (held.length === 0 || (held.length === 1 && held[0] === credential)) return needlesFor(binding, credential).alone
  let byHeld = setsByBinding.get(binding)
  if (!byHeld) setsByBinding.set(binding, (byHeld = new WeakMap()))
  let s = byHeld.get(held)
  if (!s) byHeld.set(held, (s = { members: new Set(held), set: withShortest(held.map((c) => needlesFor(binding, c))), withOwn: new WeakMap() }))
  if (s.members.has(credential)) return s.set
  let own = s.withOwn.get(credential)
  if (!own) s.withOwn.set(credential, (own = withShortest([needlesFor(binding, credential), ...s.set])))
  return own
}

/** A set's shortest needle: a header value shorter (most are) is passed over without a test per credential. */
const shortestOf = new WeakMap<readonly Needles[], number>()
function withShortest(set: readonly Needles[]): readonly Needles[] {
  let shortest = Infinity
  for (const n of set) if (n.shortest < shortest) shortest = n.shortest
  shortestOf.set(set, shortest)
  return set
}

function needles(secret: string, forms: readonly string[]): Needles {
  const copies = compileNeedles([secret, ...forms])
  const n: Needles = {
    secret,
    wanted: spaceAsPlus(secret),
    wantedAfter: unescapedRounds(secret),
    lowerWantedAfter: unescapedRounds(secret).map((w) => w.toLowerCase()),
    lowerSecret: secret.toLowerCase(),
    lowerWanted: spaceAsPlus(secret.toLowerCase()),
    forms,
    lowerForms: forms.map((f) => f.toLowerCase()),
    shortest: Math.min(secret.length, ...forms.map((f) => f.length), copies.fewest),
    plusy: secret.includes(' ') || secret.includes('+'),
    copies,
    lowerCopies: null,
    alone: [],
  }
  n.alone = [n]
  return n
}

/** A secret the sidecar sent, and the texts it was sent inside (Basic's `id:secret`, that header's base64), if any. */
export type SentSecret = string | { value: string; within?: readonly string[] }

/**
 * Whether `text` reveals any of `secrets`, in every spelling revealsCredential catches: the
 * secret, its base64 (standard or URL-safe, of any text that holds it) and hex, and the same
 * re-encodings of each text it was sent `within`, as is or after undoing up to three rounds of
 * percent-encoding (`+` for a space), JSON string escapes and HTML character references. For text
 * a remote server chose after it was sent them (an authorization server's or the broker's
 * refusal): quoting it would hand the agent, the audit and the log what was sent. The needles are
 * worked out on each call, which is fine on a refusal and too slow per request (revealsCredential
 * caches them). An empty secret reveals nothing.
 */
export function revealsSecret(text: string, secrets: readonly SentSecret[]): boolean {
  for (const s of secrets) {
    const { value, within = [] } = typeof s === 'string' ? { value: s } : s
    if (value.length === 0) continue
    const forms = [...new Set([...reencodings(value), ...within.flatMap((w) => reencodings(w))])].filter((f) => f.length > 0)
    if (reveals(text, needles(value, forms), false)) return true
  }
  return false
}

/**
 * Whether a remote server's text reveals any of `secrets` as the sidecar would quote it (`shown`:
 * cut, or a part of it) or as it came (`whole`, each one that is a string): a secret across the
 * cut would be quoted in part, and so found in neither part on its own.
 */
export function quotesSent(secrets: readonly SentSecret[], shown: string, ...whole: unknown[]): boolean {
  return revealsSecret(shown, secrets) || whole.some((w) => typeof w === 'string' && revealsSecret(w, secrets))
}

/**
 * The secret as an upstream might re-encode it to echo it back: hex in either case (Java's
 * printHexBinary, .NET's Convert.ToHexString and Go's %X write upper case), for a secret beyond
 * ASCII its UTF-8 bytes as a response header carries them (header values reach the sidecar one
 * byte per character), and base64, standard or URL-safe, of any text that holds it: the header
 * the injector wrote (`Bearer <secret>`), a session cookie's JSON, `user:secret`.
 */
export function reencodings(text: string): string[] {
  const bytes = Buffer.from(text)
  const hex = bytes.toString('hex')
  return [...new Set([...base64Cores(bytes), hex, hex.toUpperCase(), bytes.toString('latin1')])].filter((f) => f !== text)
}

/**
 * Base64 turns every 3 bytes into 4 characters, so the secret inside longer text is spelled one
 * of three ways, by where it falls in a group of three. For each, the characters that depend on
 * the secret's bytes alone (its whole groups) are what any such encoding contains. Shorter than
 * 12 characters, a core could turn up in unrelated text: the secret's own encoding is used then.
 */
function base64Cores(bytes: Buffer): string[] {
  const cores: string[] = []
  for (let offset = 0; offset < 3; offset++) {
    const b64 = Buffer.concat([Buffer.alloc(offset), bytes]).toString('base64')
    const core = b64.slice(offset === 0 ? 0 : 4, 4 * Math.floor((offset + bytes.length) / 3))
    if (core.length >= 12) cores.push(core, core.replace(/\+/g, '-').replace(/\//g, '_'))
  }
  if (cores.length === 0) {
    const b64 = bytes.toString('base64')
    cores.push(b64, b64.replace(/=+$/, ''), bytes.toString('base64url'))
  }
  return cores
}

/**
 * `lowerCased`: `text` is a header name, which node:http and the upgrade parser lower-case, so it
 * is compared with lower-cased needles, and folded again after each decoding round (`%43` → `C`).
 */
function reveals(text: string, n: Needles, lowerCased: boolean): boolean {
  if (text.length < n.shortest) return false
  const secret = lowerCased ? n.lowerSecret : n.secret
  const forms = lowerCased ? n.lowerForms : n.forms
  if (contains(text, secret, forms)) return true
  // A copy cut short or begun late, as is or escaped once as an echo does (the body's needles);
  // in a header name, lower-cased (a lower-cased copy of a mixed-case secret gives most of it away).
  if (holdsCopy(text, lowerCased ? (n.lowerCopies ??= compileNeedles([n.lowerSecret, ...n.lowerForms])) : n.copies)) return true
  if (!ESCAPED.test(text) && !n.plusy) return false
  // Compared with every space read as `+`: a form encoder writes a space as `+` and a `+` as
  // %2B, so after decoding only this reading makes both sides agree.
  const wanted = lowerCased ? n.lowerWanted : n.wanted
  const wantedAfter = lowerCased ? n.lowerWantedAfter : n.wantedAfter
  let candidate = text
  for (let round = 0; ; round++) {
    const spaced = spaceAsPlus(candidate)
    if (contains(spaced, wanted, forms)) return true
    if (round > 0 && wantedAfter[round - 1] !== wanted && spaced.includes(wantedAfter[round - 1]!)) return true
    if (round === 3 || !ESCAPED.test(candidate)) return false
    let next = unescapeOnce(candidate)
    if (lowerCased) next = next.toLowerCase()
    if (next === candidate) return false
    candidate = next
  }
}

/** Any escape an echo might have applied: percent, `+`, backslash, character reference. */
const ESCAPED = /[%+\\&]/

function unescapeOnce(text: string): string {
  let t = text
  // unescape (node:querystring) leaves malformed escapes as they are instead of throwing.
  if (t.includes('%')) t = unescape(t)
  if (t.includes('\\')) t = t.replace(/\\u([0-9a-fA-F]{4})|\\(["\\/bfnrt])/g, (_m, hex: string | undefined, c: string | undefined) => (hex ? String.fromCharCode(parseInt(hex, 16)) : (JSON_ESCAPES[c!] ?? c!)))
  if (t.includes('&')) {
    t = t.replace(/&#[xX]([0-9a-fA-F]{1,6});|&#([0-9]{1,7});|&(amp|lt|gt|quot|apos);/g, (m, hex: string | undefined, dec: string | undefined, name: string | undefined) => {
      const code = hex ? parseInt(hex, 16) : dec ? Number(dec) : -1
      if (code >= 0) return code <= 0x10ffff ? String.fromCodePoint(code) : m
      return HTML_ENTITIES[name!] ?? m
    })
  }
  return t
}

const JSON_ESCAPES: Record<string, string> = { b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' }
const HTML_ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" }

function unescapedRounds(secret: string): string[] {
  const rounds: string[] = []
  let s = secret
  for (let i = 0; i < 3; i++) rounds.push(spaceAsPlus((s = unescapeOnce(s))))
  return rounds
}

function spaceAsPlus(s: string): string {
  return s.includes(' ') ? s.replace(/ /g, '+') : s
}

function contains(text: string, secret: string, forms: readonly string[]): boolean {
  if (text.includes(secret)) return true
  for (const form of forms) if (text.includes(form)) return true
  return false
}

/**
 * Removes from a response head what reveals the credential, or any other the source holds for
 * the binding (`held`, see needleSet): a header whose name does is dropped, a value that does is
 * replaced (one entry of a list, e.g. one Set-Cookie, not its neighbours).
 */
export function scrubResponseHeaders(headers: IncomingHttpHeaders, binding: CredentialBinding, credential: Credential, held: readonly Credential[] = NONE_HELD): void {
  const set = needleSet(binding, credential, held)
  for (const name in headers) {
    if (anyReveals(reveals, name, set, true)) {
      delete headers[name]
      continue
    }
    const v = headers[name]
    if (v === undefined) continue
    const url = URL_VALUED.has(name)
    if (typeof v === 'string') headers[name] = cleanValue(v, url, set)
    else if (v.some((x) => anyReveals(url ? revealsAsUrl : reveals, x, set, false))) headers[name] = v.map((x) => cleanValue(x, url, set))
  }
}

/**
 * A header value as relayed. A URL is masked where the credential is in it, as a body is, so a
 * client can still follow it (a query injector puts the credential back over the mask); anything
 * else, or a URL the mask does not make safe by every check, is replaced whole. A function of its
 * own, not a closure made per header: every response's headers pass here.
 */
function cleanValue(value: string, url: boolean, set: readonly Needles[]): string {
  if (!anyReveals(url ? revealsAsUrl : reveals, value, set, false)) return value
  return url ? (maskedUrl(value, set) ?? REMOVED) : REMOVED
}

function anyReveals(test: (text: string, n: Needles, lowerCased: boolean) => boolean, text: string, set: readonly Needles[], lowerCased: boolean): boolean {
  if (set.length > 1 && text.length < (shortestOf.get(set) ?? 0)) return false
  for (const n of set) if (test(text, n, lowerCased)) return true
  return false
}

/**
 * `value` with each credential of `set` masked in place where it is itself, plain or
 * percent-encoded (a query credential echoed back), or null when anything of one is left: a
 * masked base64 form, say, leaves its edge groups, which decode to the secret's first and last
 * characters.
 */
function maskedUrl(value: string, set: readonly Needles[]): string | null {
  let masked = value
  for (const n of set) {
    if (!revealsAsUrl(masked, n, false)) continue
    for (const form of new Set([n.secret, encodeURIComponent(n.secret)])) masked = masked.split(form).join('*'.repeat(form.length))
  }
  return masked === value || anyReveals(revealsAsUrl, masked, set, false) ? null : masked
}

/** Headers clients read as URLs and follow (a redirect, a pagination Link's rel=next), or report as the response's URL. */
const URL_VALUED = new Set<string>(['location', 'link', ...FOLLOWED_URLS])

/**
 * A URL's value as clients read it too: WHATWG parsers (fetch) and Python's urlsplit drop every
 * tab, CR and LF, so `?key=LKCA<tab>NARY` hid the secret from the scrub and was followed as it.
 */
function revealsAsUrl(text: string, n: Needles, lowerCased: boolean): boolean {
  return reveals(text, n, lowerCased) || (/[\t\n\r]/.test(text) && reveals(text.replace(/[\t\n\r]/g, ''), n, lowerCased))
}

/** The upstream's reason phrase, unless it reveals the credential or another held for the binding (then the standard one is used). */
export function safeReasonPhrase(reason: string | undefined, binding: CredentialBinding, credential: Credential, held: readonly Credential[] = NONE_HELD): string | undefined {
  return reason && revealsCredential(reason, binding, credential, held) ? undefined : reason
}
