// node:http, required rather than imported. On Node 24 an ESM import of a builtin builds a
// facade that reads each of its exports once, and node:http's include lazy getters (WebSocket,
// CloseEvent, MessageEvent) that load Node's own bundled undici, for code none of ours calls:
// its 770 KB source compiled and run, 13 MB of RSS right after start-up and 2.2 MB in a sidecar
// after a few seconds of load (91.3 against 89.1 MB). require() builds no facade.
// Types still come from `import type { … } from 'node:http'`, which emits nothing.
import { createRequire } from 'node:module'

const http = createRequire(import.meta.url)('node:http') as typeof import('node:http')

export const createServer = http.createServer
export const STATUS_CODES = http.STATUS_CODES

/**
 * What llhttp says it refused (node:http's clientError carries it as `reason`), to follow its
 * code: `: <reason>`, or '' when there is none. One code stands for several faults
 * (HPE_INVALID_HEADER_TOKEN is a NUL in a value, a space before the colon and a folded line).
 * llhttp's reasons are fixed texts, never the request's bytes; kept to printable ASCII all the
 * same (they go into status lines).
 */
export function parserReason(err: { reason?: unknown }): string {
  const text = typeof err.reason === 'string' ? err.reason.replace(/[^\x20-\x7e]/g, '').trim().slice(0, 120) : ''
  return text === '' ? '' : `: ${text}`
}
