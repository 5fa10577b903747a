// Response-side credential hygiene. An upstream that reflects the request into its response head
// (a redirect carrying the query key, a debug header, WWW-Authenticate, Set-Cookie, even the
// reason phrase or a header's name) would hand the agent the credential it must never hold.
// Every part of the head an upstream chooses goes through here, on every path that relays one
// (forward and WebSocket upgrade). Bodies are not inspected: see ARCHITECTURE.md.
import type { IncomingHttpHeaders } from 'node:http'
import { unescape } from 'node:querystring'
import type { Credential, CredentialBinding } from '../context.js'
import { perCredential } from '../credentials/per-credential.js'

export const REMOVED = '[removed by latchkey: it contained the injected credential]'

/**
 * Whether `text` reveals the credential: the secret itself, a form the injector wrote that does
 * not contain it (Basic's base64), or either once percent-decoded in any spelling (either hex
 * case, encoded twice, `+` or `%20` for a space, as URL and form encoders write it).
 */
export function revealsCredential(text: string, binding: CredentialBinding, credential: Credential, secret = credential.value): boolean {
  const forms = binding.encodedForms(credential)
  if (contains(text, secret, forms)) return true
  if (!text.includes('%') && !text.includes('+') && !secret.includes(' ') && !secret.includes('+')) return false
  // Compared with every space read as `+`: a form encoder writes a space as `+` and a `+` as
  // %2B, so after decoding only this reading makes both sides agree.
  const wanted = spaceAsPlus(secret)
  let candidate = text
  for (let round = 0; ; round++) {
    if (contains(spaceAsPlus(candidate), wanted, forms)) return true
    if (round === 2 || !candidate.includes('%')) return false
    // unescape (node:querystring) leaves malformed escapes as they are instead of throwing.
    candidate = unescape(candidate)
  }
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
 * Removes from a response head what reveals the credential: a header whose name does is dropped,
 * a value that does is replaced (one entry of a list, e.g. one Set-Cookie, not its neighbours).
 */
export function scrubResponseHeaders(headers: IncomingHttpHeaders, binding: CredentialBinding, credential: Credential): void {
  for (const name in headers) {
    // Names arrive lower-cased; the secret need not be.
    if (revealsCredential(name, binding, credential, lowerCased(credential))) {
      delete headers[name]
      continue
    }
    const v = headers[name]
    if (v === undefined) continue
    if (typeof v === 'string') {
      if (revealsCredential(v, binding, credential)) headers[name] = REMOVED
    } else if (v.some((x) => revealsCredential(x, binding, credential))) {
      headers[name] = v.map((x) => (revealsCredential(x, binding, credential) ? REMOVED : x))
    }
  }
}

/** The upstream's reason phrase, unless it reveals the credential (then the standard one is used). */
export function safeReasonPhrase(reason: string | undefined, binding: CredentialBinding, credential: Credential): string | undefined {
  return reason && revealsCredential(reason, binding, credential) ? undefined : reason
}

const lowerCased = perCredential((c) => c.value.toLowerCase())
