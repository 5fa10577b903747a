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

/**
 * Headers an agent may not set: forwarding metadata, Latchkey's own namespace, and the overrides
 * by which some frameworks act on another method or path than the request line's (Rails,
 * Express's method-override, Symfony, IIS), which the policy never judged. Given the name with
 * `_` read as `-` (see outboundRequestHeaders).
 */
function isSpoofable(name: string): boolean {
  return name.startsWith('x-forwarded-') || name === 'forwarded' || name === 'x-real-ip' || name.startsWith('x-latchkey-') || OVERRIDES.has(name)
}
const OVERRIDES = new Set(['x-http-method-override', 'x-http-method', 'x-method-override', 'x-original-url', 'x-rewrite-url', 'x-original-method'])

function connectionListed(value: string | string[] | undefined): Set<string> | null {
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

export type OutboundHeaders = Record<string, string | string[] | undefined>

/**
 * Copies the agent's headers minus hop-by-hop, Connection-listed, spoofable, Host, Expect and
 * the binding's strip list. `keep` names hop-by-hop headers to preserve (for WebSocket upgrades).
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
    if (strip && (strip.includes(name) || (dashed !== name && strip.includes(dashed)))) continue
    out[name] = incoming[name]
  }
  return out
}

/**
 * Response headers from upstream minus hop-by-hop and Connection-listed ones, and minus Latchkey's
 * own namespace: an upstream must not pass for the sidecar (a 403 with `X-Latchkey-Error:
 * LK_POLICY_DENIED` would read to the agent as a policy denial, not the upstream's answer).
 */
export function inboundResponseHeaders(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const listed = connectionListed(headers.connection)
  let clean = true
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
  return out
}
