// Credential bindings: which credential goes to which exact origin, and how it is written into
// the request. Compiled once; looked up per request by the exact `scheme://host:port` key, so a
// look-alike host, another port or the other scheme never matches.
import type { Config, CredentialBindingConfig, InjectConfig } from '../../lib/config/schema.js'
import type { Credential, CredentialBinding, Target } from '../context.js'
import { normaliseHost } from '../policy/policy.js'
import { originKey } from '../listen/target.js'
// Header values are formatted once per credential (one cache per injector: two bindings may write
// the same credential differently), not once per request.
import { perCredential } from './per-credential.js'
import { reencodings } from '../forward/scrub.js'

type Headers = Record<string, string | string[] | undefined>

/** Agent-sent credentials replaced on every injected audience, whatever the injector writes. */
const ALWAYS_STRIP = ['authorization', 'cookie', 'x-api-key', 'api-key', 'x-auth-token', 'proxy-authorization']

/**
 * Query parameters that carry a credential wherever they appear, removed on every injected
 * audience as the headers above are: RFC 6750's `access_token` (a bearer token in the URI, which
 * some servers prefer to the Authorization header), GitLab's `private_token`, Azure API
 * Management's `subscription-key`, and the usual API-key names. `key` and `token` alone are
 * left: many APIs name other things so (`pageToken`, an object's key).
 */
const ALWAYS_STRIP_QUERY = ['access_token', 'api_key', 'apikey', 'api-key', 'private_token', 'client_secret', 'subscription-key']

/**
 * A JWS compact token (RFC 7515 §7.1: three base64url segments): its signature. The header and
 * payload are base64url of JSON anyone may read, and an upstream that echoes them decoded, beside
 * the signature segment, hands the agent the token in three pieces: the signature, short beside
 * the whole token, showed too little of it to be overwritten as a copy (body-scrub.ts leastShown).
 * It is the one secret part, so it is a needle of its own, as sent (and so in each spelling an
 * echo gives it: body-scrub.ts echoSpellings). Shorter than 16 characters it is no signature worth
 * the name, and would match unrelated text.
 */
const JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.([A-Za-z0-9_-]{16,})$/

function jwsSignature(value: string): string[] {
  const signature = JWS.exec(value)?.[1]
  return signature === undefined ? [] : [signature]
}

const secretReencodings = perCredential((c) => [...reencodings(c.value), ...jwsSignature(c.value)])

/**
 * A query credential's forms: the secret's, and those of the secret as sent, percent-encoded. An
 * upstream that encodes the URL it received again (a login link's `next=`, an OAuth `state`, a
 * base64'd debug header) starts from the sent form, whose base64 and hex hold no trace of the
 * secret's. A header is also read by decoding it (forward/scrub.ts); a body only by its needles.
 */
const wireReencodings = perCredential((c) => {
  const wire = encodeURIComponent(c.value)
  if (wire === c.value) return secretReencodings(c)
  const lowerHex = wire.replace(/%[0-9A-F]{2}/g, (e) => e.toLowerCase())
  return [...new Set([...secretReencodings(c), wire, lowerHex, ...reencodings(wire)])]
})

/**
 * What a header value carries, as the sidecar holds it: printable ASCII, no space at either end.
 * undici refuses a line break, a NUL or text beyond Latin-1 (every call fails); servers trim the
 * spaces and read the other bytes each their own way.
 */
export const HEADER_SENDABLE = /^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$/

function headerCannotCarry(value: string): string | null {
  return HEADER_SENDABLE.test(value) ? null : 'holds characters a header cannot carry (outside printable ASCII) or starts or ends with a space'
}

/** A lone UTF-16 surrogate (JSON's `"\ud800"`): encodeURIComponent throws on one, Buffer.from writes U+FFFD for it. */
const LONE_SURROGATE = /[\ud800-\udfff]/u

function textCannotCarry(value: string): string | null {
  return LONE_SURROGATE.test(value) ? 'is not well-formed text (it holds a lone UTF-16 surrogate)' : null
}

