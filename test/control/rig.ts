// Control-stream rigs, all real: a broker with its control gRPC server, an upstream API that
// records each request's bearer token (and can hold a streaming response open), and sidecars
// connected over real sockets.
import { createServer, request, type IncomingMessage, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { randomBytes, createHash } from 'node:crypto'
import { connect as netConnect, createServer as createNetServer, type Socket } from 'node:net'
import { once } from 'node:events'
import { startTestBroker, freePort, API, type TestBroker } from '../helpers/broker.js'
import { startTestSidecar, loopbackPolicy, type TestSidecar } from '../helpers/harness.js'
import type { SidecarOptions } from '../../proxy/sidecar.js'
import type { BrokerConfig } from '../../lib/config/schema.js'
import { serverFrame } from '../helpers/websocket-frames.js'
import { until } from '../helpers/until.js'

export { until }

export const CONTROL_TOKEN = 'ctl-' + randomBytes(16).toString('hex')

export async function startControlBroker(
  opts: { store?: BrokerConfig['store']; control?: Record<string, unknown>; env?: NodeJS.ProcessEnv; broker?: Record<string, unknown> } = {},
): Promise<TestBroker & { controlUrl: string }> {
  const b = await startTestBroker({
    store: opts.store,
    broker: { control: { port: 0, heartbeat_ms: 100, resync_ms: 200, ...opts.control }, ...opts.broker },
    env: { LATCHKEY_CONTROL_TOKEN: CONTROL_TOKEN, ...opts.env },
  })
  return Object.assign(b, { controlUrl: `grpc://${b.broker.controlAddress!}` })
}

/**
 * A control broker that restarts as a real one does: the same SQLite store and control port each
 * time. `stop()` ends the running one; `restart()` starts the next. Whichever runs at the end is
 * torn down with the test.
 */
export async function restartableBroker(t: { teardown(fn: () => unknown): void }, name: string) {
  const dbFile = join(mkdtempSync(join(tmpdir(), `lk-${name}-`)), 'broker.db')
  const port = await freePort()
  const opts = { store: { sqlite: { path: dbFile } }, control: { port } }
  const first = await startControlBroker(opts)
  let running: TestBroker | null = first
  t.teardown(() => running?.close())
  return {
    dbFile,
    port,
    first,
    async stop(): Promise<void> {
      const b = running
      running = null
      await b?.close()
    },
    async restart(): Promise<TestBroker & { controlUrl: string }> {
      const b = await startControlBroker(opts)
      running = b
      return b
    },
  }
}

export interface Api {
  origin: string
  port: number
  /** Bearer tokens received, in order. */
  tokens: string[]
  /** Request targets received, in order. */
  paths: string[]
  /** Its WebSocket connections open, oldest first: a test may read what one receives, or write frames of its own. */
  webSockets: ReadonlySet<Socket>
  close(): Promise<void>
}

/** /stream holds a response open, writing a chunk every 50 ms; /hold never answers; anything else answers 200 {ok, bearer}. */
export async function startApi(): Promise<Api> {
  const tokens: string[] = []
  const paths: string[] = []
  const upgraded = new Set<import('node:net').Socket>()
  const server: Server = createServer((req, res) => {
    req.resume()
    paths.push(req.url ?? '')
    const auth = req.headers.authorization ?? ''
    if (auth.startsWith('Bearer ')) tokens.push(auth.slice(7))
    // Holds the request unanswered, as an API thinking before its head.
    if (req.url?.startsWith('/hold')) return
    if (req.url?.startsWith('/stream')) {
      res.writeHead(200, { 'content-type': 'text/plain' })
      const timer = setInterval(() => res.write('tick\n'), 50)
      res.on('close', () => clearInterval(timer))
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ok: true, bearer: auth.startsWith('Bearer ') }))
  })
  // A WebSocket endpoint that echoes what it reads, prefixed, in one text frame (the sidecar reads an upstream's frames).
  server.on('upgrade', (req: IncomingMessage, socket: import('node:net').Socket) => {
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
    socket.on('data', (d: Buffer) => socket.write(serverFrame(Buffer.concat([Buffer.from('echo:'), d]))))
    socket.on('error', () => socket.destroy())
    // node:http servers allow half-open sockets: close ours when the sidecar closes its side.
    socket.on('end', () => socket.end())
    upgraded.add(socket)
    socket.on('close', () => upgraded.delete(socket))
  })
  server.keepAliveTimeout = 30_000
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    origin: `http://127.0.0.1:${port}`,
    port,
    tokens,
    paths,
    webSockets: upgraded,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        for (const u of upgraded) u.destroy()
        server.close(() => resolve())
      }),
  }
}

