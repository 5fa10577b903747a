// Real servers for tests: a recording upstream (HTTP or HTTPS), the sidecar itself started
// in-process on port 0 with its logs captured, and raw-socket requests for framing tricks.
import { createServer as createHttpServer, type IncomingHttpHeaders, type Server, type RequestListener } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { connect, createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net'
import { once } from 'node:events'
import { mkdtempSync, readFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { randomBytes } from 'node:crypto'
import { validateConfig } from '../../lib/config/load.js'
import type { Config } from '../../lib/config/schema.js'
import { startSidecar, type RunningSidecar, type SidecarOptions } from '../../proxy/sidecar.js'
import { testPki, type TestPki } from './tls.js'

/** A secret no output may ever contain. Tests grep logs, audit lines and bodies for it. */
export const CANARY = 'LKCANARY' + randomBytes(12).toString('hex')

export interface RecordedRequest {
  method: string
  url: string
  headers: IncomingHttpHeaders
  rawHeaders: string[]
  body: string
}

export interface Upstream {
  server: Server
  port: number
  origin: string
  requests: RecordedRequest[]
  close(): Promise<void>
}

/** An upstream that records what it received and answers 200 "ok" unless `handler` says else. */
export async function startUpstream(
  opts: {
    tls?: boolean
    /** Another test CA's leaf (tls implied). */
    pki?: TestPki
    /** Server TLS options over the leaf's key and cert (another leaf, protocol versions, requestCert). */
    tlsOptions?: import('node:tls').TlsOptions
    handler?: (req: RecordedRequest, res: Parameters<RequestListener>[1]) => boolean | void
  } = {},
): Promise<Upstream> {
  const requests: RecordedRequest[] = []
  const listener: RequestListener = (req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const rec = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders, body: Buffer.concat(chunks).toString() }
      requests.push(rec)
      if (opts.handler?.(rec, res)) return
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok')
    })
  }
  const pki = opts.pki ?? (opts.tls || opts.tlsOptions ? testPki() : null)
  const server = pki ? createHttpsServer({ key: pki.key, cert: pki.cert, ...opts.tlsOptions }, listener) : createHttpServer(listener)
  // Records every header it is sent (Node 24 would refuse past 2,000 lines, Node 20 drop them).
  server.maxHeadersCount = 0
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as AddressInfo).port
  return {
    server,
    port,
    origin: `${pki ? 'https' : 'http'}://127.0.0.1:${port}`,
    requests,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections()
      server.close(() => resolve())
    }),
  }
}

export interface TestSidecar {
  sidecar: RunningSidecar
  config: Config
  logs: string[]
  auditPath: string
  proxy: string
  /**
   * Audit events written so far (flushes first). With atLeast, waits up to 2 s for that many:
   * a tunnel's event is written when the sidecar sees it close, which can trail the client's exit.
   */
  audit(atLeast?: number): Promise<Record<string, unknown>[]>
  close(): Promise<void>
}

/** Starts a sidecar from a config fragment (version, ports and audit path filled in). */
export async function startTestSidecar(fragment: Record<string, unknown>, env: NodeJS.ProcessEnv = {}, opts: Omit<SidecarOptions, 'env' | 'logDestination'> = {}): Promise<TestSidecar> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-sidecar-'))
  const auditPath = join(dir, 'audit.jsonl')
  const sidecarFragment = (fragment.sidecar ?? {}) as Record<string, unknown>
  const config = validateConfig({
    version: 1,
    ...fragment,
    sidecar: { listen: { port: 0 }, admin: { port: 0 }, ...sidecarFragment, timeouts: { drain_ms: 2000, ...(sidecarFragment.timeouts as object) } },
    audit: { jsonl: { path: auditPath, flush_ms: 5 } },
    log: { level: 'info' },
  })
  const logs: string[] = []
  const destination = new Writable({
    write(chunk, _enc, cb) {
      logs.push(chunk.toString())
      cb()
    },
  })
  const sidecar = await startSidecar(config, { env: { LATCHKEY_SECRET_CANARY: CANARY, ...env }, logDestination: destination, ...opts })
  return {
    sidecar,
    config,
    logs,
    auditPath,
    proxy: sidecar.proxyUrl,
    audit: async (atLeast = 0) => {
      const deadline = Date.now() + 2000
      for (;;) {
        await sidecar.audit.flush()
        const events = existsSync(auditPath)
          ? readFileSync(auditPath, 'utf8')
              .split('\n')
              .filter(Boolean)
              .map((l) => JSON.parse(l) as Record<string, unknown>)
          : []
        if (events.length >= atLeast || Date.now() > deadline) return events
        await new Promise((r) => setTimeout(r, 10))
      }
    },
    close: () => sidecar.close(),
  }
}

