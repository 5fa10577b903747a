// The admin port: /metrics (Prometheus), /healthz (the process answers), /readyz (listening,
// not draining, audit sink writing). Loopback only, like the proxy port.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { SidecarMetrics } from './metrics.js'

export interface Readiness {
  ready(): { ok: boolean; reasons: string[] }
}

/** Further routes on the admin port (the task API); returns true when it handled the request. */
export type AdminRoute = (req: IncomingMessage, res: ServerResponse, path: string) => boolean

export function createAdminServer(metrics: SidecarMetrics, readiness: Readiness, extra?: AdminRoute): Server {
  return createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0] ?? ''
    if (extra?.(req, res, path)) return
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end()
      return
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}\n')
    } else if (path === '/readyz') {
      const r = readiness.ready()
      res.writeHead(r.ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify(r) + '\n')
    } else if (path === '/metrics') {
      metrics.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        () => res.writeHead(500).end(),
      )
    } else {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"not_found"}\n')
    }
  })
}
