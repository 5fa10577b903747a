// Byte relay for CONNECT tunnels and WebSocket connections. A FIN from either side ends the
// whole relay once pending writes flush: TLS and WebSocket close with their own handshakes, and
// a half-open relay left waiting on a peer that never closes would hold sockets forever.
import type { Socket } from 'node:net'

/** Pipes both ways; calls `onClosed` once, after both sockets have closed. */
export function relay(client: Socket, upstream: Socket, onClosed: () => void): void {
  upstream.pipe(client)
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
