// Baseline: node http-proxy 1.18 as a forward proxy (the usual Node choice), keep-alive agent,
// injecting the same bearer header.
import { createServer, Agent } from 'node:http'
import httpProxy from 'http-proxy'

const [port, token] = [Number(process.argv[2]), process.env.BENCH_TOKEN]
const agent = new Agent({ keepAlive: true, maxSockets: 64 })
// changeOrigin: Host becomes the target's, as a forward proxy must send it.
const proxy = httpProxy.createProxyServer({ agent, xfwd: false, changeOrigin: true })
proxy.on('proxyReq', (proxyReq) => proxyReq.setHeader('authorization', `Bearer ${token}`))
proxy.on('error', (_err, _req, res) => res.writeHead?.(502).end())

createServer((req, res) => {
  if (!req.url.startsWith('http://')) return void res.writeHead(400).end('absolute-form only')
  const url = new URL(req.url)
  req.url = url.pathname + url.search
  proxy.web(req, res, { target: url.origin })
}).listen(port, '127.0.0.1', () => console.log('listening'))

// Exit cleanly on SIGINT/SIGTERM so profilers and the bench's cleanup see a normal exit.
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0))