/** A TCP upstream that keeps every connection it accepts, says when each one closed, and counts the bytes all of them were sent. */
export async function startTcpUpstream(t: { teardown(fn: () => unknown): void }, onSocket: (s: Socket) => void = () => {}) {
  const sockets: Socket[] = []
  const closed: Socket[] = []
  let bytes = 0
  const server = createNetServer((s) => {
    sockets.push(s)
    s.on('error', () => {})
    s.on('close', () => closed.push(s))
    s.on('data', (d: Buffer) => (bytes += d.length))
    onSocket(s)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as AddressInfo).port
  t.teardown(() => {
    for (const s of sockets) s.destroy()
    server.close()
  })
  return { port, sockets, closed, bytes: () => bytes }
}

/** Opens a CONNECT tunnel to `host`:`port` (127.0.0.1 unless named); resolves once the 200 is read. */
export async function openTunnel(sidecarPort: number, port: number, host = '127.0.0.1'): Promise<{ sock: Socket; received: () => Buffer }> {
  const sock = connect(sidecarPort, '127.0.0.1')
  await once(sock, 'connect')
  const chunks: Buffer[] = []
  sock.on('data', (d: Buffer) => chunks.push(d))
  sock.on('error', () => {})
  sock.write(`CONNECT ${host}:${port} HTTP/1.1\r\nHost: ${host}:${port}\r\n\r\n`)
  while (!Buffer.concat(chunks).includes('\r\n\r\n')) await new Promise((r) => setTimeout(r, 5))
  const head = Buffer.concat(chunks).toString('latin1')
  if (!head.startsWith('HTTP/1.1 200 ')) throw new Error(`tunnel refused: ${head}`)
  const start = Buffer.concat(chunks).indexOf('\r\n\r\n') + 4
  return { sock, received: () => Buffer.concat(chunks).subarray(start) }
}

export interface RawResponse {
  raw: string
  status: number
  headers: Record<string, string>
  body: string
}

export function parseRawResponse(raw: string): RawResponse {
  const end = raw.indexOf('\r\n\r\n')
  const head = end === -1 ? raw : raw.slice(0, end)
  const [statusLine, ...lines] = head.split('\r\n')
  const headers: Record<string, string> = {}
  for (const l of lines) {
    const i = l.indexOf(':')
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim()
  }
  return { raw, status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine ?? '')?.[1] ?? 0), headers, body: end === -1 ? '' : raw.slice(end + 4) }
}

/** The response to a request sent inside a plaintext tunnel: what follows its CONNECT's 200. */
export function insideTunnel(r: RawResponse): RawResponse {
  return parseRawResponse(r.raw.replace(/^HTTP\/1\.1 200 Connection Established\r\n\r\n/, ''))
}

