// What every bench script needs to start servers side by side: a free loopback port, and a wait
// until a server answers.
import { createServer } from 'node:net'

/** A loopback port nothing listens on now (bound, read, released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

/** Resolves once `url` answers as `ready` says (by default: anything but a 5xx); throws after 10 s. */
export async function waitFor(url, ready = (r) => r.status < 500) {
  for (let i = 0; i < 200; i++) {
    if (await fetch(url).then(ready, () => false)) return
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`${url} did not come up`)
}