function injector(cfg: InjectConfig): {
  headers: string[]
  query: string[]
  inject: (h: Headers, t: Target, c: Credential) => void
  encodedForms: (c: Credential) => readonly string[]
  cannotCarry: (value: string) => string | null
} {
  switch (cfg.type) {
    case 'bearer': {
      const value = perCredential((c) => `Bearer ${c.value}`)
      return { headers: ['authorization'], query: [], inject: (h, _t, c) => void (h.authorization = value(c)), encodedForms: secretReencodings, cannotCarry: headerCannotCarry }
    }
    case 'basic': {
      const user = cfg.username
      const encoded = perCredential((c) => Buffer.from(`${user}:${c.value}`).toString('base64'))
      const value = perCredential((c) => `Basic ${encoded(c)}`)
      // Lower-cased too: a header's name arrives lower-cased. The header's own base64 re-encoded
      // (an echo of the whole header, base64'd) holds no plain trace of the secret: looked for too.
      const forms = perCredential((c) => [...new Set([...reencodings(`${user}:${c.value}`), encoded(c), encoded(c).toLowerCase(), ...reencodings(encoded(c)), ...secretReencodings(c)])])
      return { headers: ['authorization'], query: [], inject: (h, _t, c) => void (h.authorization = value(c)), encodedForms: forms, cannotCarry: textCannotCarry }
    }
    case 'header': {
      const name = cfg.name.toLowerCase()
      const [before, after] = (cfg.format ?? '{token}').split('{token}') as [string, string]
      const value = perCredential((c) => before + c.value + after)
      return { headers: [name], query: [], inject: (h, _t, c) => void (h[name] = value(c)), encodedForms: secretReencodings, cannotCarry: headerCannotCarry }
    }
    case 'query': {
      const param = cfg.name
      const pair = perCredential((c) => encodeURIComponent(param) + '=' + encodeURIComponent(c.value))
      return {
        headers: [],
        query: [param],
        inject: (_h, t, c) => {
          const sep = t.search.length > 1 ? '&' : '?'
          t.search = (t.search.length > 1 ? t.search : '') + sep + pair(c)
        },
        encodedForms: wireReencodings,
        cannotCarry: textCannotCarry,
      }
    }
  }
}

/** The origin a credential is bound to, as requests' origins are compared with it: `API.Example.:443` is `https://api.example:443`. */
export function audienceOf(audience: URL): string {
  const scheme = audience.protocol === 'https:' ? 'https' : 'http'
  const port = audience.port ? Number(audience.port) : scheme === 'https' ? 443 : 80
  return originKey(scheme, normaliseHost(audience.hostname), port)
}

export function compileBinding(cfg: CredentialBindingConfig): CredentialBinding {
  const inj = injector(cfg.inject)
  // Each name with `_` read as `-` too: an agent's `X-Svc-Token` is the injected `X_Svc_Token` to
  // a server that folds them together (CGI, WSGI), and could be read instead of it.
  const strip = [...new Set([...ALWAYS_STRIP, ...inj.headers, ...(cfg.strip ?? []).map((s) => s.toLowerCase())].flatMap((n) => [n, n.replace(/_/g, '-')]))]
  return {
    id: cfg.id,
    audience: audienceOf(new URL(cfg.audience)),
    source: cfg.source,
    tokenAudience: cfg.token_audience ?? cfg.audience,
    scopes: cfg.scopes ?? [],
    secret: cfg.secret ?? '',
    strip,
    stripQuery: inj.query,
    inject: inj.inject,
    encodedForms: inj.encodedForms,
    cannotCarry: inj.cannotCarry,
  }
}

export class CredentialBindings {
  private readonly byAudience = new Map<string, CredentialBinding>()

  constructor(configs: Config['credentials']) {
    for (const cfg of configs) {
      const b = compileBinding(cfg)
      this.byAudience.set(b.audience, b)
    }
  }

