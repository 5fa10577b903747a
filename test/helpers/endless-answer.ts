// An answer with no end in sight, for clients that must cap what they read of a server they were
// pointed at (`latchkey revoke --broker`, `latchkey audit --url`): 64 MiB of `[`, then the end.
// Read whole it is not JSON; a client that stops at its cap goes away before it is all sent.
import type { ServerResponse } from 'node:http'

export function endlessAnswer(status: number) {
  const total = 64 * 1024 * 1024
  let sent = 0
  let closedEarly = false
  const answer = (res: ServerResponse) => {
    res.writeHead(status, { 'content-type': 'application/json' })
    const chunk = Buffer.alloc(64 * 1024, '[')
    res.on('close', () => (closedEarly = sent < total))
    const write = () => {
      while (sent < total) {
        sent += chunk.length
        if (!res.write(chunk)) return void res.once('drain', write)
      }
      res.end()
    }
    write()
  }
  /** Whether the client went away before the end, and how much it was sent. */
  const outcome = () => ({ closedEarly, sent, total })
  return { answer, outcome }
}