/** Writes bytes to the sidecar and collects everything until it closes or goes quiet. */
export async function rawRequest(port: number, data: string | Buffer, quietMs = 300): Promise<RawResponse> {
  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  socket.write(data)
  const chunks: Buffer[] = []
  await new Promise<void>((resolve) => {
    let timer = setTimeout(done, quietMs * 5)
    function done() {
      socket.destroy()
      resolve()
    }
    socket.on('data', (c: Buffer) => {
      chunks.push(c)
      clearTimeout(timer)
      timer = setTimeout(done, quietMs)
    })
    socket.on('close', () => {
      clearTimeout(timer)
      resolve()
    })
    socket.on('error', () => {})
  })
  return parseRawResponse(Buffer.concat(chunks).toString('latin1'))
}

/** Everything a test run could have shown anyone: logs, audit file and given bodies. */
export function assertNoCanary(t: { notOk(v: unknown, m: string): unknown }, s: TestSidecar, ...bodies: string[]): void {
  t.notOk(s.logs.some((l) => l.includes(CANARY)), 'no log line contains the credential')
  const audit = existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : ''
  t.notOk(audit.includes(CANARY), 'no audit event contains the credential')
  t.notOk(bodies.some((b) => b.includes(CANARY)), 'no response the agent saw contains the credential')
}

/** The policy most tests use: allow the given upstream ports on loopback, with network allow. */
export function loopbackPolicy(ports: number[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    policy: { default: 'deny', rules: [{ id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1', 'localhost'], ports }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports }] },
    ...extra,
  }
}

/**
 * One recording upstream and a sidecar allowing it (loopbackPolicy) and injecting the canary as
 * its bearer, both torn down with the test. `fragment` adds to (or overrides) the sidecar's
 * config, given the upstream so it can name it (a route to `upstream.origin`, say).
 */
export async function startBearerRig(
  t: { teardown(fn: () => unknown): void },
  o: { handler?: NonNullable<Parameters<typeof startUpstream>[0]>['handler']; fragment?: (upstream: Upstream) => Record<string, unknown> } = {},
) {
  const upstream = await startUpstream(o.handler ? { handler: o.handler } : {})
  const s = await startTestSidecar({
    ...loopbackPolicy([upstream.port]),
    credentials: [{ id: 'up', audience: upstream.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
    ...o.fragment?.(upstream),
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  return { upstream, s, host: `127.0.0.1:${upstream.port}` }
}

/**
 * A bearer rig (above) whose `/slow…` paths answer "late" after `delayMs`: a response still owed
 * while more requests arrive on the connection.
 */
export function startSlowCallRig(t: { teardown(fn: () => unknown): void }, delayMs: number, sidecar: Record<string, unknown> = {}) {
  return startBearerRig(t, {
    handler: (req, res) => {
      if (!req.url.startsWith('/slow')) return false
      const answer = setTimeout(() => res.writeHead(200, { 'content-type': 'text/plain' }).end('late'), delayMs)
      // A call cut before its answer: the test is over, and must not wait out delayMs to exit.
      res.once('close', () => clearTimeout(answer))
      return true
    },
    fragment: () => ({ sidecar }),
  })
}

/**
 * Starts `upstream` on a free loopback port, and a sidecar that allows it and injects the canary
 * as its bearer; both torn down with the test (the upstream's open connections with it).
 */
export async function sidecarInFrontOf(t: { teardown(fn: () => unknown): void }, upstream: Server | NetServer) {
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  const port = (upstream.address() as AddressInfo).port
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [port] }] },
    credentials: [{ id: 'up', audience: `http://127.0.0.1:${port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    if ('closeAllConnections' in upstream) upstream.closeAllConnections()
    upstream.close()
  })
  return { port, s }
}

/** A task opened on the sidecar's admin API: its handle, its ID, and the Proxy-Authorization naming it. */
export async function openTask(s: TestSidecar, purpose = 'test', durationS = 60): Promise<{ handle: string; id: string; proxyAuthorization: string }> {
  const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose, duration_s: durationS }) })
  if (res.status !== 201) throw new Error(`task not opened: ${res.status}`)
  const { task, id } = (await res.json()) as { task: string; id: string }
  return { handle: task, id, proxyAuthorization: `Basic ${Buffer.from(`task:${task}`).toString('base64')}` }
}
