// Request and response header hygiene. Hop-by-hop headers, and any header the sender lists in
// `Connection`, are removed BEFORE credential injection, so `Connection: authorization` can
// only remove the agent's own header, never the one the sidecar injects.
import type { IncomingHttpHeaders } from 'node:http'

const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authorization',
  'proxy-authenticate',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'http2-settings',
])

/** A header removed with the hop (never forwarded), lower-cased name. */
export function isHopByHop(name: string): boolean {
  return HOP_BY_HOP.has(name)
}

/**
 * Headers an agent may not set: forwarding metadata, Latchkey's own namespace, and the overrides
 * by which some frameworks act on another method or path than the request line's (Rails,
 * Express's method-override, Symfony, IIS), which the policy never judged. Given the name with
 * `_` read as `-` (see outboundRequestHeaders).
 */
function isSpoofable(name: string): boolean {
  return name.startsWith('x-forwarded-') || name === 'forwarded' || name === 'x-real-ip' || name.startsWith('x-latchkey-') || OVERRIDES.has(name)
}
const OVERRIDES = new Set([
  'x-http-method-override',
  'x-http-method',
  'x-method-override',
  'x-method',
  'x-original-method',
  'x-original-url',
  'x-rewrite-url',
  // The path a front proxy saw, which apps behind nginx (auth_request's $request_uri) and Envoy read as the request's.
  'x-original-uri',
  'x-original-path',
  'x-envoy-original-path',
  'x-override-url',
  // CGI variables as headers: gunicorn takes SCRIPT_NAME (and, from 22, PATH_INFO) from a
  // loopback peer's request and routes what follows the first match of it in the path:
  // `SCRIPT_NAME: /public` made an allowed /public/admin/x Flask's /admin/x.
  'script-name',
  'path-info',
  'x-script-name',
  // Next.js's own, set by its router for its render workers: taken from outside, `x-invoke-path`
  // and `x-matched-path` chose the page that answered (another path than the one judged), and
  // `x-middleware-subrequest` skipped its middleware, where apps check authorization
  // (CVE-2025-29927; Vercel's advice is that a proxy in front strip it).
  'x-invoke-path',
  'x-invoke-query',
  'x-invoke-output',
  'x-matched-path',
  'x-middleware-subrequest',
  // The host a front proxy saw, which some frameworks route virtual hosts by (ASP.NET's
  // X-Original-Host): another site on the address than the host the policy judged.
  'x-original-host',
  'x-host',
])

/**
 * The header names a Connection header lists (lower case), or null for none beyond keep-alive or
 * close. The one reading of it: what the forward drops, and what checkFraming judges.
 */
export function connectionListed(value: string | string[] | undefined): Set<string> | null {
  if (!value) return null
  const joined = Array.isArray(value) ? value.join(',') : value
  if (joined.toLowerCase() === 'keep-alive' || joined.toLowerCase() === 'close') return null
  const set = new Set<string>()
  for (const token of joined.split(',')) {
    const t = token.trim().toLowerCase()
    if (t) set.add(t)
  }
  return set
}

/**
 * The largest response head (status line and headers) taken from an upstream, on a forwarded
 * call as on a WebSocket handshake. Node's own 16 KiB (undici's default) refused heads that
 * curl (100 KiB), Go (1 MiB) and Envoy (60 KiB) read, so a call that worked direct failed
 * through the sidecar; the head is read whole before any of it is relayed.
 */
export const MAX_UPSTREAM_HEAD_BYTES = 64 * 1024

export type OutboundHeaders = Record<string, string | string[] | undefined>

/**
 * Copies the agent's headers minus hop-by-hop, Connection-listed, spoofable, Host, Expect and,
 * on a credentialed origin, the binding's strip list and any header a credential's name is written in (isCredentialHeader). `keep` names hop-by-hop headers to preserve (for WebSocket upgrades).
 */
