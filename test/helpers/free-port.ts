// A port for a server a test starts later, or stops and starts again on the same port. Taken
// below the kernel's ephemeral range (ip_local_port_range, 32768-60999 here), where every
// outgoing connection of every process on the host gets its local port: a port the kernel handed
// out by listen(0) and was freed could be taken by some client's connection before the test
// bound it again (a broker restarted on its port failed with EADDRINUSE in CI). Outside that
// range only another test's pick can collide, and picks are random over 9,000 ports and checked
// free by a bind.
import { createServer } from 'node:net'

const LOW = 21_000
const HIGH = 30_000

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer()
    srv.once('error', () => resolve(false))
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)))
  })
}

export async function freePort(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = LOW + Math.floor(Math.random() * (HIGH - LOW))
    if (await bindable(port)) return port
  }
  throw new Error(`no free port found in ${LOW}-${HIGH} after 50 tries`)
}