export interface ControlSidecar extends TestSidecar {
  agent: string
  /** Opens a task; returns its handle and id. */
  openTask(): Promise<{ handle: string; id: string }>
}

export async function startControlSidecar(
  broker: TestBroker & { controlUrl: string },
  api: Api,
  agent: string,
  opts: {
    control?: Record<string, unknown>
    sidecar?: Record<string, unknown>
    token?: string
    /** A `secrets` section: the control token is then read from its file, not the environment. */
    secrets?: Record<string, unknown>
    options?: Omit<SidecarOptions, 'env' | 'logDestination'>
    policy?: Record<string, unknown>
    routes?: Record<string, string>
  } = {},
): Promise<ControlSidecar> {
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([api.port]),
      ...(opts.policy ? { policy: opts.policy } : {}),
      ...(opts.routes ? { routes: opts.routes } : {}),
      ...(opts.secrets ? { secrets: opts.secrets } : {}),
      sidecar: {
        agent_id: agent,
        broker: { url: broker.url, timeout_ms: 2000 },
        attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } },
        control: { url: broker.controlUrl, token_secret: 'CONTROL', stale_after_ms: 2000, backoff_min_ms: 20, backoff_max_ms: 200, ...opts.control },
        ...opts.sidecar,
      },
      credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }],
    },
    opts.secrets ? {} : { LATCHKEY_SECRET_CONTROL: opts.token ?? CONTROL_TOKEN },
    opts.options ?? {},
  )
  return Object.assign(s, {
    agent,
    async openTask() {
      const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'control test', duration_s: 200 }) })
      const body = (await res.json()) as Record<string, unknown>
      if (res.status !== 201) throw new Error(`task not opened: ${res.status} ${String(body.reason ?? '')}`)
      return { handle: body.task as string, id: body.id as string }
    },
  })
}

export interface Reply {
  status: number
  headers: IncomingMessage['headers']
  body: Record<string, unknown>
}

/** One absolute-form request through the sidecar for a task, or none for `null` (a fresh connection each time). */
export function viaProxy(s: TestSidecar, handle: string | null, url: string): Promise<Reply> {
  const proxy = new URL(s.proxy)
  return new Promise((resolve, reject) => {
    const req = request(
      { host: proxy.hostname, port: proxy.port, method: 'GET', path: url, agent: false, headers: { host: new URL(url).host, ...(handle === null ? {} : { 'proxy-authorization': 'Basic ' + Buffer.from(`task:${handle}`).toString('base64') }) } },
      (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => (text += c))
        res.on('end', () => {
          let body: Record<string, unknown> = {}
          try {
            body = JSON.parse(text) as Record<string, unknown>
          } catch {
            body = { text }
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body })
        })
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    req.end()
  })
}

/** Opens a streaming response through the sidecar; resolves `ended` when the agent's side closes. */
export function openStream(s: TestSidecar, handle: string, url: string): Promise<{ status: number; chunks: () => number; ended: Promise<string> }> {
  const proxy = new URL(s.proxy)
  return new Promise((resolve, reject) => {
    const req = request(
      { host: proxy.hostname, port: proxy.port, method: 'GET', path: url, agent: false, headers: { host: new URL(url).host, ...(handle === null ? {} : { 'proxy-authorization': 'Basic ' + Buffer.from(`task:${handle}`).toString('base64') }) } },
      (res) => {
        let n = 0
        res.on('data', () => n++)
        const ended = new Promise<string>((done) => {
          res.on('end', () => done('end'))
          res.on('aborted', () => done('aborted'))
          res.on('error', () => done('error'))
          res.on('close', () => done('close'))
        })
        resolve({ status: res.statusCode ?? 0, chunks: () => n, ended })
      },
    )
    req.on('error', reject)
    req.end()
  })
}

