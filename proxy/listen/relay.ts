// Byte relay for CONNECT tunnels and WebSocket connections. A FIN from either side ends the
// whole relay once pending writes flush: TLS and WebSocket close with their own handshakes, and
// a half-open relay left waiting on a peer that never closes would hold sockets forever.
import type { Socket } from 'node:net'
import type { Writable } from 'node:stream'
import type { CallContext } from '../context.js'
import { recordEnd } from '../call-outcome.js'

/** What every relay (CONNECT tunnel, WebSocket) is timed by. */
export interface RelayTimeouts {
  /** TCP (and TLS) connect to the upstream. */
  connectTimeoutMs: number
  /** timeouts.tunnel_idle_ms: an open relay with no bytes to or from the agent this long is closed. */
  idleMs: number
  /** timeouts.headers_ms: the upstream's answer to a WebSocket handshake (a tunnel has none). */
  headersMs: number
}

/**
 * Pipes both ways; calls `onClosed` once, after both sockets have closed. `inbound`, when given,
 * is what the upstream's bytes go through on their way (already piped to the client).
 */
export function relay(client: Socket, upstream: Socket, onClosed: () => void, inbound?: Writable): void {
  upstream.pipe(inbound ?? client)
  client.pipe(upstream)
  watchClose(client, upstream, onClosed)
}

/** Tears both sockets down when either ends, errors or closes; `onClosed` runs once at the end. */
export function watchClose(client: Socket, upstream: Socket, onClosed: () => void): () => void {
  let closed = 0
  const endBoth = () => {
    client.destroySoon()
    upstream.destroySoon()
  }
  const onClose = () => {
    if (++closed === 1) {
      client.destroy()
      upstream.destroy()
      return
    }
    onClosed()
  }
  client.once('end', endBoth)
  upstream.once('end', endBoth)
  client.once('close', onClose)
  upstream.once('close', onClose)
  return () => {
    client.removeListener('end', endBoth)
    upstream.removeListener('end', endBoth)
    client.removeListener('close', onClose)
    upstream.removeListener('close', onClose)
  }
}

/**
 * Watches an agent socket from the moment it is taken over until its relay starts, which has a
 * watch of its own. The listener's sockets are half-open (a FIN is read, no close follows by
 * itself), so an agent hanging up while its upstream is dialled is destroyed here, and
 * `onHangUp` runs: otherwise the upstream connection (and a WebSocket handshake, credential
 * injected) went ahead for nobody, unrecorded. Returns the function that stops watching.
 */
export function watchEarlyHangUp(client: Socket, onHangUp: () => void): () => void {
  const onEnd = () => client.destroy()
  client.once('end', onEnd)
  client.once('close', onHangUp)
  return () => {
    client.removeListener('end', onEnd)
    client.removeListener('close', onHangUp)
  }
}

/**
 * Closes a relay with no bytes either way for `idleMs`: the client socket sees both directions
 * (what the agent sends is read from it, what comes back is written to it), so its inactivity
 * timer is the relay's. The call is recorded as cut for idleness, its status kept (the 200 or
 * 101 went). Returns the function that stops watching (a tunnel handed to the HTTP parser).
 * `waiting`, on a scrubbed WebSocket, is what the upstream sent that has not gone on
 * (websocket-scrub.ts): then bytes did come, and the reason says so.
 */
export function closeWhenIdle(ctx: CallContext, client: Socket, idleMs: number, waiting?: () => number): () => void {
  const onIdle = () => {
    const held = waiting?.() ?? 0
    recordEnd(
      ctx,
      'LK_IDLE_TIMEOUT',
      held === 0
        ? `no bytes either way for ${idleMs} ms (sidecar.timeouts.tunnel_idle_ms)`
        : `no bytes to or from the agent for ${idleMs} ms (sidecar.timeouts.tunnel_idle_ms), while ${held} bytes from the upstream waited: a frame not yet whole, or frames behind a message fragment that ended on bytes that could begin the credential`,
    )
    client.destroy()
  }
  client.setTimeout(idleMs, onIdle)
  return () => {
    client.setTimeout(0)
    client.removeListener('timeout', onIdle)
  }
}
