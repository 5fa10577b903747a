// A cap on a listening port's open connections, shared by the proxy and admin ports. Past it node
// closes a new connection before reading a byte (its 'drop' event): a flood of idle sockets cannot
// take the descriptors that upstream dials and the audit file need. Without it, at the process's
// descriptor limit libuv accepted and closed connections itself, with no log line, and dials then
// failed with EMFILE. Drops are counted, and logged at most once per burst, naming the limit.
import { readFileSync } from 'node:fs'
import type { Server } from 'node:net'
import type { Logger } from '../../lib/log.js'
import type { SidecarMetrics } from '../metrics.js'

/** One warn line per this many ms at most, however many connections a flood brings. */
const LOG_EVERY_MS = 10_000

export function capConnections(server: Server, max: number, port: 'proxy' | 'admin', setting: string, metrics: SidecarMetrics, log: Logger): void {
  server.maxConnections = max
  const dropLogDue = oncePer(LOG_EVERY_MS)
  let unlogged = 0
  server.on('drop', () => {
    metrics.droppedConnections.inc({ port })
    unlogged++
    if (!dropLogDue()) return
    log.warn({ port, max_connections: max, dropped: unlogged }, `${port} port at its limit of ${max} open connections (${setting}): new connections are closed unread`)
    unlogged = 0
  })
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
