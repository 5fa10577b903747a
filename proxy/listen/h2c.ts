// An offer to upgrade to h2c is declined, as RFC 9110 §7.8 lets a server, and the request served
// in HTTP/1.1: Java's HttpClient (HTTP/2 by default) offers it on every http:// request, and so
// does `curl --http2`; refusing the request broke them where the upstream itself would have
// answered. The offer never travels on: Upgrade, HTTP2-Settings and the Connection tokens naming
// them are hop-by-hop, and an h2c upgrade passed through a proxy is how requests are smuggled
// past it (the upstream switches protocol on a connection the proxy then relays blind).
import type { IncomingMessage } from 'node:http'

const OFFER_TOKENS = new Set(['upgrade', 'http2-settings'])

/** Whether the request's Upgrade offers h2c and nothing else (a mixed offer is refused as an upgrade). */
export function offersOnlyH2c(req: IncomingMessage): boolean {
  return String(req.headers.upgrade ?? '').trim().toLowerCase() === 'h2c'
}

/**
 * The request's head as it came, without the offer: to be parsed again as a plain request, ahead
 * of what followed it. node:http has already checked every line of it; none is changed but
 * Connection, which loses the tokens naming the offer (and goes when none is left).
 */
export function headWithoutH2cOffer(req: IncomingMessage): Buffer {
  let head = `${req.method} ${req.url} HTTP/${req.httpVersion}\r\n`
  const raw = req.rawHeaders
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!
    const lower = name.toLowerCase()
    if (lower === 'upgrade' || lower === 'http2-settings') continue
    let value = raw[i + 1]!
    if (lower === 'connection') {
      value = value
        .split(',')
        .map((token) => token.trim())
        .filter((token) => token !== '' && !OFFER_TOKENS.has(token.toLowerCase()))
        .join(', ')
      if (value === '') continue
    }
    head += `${name}: ${value}\r\n`
  }
  // latin1: the bytes node:http read, one per character.
  return Buffer.from(head + '\r\n', 'latin1')
}
