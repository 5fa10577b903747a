// A cap on a listening port's open connections, shared by the proxy and admin ports. Past it node
// closes a new connection before reading a byte (its 'drop' event): a flood of idle sockets cannot
// take the descriptors that upstream dials and the audit file need. Without it, at the process's
// descriptor limit libuv accepted and closed connections itself, with no log line, and dials then
// failed with EMFILE. Drops are counted, and logged at most once per burst, naming the limit.
// The admin port's cap makes room instead (capEvictingIdle): there, the oldest connection not
// being answered goes, so that a flood of held connections cannot keep its probes out.
import { readFileSync } from 'node:fs'
import type { Server as HttpServer } from 'node:http'
import type { Server, Socket } from 'node:net'
import type { Logger } from '../../lib/log.js'
import type { SidecarMetrics } from '../metrics.js'
import { owedResponse } from '../pipeline.js'

/** One warn line per this many ms at most, however many connections a flood brings. */
const LOG_EVERY_MS = 10_000

export function capConnections(server: Server, max: number, port: 'proxy' | 'admin', setting: string, metrics: SidecarMetrics, log: Logger): void {
  server.maxConnections = max
  server.on('drop', dropCounter(port, max, `${port} port at its limit of ${max} open connections (${setting}): new connections are closed unread`, metrics, log))
  acceptErrors(server, port, metrics, log)
}

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
 * The admin port's cap. Any local process reaches the admin port (an agent opens its tasks
 * there), and with the proxy port's rule 256 connections held half-sent, each opened again as
 * the headers timeout closed it, kept kubelet's probes and Prometheus out for as long as they
 * were held. Here a connection past the cap closes the oldest one not being answered: idle
 * between requests, or still sending its request (head or body). A probe's connection, the
 * newest, sends its request at once and is answered in milliseconds: a flood cannot keep it
 * out. Only when every connection holds a whole request being answered is the new one closed.
 */
export function capEvictingIdle(server: HttpServer, max: number, metrics: SidecarMetrics, log: Logger): void {
  /** Open connections, oldest first (a Set keeps insertion order). */
  const open = new Set<Socket>()
  const dropped = dropCounter('admin', max, `admin port at its limit of ${max} open connections (fixed): for each new one the oldest not being answered (idle, or still sending its request) is closed`, metrics, log)
  server.on('connection', (socket: Socket) => {
    open.add(socket)
    socket.once('close', () => open.delete(socket))
    if (open.size <= max) return
    let victim: Socket = socket
    for (const s of open) {
      // Being answered: a response owed on it, to a request whole. A request still arriving is
      // not being answered yet: a slow-loris's head or body holds no place.
      if (s !== socket && !owedResponse(s)?.req.complete) {
        victim = s
        break
      }
    }
    open.delete(victim)
    victim.destroy()
    dropped()
  })
  acceptErrors(server, 'admin', metrics, log)
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