  /** The binding for exactly this origin, or null. */
  match(t: Target): CredentialBinding | null {
    if (this.byAudience.size === 0) return null
    return this.byAudience.get(originKey(t.scheme, t.host, t.port)) ?? null
  }

  all(): CredentialBinding[] {
    return [...this.byAudience.values()]
  }
}

/**
 * The query as it goes to a credentialed origin: without the agent's own credential parameters
 * (ALWAYS_STRIP_QUERY; a name no decoder reads as UTF-8 stays, as it could be anything), and
 * without the one the binding's injector writes (there an undecodable name goes too: it may be
 * that name in disguise to a decoder we do not know).
 */
export function credentialedQuery(search: string, binding: CredentialBinding): string {
  if (search.length < 2) return search
  return stripQueryParams(stripQueryParams(search, ALWAYS_STRIP_QUERY, 'keep'), binding.stripQuery)
}

/**
 * Removes the named query parameters from a search string, in every spelling an upstream might
 * read as the same name: any percent-encoding or case, `+` for space, a PHP-style `name[...]`,
 * a name cut short by a NUL, or hidden after `;` (a separator to some frameworks), or as PHP
 * reads names (leading spaces skipped, then spaces and dots as `_`: `.method` is `_method`). Of a
 * pair holding `;`, each part that names it goes and the others stay (to a framework that does
 * not split there they are one value, now without the name in it); a part or pair whose name
 * cannot be decoded goes too, unless `undecodable` is 'keep': fail closed.
 */
export function stripQueryParams(search: string, names: readonly string[], undecodable: 'drop' | 'keep' = 'drop'): string {
  if (names.length === 0 || search.length < 2) return search
  const lower = names.map((n) => n.toLowerCase())
  const dropUndecodable = undecodable === 'drop'
  const kept: string[] = []
  for (const pair of search.slice(1).split('&')) {
    if (!pair.includes(';')) {
      if (!namesParameter(pair, lower, dropUndecodable)) kept.push(pair)
      continue
    }
    // Only the `;`-separated parts that name it go: `a=1;key=x` keeps the agent's `a=1`.
    const parts = pair.split(';').filter((part) => !namesParameter(part, lower, dropUndecodable))
    if (parts.length > 0) kept.push(parts.join(';'))
  }
  return kept.length ? '?' + kept.join('&') : ''
}

/** Whether the `name=value` pair `part` names one of `lowerNames`, in any spelling stripQueryParams knows. */
export function namesParameter(part: string, lowerNames: readonly string[], dropUndecodable: boolean): boolean {
  const rawName = part.split('=', 1)[0] ?? ''
  // `_method%00%ff` is `_method` to PHP (cut at the NUL), though not valid percent-encoded UTF-8.
  const name = decodeBytewise(rawName).toLowerCase()
  const cut = name.search(/[[\0]/)
  const base = cut === -1 ? name : name.slice(0, cut)
  if (lowerNames.includes(base) || lowerNames.includes(base.replace(/^ +/, '').replace(/[ .]/g, '_'))) return true
  // qs (Express) and Rack read a name in brackets as the name inside: `[_method]`, `]_method`.
  const bracketed = /^[[\]]*([^[\]\0]*)/.exec(name)![1]!
  if (bracketed !== base && lowerNames.includes(bracketed)) return true
  // A name other decoders refuse might be our parameter in disguise to one we do not know.
  return dropUndecodable && !decodesAsUtf8(rawName.replace(/\+/g, ' '))
}

/** A query or form component decoded as PHP's urldecode does: `+` a space, every %XX a byte, never failing. */
export function decodeBytewise(component: string): string {
  return component.replace(/\+/g, ' ').replace(/%([0-9A-Fa-f]{2})/g, (_m, hex: string) => String.fromCharCode(parseInt(hex, 16)))
}

function decodesAsUtf8(encoded: string): boolean {
  try {
    decodeURIComponent(encoded)
    return true
  } catch {
    return false
  }
}
