// A front for the real broker's token endpoint, for faults a real broker cannot be made to show on
// demand: an answer held back until the test releases it (an exchange in flight while something
// else happens), an answer rewritten (a broker that grants more than asked), or an answer made up
// whole (an absurd lifetime, a body of hundreds of megabytes). Everything else is forwarded as is.
import { createServer, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

export type FrontMode =
  | { mode: 'pass' }
  /** Forward, then hold the broker's answer until release(). */
  | { mode: 'hold' }
  /** Forward, then merge `patch` into the broker's JSON answer. */
  | { mode: 'patch'; patch: Record<string, unknown> }
  /** Answer this, without asking the broker. */
  | { mode: 'raw'; status?: number; text: string }
  /** A 200 whose access_token is `mb` megabytes of 'a'. */
  | { mode: 'huge'; mb: number }

export interface BrokerFront {
  url: string
  mode: FrontMode
  /** Token requests seen. */
  requests: number
  /** Resolves once `n` token requests in all have been answered or, when holding, are held. */
  handled(n: number): Promise<void>
  /** Lets every held answer go. */
  release(): void
  close(): Promise<void>
}

export async function startBrokerFront(brokerUrl: string): Promise<BrokerFront> {
  let held: (() => void)[] = []
  let done = 0
  let waiters: { n: number; go: () => void }[] = []
  const front: BrokerFront = {
    url: '',
    mode: { mode: 'pass' },
    requests: 0,
    handled: (n) => new Promise<void>((go) => (done >= n ? go() : waiters.push({ n, go }))),
    release() {
      const h = held
      held = []
      for (const go of h) go()
    },
    close: () =>
      new Promise<void>((resolve) => {
        front.release()
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
  const signal = () => {
    done++
    const ready = waiters.filter((w) => done >= w.n)
    waiters = waiters.filter((w) => done < w.n)
    for (const w of ready) w.go()
  }
  const huge = (res: ServerResponse, mb: number) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    const chunk = Buffer.alloc(1 << 20, 'a')
    res.write('{"access_token":"')
    let n = 0
    const more = () => {
      while (n < mb) {
        n++
        if (!res.write(chunk)) return void res.once('drain', more)
      }
      res.end('","token_type":"Bearer","expires_in":300,"issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}')
    }
    res.on('error', () => {})
    more()
  }
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      front.requests++
      const m = front.mode
      if (m.mode === 'raw') {
        signal()
        return void res.writeHead(m.status ?? 200, { 'content-type': 'application/json' }).end(m.text)
      }
      if (m.mode === 'huge') {
        signal()
        return huge(res, m.mb)
      }
      void fetch(brokerUrl + (req.url ?? '/'), { method: req.method, headers: { 'content-type': req.headers['content-type'] ?? '' }, body: Buffer.concat(chunks) }).then(async (r) => {
        let text = await r.text()
        if (m.mode === 'patch') text = JSON.stringify({ ...(JSON.parse(text) as object), ...m.patch })
        const answer = () => res.writeHead(r.status, { 'content-type': 'application/json' }).end(text)
        if (m.mode === 'hold') held.push(answer)
        else answer()
        signal()
      })
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  front.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  return front
}