export async function revoke(broker: TestBroker, kind: string, value: string, token = broker.adminToken): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${broker.url}/v1/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ kind, value, reason: 'control test' }),
  })
  return { status: res.status, body: (await res.json()) as Record<string, unknown> }
}

type SidecarOpts = Parameters<typeof startControlSidecar>[3]

/**
 * A broker, an upstream API and one sidecar for `agent`, its control stream connected, all torn
 * down with the test. `opts` may be made from the API (a route to it).
 */
export async function startRig(t: { teardown(fn: () => unknown): void }, agent: string, opts: SidecarOpts | ((api: Api) => SidecarOpts) = {}) {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(broker, api, agent, typeof opts === 'function' ? opts(api) : opts)
  t.teardown(s.close)
  await until('connected', () => s.sidecar.control!.connected)
  return { broker, api, s }
}

/** Opens a CONNECT tunnel through the sidecar to 127.0.0.1:`port` for a task; returns it with the sidecar's answer. */
export async function openTunnel(s: TestSidecar, handle: string, port: number): Promise<{ tunnel: Socket; head: string }> {
  const tunnel = netConnect(Number(new URL(s.proxy).port), '127.0.0.1')
  await once(tunnel, 'connect')
  tunnel.write(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nProxy-Authorization: Basic ${Buffer.from(`task:${handle}`).toString('base64')}\r\n\r\n`)
  const [head] = (await once(tunnel, 'data')) as [Buffer]
  return { tunnel, head: head.toString() }
}

/** Opens a WebSocket through the sidecar (absolute-form upgrade) for a task; resolves once upgraded. */
export async function openWebSocket(s: TestSidecar, handle: string, api: Api): Promise<Socket> {
  const sock = netConnect(Number(new URL(s.proxy).port), '127.0.0.1')
  await once(sock, 'connect')
  sock.write(
    `GET ${api.origin}/ws HTTP/1.1\r\nHost: 127.0.0.1:${api.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n` +
      `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nProxy-Authorization: Basic ${Buffer.from(`task:${handle}`).toString('base64')}\r\n\r\n`,
  )
  const [head] = (await once(sock, 'data')) as [Buffer]
  if (!head.toString().startsWith('HTTP/1.1 101')) throw new Error(`upgrade refused: ${head.toString().split('\r\n')[0]}`)
  return sock
}

/**
 * While a server is down its port refuses every connection (accept, then reset), and
 * notes when each attempt came: a test brings the server back right after one, so the next attempt's
 * delay is the reconnect backoff's, with no luck involved.
 */
export async function refuser(port: number): Promise<{ attempts: number[]; next(): Promise<void>; close(): Promise<void> }> {
  const attempts: number[] = []
  let waiter: (() => void) | null = null
  const srv = createNetServer((s: Socket) => {
    attempts.push(Date.now())
    s.resetAndDestroy()
    waiter?.()
    waiter = null
  })
  await new Promise<void>((r) => srv.listen(port, '127.0.0.1', r))
  return {
    attempts,
    next: () => new Promise<void>((r) => (waiter = r)),
    close: () => new Promise<void>((r) => srv.close(() => r())),
  }
}

/** A raw connection to `port` that has sent `request`: the socket, what it has received so far, and whether it has closed. */
export function openRecorded(t: { teardown(fn: () => unknown): void }, port: number, request: string) {
  const sock = netConnect(port, '127.0.0.1')
  let received = ''
  let closed = false
  sock.on('data', (d: Buffer) => (received += d.toString('latin1')))
  sock.on('close', () => (closed = true))
  sock.on('error', () => {})
  t.teardown(() => void sock.destroy())
  sock.write(request)
  return { sock, received: () => received, closed: () => closed }
}
