// The agent's own credential in a WebSocket handshake's `Sec-WebSocket-Protocol`. A browser's
// WebSocket cannot set headers, so clients and SDKs carry a token as a subprotocol: Kubernetes'
// `base64url.bearer.authorization.k8s.io.<token>`, OpenAI's `openai-insecure-api-key.<key>`,
// Deepgram's `token, <key>` and the common `Authorization, <token>` / `access_token, <jwt>`, or a
// JWT alone. On an origin the sidecar injects into, that token went on beside the injected one:
// the upstream was given two credentials and could act on the agent's, while the audit named
// only the sidecar's (as Google's SDK's own key beside an injected `?key=`: forward/headers.ts).
// So such entries are removed there, as a credential's header is, and every other subprotocol
// passes as offered, so the upstream can still choose one the agent's client accepts.
import { isCredentialHeader } from '../forward/headers.js'

/** A JWS compact token (three base64url segments, the first a JSON object's: `eyJ`). */
const JWT = /^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/

/**
 * Entries naming what follows them, kept (an upstream that takes the token this way may choose
 * the name as the subprotocol, and the agent's client fails a handshake that chooses one it did
 * not offer): a credential's name (`authorization`, `access_token`, `token`, `x-api-key`, as
 * headers are named) or an auth scheme.
 */
function namesCredential(entry: string): boolean {
  const dashed = entry.toLowerCase().replace(/_/g, '-')
  return dashed === 'bearer' || dashed === 'basic' || isCredentialHeader(dashed)
}

/**
 * Whether an entry carries a credential itself: a JWT; a name's prefix before a `.` that names a
 * credential (`…authorization.k8s.io.<token>`, `openai-insecure-api-key.<key>`); or more than one
 * word, the first a credential's name or scheme (`Bearer <token>`, which no client should send).
 */
function carriesCredential(entry: string): boolean {
  if (JWT.test(entry)) return true
  const words = entry.split(/\s+/)
  if (words.length > 1 && namesCredential(words[0]!)) return true
  for (let dot = entry.indexOf('.'); dot > 0; dot = entry.indexOf('.', dot + 1)) {
    if (namesCredential(entry.slice(0, dot).replace(/\./g, '-'))) return true
  }
  return false
}

/**
 * The agent's `Sec-WebSocket-Protocol` (node:http joins two lines with `, `) without the entries
 * that carry a credential, and without the one after a credential's name; undefined when none is
 * left (the header is then not sent).
 */
export function subprotocolsWithoutCredentials(value: string | string[]): string | undefined {
  const kept: string[] = []
  let afterName = false
  for (const raw of (Array.isArray(value) ? value.join(',') : value).split(',')) {
    const entry = raw.trim()
    if (entry === '') continue
    const isValue = afterName
    // A name after a name (`authorization, bearer, <token>`): the token is still to come.
    afterName = namesCredential(entry)
    if (isValue || carriesCredential(entry)) continue
    kept.push(entry)
  }
  return kept.length > 0 ? kept.join(', ') : undefined
}
