// A connection node:http handed over (a CONNECT, an upgrade), given to an HTTP server to parse:
// the tunnel's plain HTTP to the inner server, a tunnel to the admin API to the admin server, a
// declined h2c offer back to the server it came from. What was already read from it is put back
// in front of the rest.
import type { Server } from 'node:http'
import type { Socket } from 'node:net'

export function serveOn(server: Server, socket: Socket, read: Buffer): void {
  socket.pause()
  if (read.length > 0) socket.unshift(read)
  server.emit('connection', socket)
  socket.resume()
}
