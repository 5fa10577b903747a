// Baseline: the least a forward proxy on undici can do. Absolute-form in, one Pool per origin,
// an injected bearer header, the response streamed back. No policy, no audit, no checks.
import { createServer } from 'node:http'
import { Pool } from 'undici'

const [port, token] = [Number(process.argv[2]), process.env.BENCH_TOKEN]
const pools = new Map()
const HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'te', 'trailer', 'transfer-encoding', 'upgrade'])

createServer((req, res) => {
  if (!req.url.startsWith('http://')) return void res.writeHead(400).end('absolute-form only')
  const url = new URL(req.url)
  let pool = pools.get(url.origin)
  if (!pool) pools.set(url.origin, (pool = new Pool(url.origin)))
  const headers = {}
  for (const k in req.headers) if (!HOP.has(k)) headers[k] = req.headers[k]
  headers.host = url.host
  headers.authorization = `Bearer ${token}`
  pool.dispatch(
    { path: url.pathname + url.search, method: req.method, headers, body: req.headers['content-length'] ? req : null },
    {
      onRequestStart() {},
      onResponseStart(_c, status, h) {
        for (const k of HOP) delete h[k]
        res.writeHead(status, h)
      },
      onResponseData(_c, chunk) {
        res.write(chunk)
      },
      onResponseEnd() {
        res.end()
      },
      onResponseError(_c, err) {
        if (!res.headersSent) res.writeHead(502).end(String(err.code))
        else res.destroy()
      },
    },
  )
}).listen(port, '127.0.0.1', () => console.log('listening'))

// Exit cleanly on SIGINT/SIGTERM so profilers and the bench's cleanup see a normal exit.
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0))
