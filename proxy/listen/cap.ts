// A cap on a listening port's open connections, shared by the proxy and admin ports: a flood of
// sockets cannot take the descriptors that upstream dials and the audit file need. Without it, at
// the process's descriptor limit libuv accepted and closed connections itself, with no log line,
// and dials then failed with EMFILE. At the cap a new connection makes room by closing the oldest
// one that holds nothing (capMakingRoom), so that a flood of idle or half-sent sockets cannot keep
// the agent's calls, or the admin port's probes, out; with none, the new one is closed unread.
// Each closed is counted, and logged at most once per burst, naming the limit.
import { readFileSync } from 'node:fs'
import type { Server as HttpServer } from 'node:http'
import type { Server, Socket } from 'node:net'
import type { Logger } from '../../lib/log.js'
import type { SidecarMetrics } from '../metrics.js'
import { owedResponse } from '../pipeline.js'
import { closingSockets } from './linger.js'

/** One warn line per this many ms at most, however many connections a flood brings. */
const LOG_EVERY_MS = 10_000

/** Counts each dropped connection; logs at most once per LOG_EVERY_MS, with how many went since. */
function dropCounter(port: 'proxy' | 'admin', max: number, message: string, metrics: SidecarMetrics, log: Logger): () => void {
  const dropLogDue = oncePer(LOG_EVERY_MS)
  let unlogged = 0
  return () => {
    metrics.droppedConnections.inc({ port })
    unlogged++
    if (!dropLogDue()) return
    log.warn({ port, max_connections: max, dropped: unlogged }, message)
    unlogged = 0
  }
}

/**
 * The proxy port's cap. Any local process reaches the port, and closing the new connection at the
 * cap let 1,024 connections held half-sent (each opened again as the headers timeout closed it),
 * or kept alive idle by an agent's own oversized pool, keep every call out for as long as they
 * were held. Here a connection past the cap closes the oldest one carrying no call: idle between
 * requests, or its request head still arriving. A call being answered (its body still arriving
 * too: it was admitted), one answered and closing (linger.ts: cut, its answer could be lost to the
 * reset) and a connection taken over (a tunnel, a WebSocket: `parser` gone, or `inTunnel`, a
 * plaintext tunnel read by another parser) are calls, and keep their place.
 */
export function capProxyConnections(server: HttpServer, open: Set<Socket>, max: number, inTunnel: (s: Socket) => boolean, metrics: SidecarMetrics, log: Logger): void {
  const holdsNoCall = (s: Socket) => (s as Socket & { parser?: unknown }).parser != null && owedResponse(s) === null && !closingSockets.has(s) && !inTunnel(s)
  capMakingRoom(server, open, max, 'proxy', holdsNoCall, `proxy port at its limit of ${max} open connections (sidecar.max_connections): for each new one the oldest carrying no call (idle, or its request head still arriving) is closed; with none, the new one is closed unread`, metrics, log)
}

/**
 * The admin port's cap: past it the oldest connection not being answered goes (idle between
 * requests, or still sending its request, head or body). A probe's connection, the newest, sends
 * its request at once and is answered in milliseconds: a flood cannot keep kubelet's probes and
 * Prometheus out. Only when every connection holds a whole request being answered is the new one closed.
 */
export function capEvictingIdle(server: HttpServer, max: number, metrics: SidecarMetrics, log: Logger): void {
  const notAnswered = (s: Socket) => !owedResponse(s)?.req.complete
  capMakingRoom(server, trackConnections(server), max, 'admin', notAnswered, `admin port at its limit of ${max} open connections (fixed): for each new one the oldest not being answered (idle, or still sending its request) is closed`, metrics, log)
}

/**
 * A server's open connections, oldest first (a Set keeps insertion order). One refused on arrival
 * by a handler registered before this one (the proxy port's remote peers) takes no place.
 */
export function trackConnections(server: Server): Set<Socket> {
  const open = new Set<Socket>()
  server.on('connection', (socket: Socket) => {
    if (socket.destroyed) return
    open.add(socket)
    socket.once('close', () => open.delete(socket))
  })
  return open
}

/** `open` is trackConnections', registered on `server` before this. */
function capMakingRoom(server: HttpServer, open: Set<Socket>, max: number, port: 'proxy' | 'admin', closable: (s: Socket) => boolean, message: string, metrics: SidecarMetrics, log: Logger): void {
  const dropped = dropCounter(port, max, message, metrics, log)
  server.on('connection', (socket: Socket) => {
    if (socket.destroyed || open.size <= max) return
    let victim: Socket = socket
    for (const s of open) {
      if (s !== socket && closable(s)) {
        victim = s
        break
      }
    }
    open.delete(victim)
    victim.destroy()
    dropped()
  })
  acceptErrors(server, port, metrics, log)
}

function acceptErrors(server: Server, port: 'proxy' | 'admin', metrics: SidecarMetrics, log: Logger): void {
  // After listening, an 'error' is a failed accept (EMFILE when libuv's reserve descriptor is gone):
  // with no listener it would end the process. Logged once per burst; the listener stays open.
  const acceptLogDue = oncePer(LOG_EVERY_MS)
  server.on('error', (err: NodeJS.ErrnoException) => {
    metrics.droppedConnections.inc({ port })
    if (!acceptLogDue()) return
    log.error({ port, code: err.code }, `${port} port could not accept a connection (${err.code ?? err.message}): the process is out of descriptors or memory`)
  })
}

/** A gate that opens at its first call and then at most once every `ms`. */
export function oncePer(ms: number): () => boolean {
  let last = -Infinity
  return () => {
    const now = performance.now()
    if (now - last < ms) return false
    last = now
    return true
  }
}

/**
 * The process's open-file limit (Linux), or null. Each proxied connection holds two descriptors
 * (the agent's and the upstream's; upstream sockets, idle keep-alive ones included, are held to
 * max_connections too, by forward/pools.ts): a cap the limit cannot hold is warned about at start-up.
 */
export function openFileLimit(): number | null {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))
    return m ? Number(m[1]) : null
  } catch {
    return null
  }
}