export function outboundRequestHeaders(
  incoming: IncomingHttpHeaders,
  strip: readonly string[] | null,
  keep: readonly string[] | null = null,
): OutboundHeaders {
  const listed = connectionListed(incoming.connection)
  const out: OutboundHeaders = {}
  for (const name in incoming) {
    if (name === 'host' || name === 'expect') continue
    if (HOP_BY_HOP.has(name) && !keep?.includes(name)) continue
    if (listed?.has(name) && !keep?.includes(name)) continue
    // `X_Forwarded_For`, `X-Api_Key` too: CGI/WSGI (HTTP_X_API_KEY) and nginx with
    // underscores_in_headers fold `_` and `-` together, and would read the agent's value.
    const dashed = name.includes('_') ? name.replace(/_/g, '-') : name
    if (isSpoofable(dashed)) continue
    if (strip && (strip.includes(name) || (dashed !== name && strip.includes(dashed)) || isCredentialHeader(dashed))) continue
    out[name] = incoming[name]
  }
  return out
}

/**
 * A credential's header by its name, as SDKs and APIs write their own: any `*api-key`/`*apikey`
 * (`x-goog-api-key` of Google's GenAI SDKs, `xi-api-key`, `x-rapidapi-key`, `apikey`), any
 * `*token` (`private-token` of GitLab, `x-amz-security-token`, `x-vault-token`), `*secret`,
 * `*password`, a named kind of key (`ocp-apim-subscription-key` of Azure API Management,
 * `x-functions-key`, `dd-application-key`, `x-master-key`), `authorization` as a word of the name
 * (`x-authorization`, `x-ms-authorization-auxiliary`), `*-auth`, `*-credential(s)` and `cookie2`.
 * Removed on an origin the sidecar injects into, as Authorization is: Google's SDK sent the
 * agent's placeholder key there beside the injected `?key=`, so the upstream was given two keys
 * and the audit named only the sidecar's. A key that is no credential keeps its way
 * (`idempotency-key`, `sec-websocket-key`, `x-goog-api-client`). Given the name lowercased, with
 * `_` read as `-`.
 */
const CREDENTIAL_HEADER =
  /(?:api-?key|token|secret|password|passwd|(?:^|-)(?:subscription|functions|access|secret|auth|private|master|account|application|app|client|license|session)-?key|(?:^|-)auth|(?:^|-)credentials?|(?:^|-)cookie2?)$|(?:^|-)authorization(?:-|$)/

export function isCredentialHeader(dashed: string): boolean {
  return CREDENTIAL_HEADER.test(dashed)
}

/**
 * Response headers from upstream minus hop-by-hop and Connection-listed ones, and minus Latchkey's
 * own namespace: an upstream must not pass for the sidecar (a 403 with `X-Latchkey-Error:
 * LK_POLICY_DENIED` would read to the agent as a policy denial, not the upstream's answer).
 * A Content-Length with leading zeros (`0005`, which undici's parser takes as 5) or trailing
 * whitespace (`5  `, kept in the value) is written as the number it is: relayed as written, a
 * client that reads it otherwise (a strict parser refusing it, an old one reading octal) would
 * frame the body differently from the sidecar. undici's parser refuses every other spelling
 * (`+5`, `5, 5`, two headers, `0x5`): a 502 LK_UPSTREAM_PROTOCOL.
 */
export function inboundResponseHeaders(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const listed = connectionListed(headers.connection)
  const length = headers['content-length']
  const padded = typeof length === 'string' && length.length > 1 && (length.charCodeAt(0) === 0x30 || !isDigit(length.charCodeAt(length.length - 1)))
  let clean = !padded
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || listed?.has(name) || name.startsWith('x-latchkey-')) {
      clean = false
      break
    }
  }
  if (clean) return headers
  const out: IncomingHttpHeaders = {}
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || listed?.has(name) || name.startsWith('x-latchkey-')) continue
    out[name] = headers[name]
  }
  // Digits and whitespace only here (undici's parser refuses anything else); trimmed as text, so
  // no length is too long for it.
  if (padded && out['content-length'] !== undefined) out['content-length'] = length.trim().replace(/^0+(?=\d)/, '')
  return out
}

function isDigit(c: number): boolean {
  return c >= 0x30 && c <= 0x39
}
