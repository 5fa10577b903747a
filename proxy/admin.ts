// The admin port: /metrics (Prometheus), /healthz (the process answers), /readyz (listening,
// not draining, audit sink writing). Loopback only, like the proxy port; only local programs
// (no web page, see local-caller.ts); slow or idle clients are cut like the proxy port's, and the
// number of connections is capped (by the sidecar, listen/cap.ts), so idle sockets cannot take the process's descriptors.
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import { createServer } from '../lib/node-http.js'
import type { Socket } from 'node:net'
import { headersCheckInterval, MAX_HEADER_BYTES, parserRefusal } from './listen/server.js'
import type { SidecarMetrics } from './metrics.js'
import { checkLocalCaller } from './listen/local-caller.js'
import { LatchkeyError, renderError, renderErrorRaw } from './errors.js'

/** Scrapers, probes and a few agents opening tasks: far fewer than this at once (see listen/cap.ts). */
export const MAX_ADMIN_CONNECTIONS = 256

export interface Readiness {
  ready(): { ok: boolean; reasons: string[] }
}

/** Further routes on the admin port (the task API); returns true when it handled the request. */
export type AdminRoute = (req: IncomingMessage, res: ServerResponse, path: string) => boolean

export function createAdminServer(metrics: SidecarMetrics, readiness: Readiness, opts: { clientHeadersTimeoutMs: number; namedHosts: boolean }, extra?: AdminRoute): Server {
  const { clientHeadersTimeoutMs, namedHosts } = opts
  // node:http refuses a headersTimeout above requestTimeout (a RangeError at start-up), and
  // client_headers_ms may be set up to an hour: the request gets at least as long as its headers.
  const serverOptions = {
    headersTimeout: clientHeadersTimeoutMs,
    connectionsCheckingInterval: headersCheckInterval(clientHeadersTimeoutMs),
    requestTimeout: Math.max(30_000, clientHeadersTimeoutMs),
    keepAliveTimeout: 5_000,
    maxHeaderSize: MAX_HEADER_BYTES,
  }
  const server = createServer(serverOptions, (req, res) => {
    try {
      checkLocalCaller(req.headers, namedHosts)
    } catch (err) {
      const { status, statusText, headers, body } = renderError(err as LatchkeyError)
      res.writeHead(status, statusText, headers).end(body)
      return
    }
    const path = (req.url ?? '').split('?')[0] ?? ''
    if (extra?.(req, res, path)) return
    if (path !== '/healthz' && path !== '/readyz' && path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"not_found"}\n')
      return
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end()
      return
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}\n')
    } else if (path === '/readyz') {
      const r = readiness.ready()
      res.writeHead(r.ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify(r) + '\n')
    } else {
      metrics.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        () => res.writeHead(500).end(),
      )
    }
  })
  // A head the parser refuses (too large, malformed, too slow) gets the coded JSON refusal the
  // proxy port gives, not node:http's bare status line. Not audited: no call was asked for. With
  // a response under way on the connection (pipelining), the connection just ends after it.
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    const inFlight = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage
    if (err.code === 'ECONNRESET' || !socket.writable || inFlight) {
      if (inFlight && !inFlight.writableFinished) inFlight.once('finish', () => socket.destroy())
      else socket.destroy()
      return
    }
    socket.end(renderErrorRaw(parserRefusal(err)))
    // A refusal written to a client that does not read it does not hold the socket.
    setTimeout(() => socket.destroy(), 1_000).unref()
  })
  return server
}
