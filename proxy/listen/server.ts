// The listener: one node:http server, three entry paths. Absolute-form and origin-form requests
// go to the pipeline; CONNECT to the tunnel; Upgrade to the WebSocket relay. Parser errors get
// the same coded refusal as everything else (400; a head too large, 431), and are audited.
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import { createServer, parserReason } from '../../lib/node-http.js'
import { headWithoutH2cOffer, offersOnlyH2c } from './h2c.js'
import { serveOn } from './serve-on.js'
import { isLoopbackPeer } from './local-caller.js'
import { trackConnections } from './cap.js'
import type { Socket } from 'node:net'
import { owedResponse, type Pipeline, type TunnelOrigin } from '../pipeline.js'
import { LatchkeyError, type ErrorCode } from '../errors.js'
import type { CallContext } from '../context.js'
import { handleConnect } from './tunnel.js'
import { handleUpgrade } from './upgrade.js'
import { abortChunkedForward } from '../forward/forward.js'

/** Request line and headers, together: past it a 431 LK_HEADERS_TOO_LARGE, audited. */
export const MAX_HEADER_BYTES = 16 * 1024

export interface ListenerOptions {
  allowRemoteClients: boolean
  clientHeadersTimeoutMs: number
  connectTimeoutMs: number
  tunnelIdleMs: number
  /** The upstream's answer to a WebSocket handshake (undici times every other response's head). */
  upstreamHeadersMs: number
}

/**
 * How often node:http looks for connections past their header timeout (its default, 30 s, let a
 * 2 s client_headers_ms hold a silent connection for up to 30 s): often enough that the cut
 * comes within a quarter of the setting past it.
 */
export function headersCheckInterval(clientHeadersTimeoutMs: number): number {
  return Math.min(30_000, Math.max(250, Math.floor(clientHeadersTimeoutMs / 4)))
}

export interface Listener {
  server: Server
  openStreams: Set<Socket>
  /**
   * Closes the connections with no request being read or answered: the listener's keep-alive ones
   * and idle plaintext tunnels (an admitted one recorded as cut with `code`: closed on purpose).
   */
  closeIdleConnections: (code: ErrorCode, reason: string) => void
  /** Closes the listener's connections that never sent a byte (shutdown only: closeIdleConnections leaves them). */
  closeUnused: () => void
  /** The proxy port's open connections, oldest first (cap.ts trackConnections). */
  connections: Set<Socket>
  /** Plaintext tunnels whose CONNECT is a live call (a cut reaches it), which is no call in flight: the requests inside are. */
  heldTunnels: () => number
  /** Whether the socket is a plaintext tunnel's, read by the inner server (a call, whatever its parser holds). */
  inTunnel: (socket: Socket) => boolean
}

export function createListener(pipeline: Pipeline, opts: ListenerOptions): Listener {
  const openStreams = new Set<Socket>()
  const relayTimeouts = { connectTimeoutMs: opts.connectTimeoutMs, idleMs: opts.tunnelIdleMs, headersMs: opts.upstreamHeadersMs }
  const serverOptions = {
    // Explicit, so a process-wide --insecure-http-parser cannot loosen the sidecar's parser.
    insecureHTTPParser: false,
    // node's default, pinned: --max-http-header-size (NODE_OPTIONS) would otherwise let one
    // connection hand the parser megabytes of header lines, each held as a string.
    maxHeaderSize: MAX_HEADER_BYTES,
    // Checked by checkFraming instead, so a missing Host gets the coded, audited 400.
    requireHostHeader: false,
    headersTimeout: opts.clientHeadersTimeoutMs,
    connectionsCheckingInterval: headersCheckInterval(opts.clientHeadersTimeoutMs),
    requestTimeout: 0,
    keepAliveTimeout: 5_000,
    noDelay: true,
  }
  const server = createServer(serverOptions)
  // node:http keeps the first 2,000 header lines and silently drops the rest, Content-Length
  // included, and the body with it. The header size limit bounds them instead.
  server.maxHeadersCount = 0
  server.on('connection', (socket: Socket) => {
    if (!opts.allowRemoteClients && !isLoopbackPeer(socket.remoteAddress)) socket.destroy()
  })
  // Every open connection: for the cap (oldest first), and for closeUnused at shutdown: node's
  // closeIdleConnections (Node 20) takes a connection for idle only once a request has been read
  // on it, so one opened and never used (Node's fetch opens a fresh one after an agent aborts a
  // stream) held the drain to drain_ms.
  const connections = trackConnections(server)
  server.on('request', (req, res) => pipeline.handleRequest(req, res, false))
  // node:http takes any Expect that mentions 100-continue (`100-continue, foo`) for it: an
  // expectation besides it cannot be met either, so only the exact value is.
  const onContinue = (req: IncomingMessage, res: ServerResponse, tunnel: TunnelOrigin | null) =>
    String(req.headers.expect).trim().toLowerCase() === '100-continue' ? pipeline.handleRequest(req, res, true, tunnel) : pipeline.handleUnmetExpectation(req, res, tunnel)
  server.on('checkContinue', (req, res) => onContinue(req, res, null))
  server.on('checkExpectation', (req, res) => pipeline.handleUnmetExpectation(req, res))
  // Plain HTTP found inside a CONNECT tunnel is parsed by a second, never-listening server with
  // the same strict options; each socket remembers the origin its tunnel was opened for.
  const tunnels = new WeakMap<Socket, TunnelOrigin>()
  // Every plaintext tunnel open, with its CONNECT's context (for the metrics and the shutdown).
  const adopted = new Map<Socket, CallContext>()
  const inner = createServer(serverOptions)
  inner.maxHeadersCount = 0
  // node:http times request heads (headersTimeout, checked every connectionsCheckingInterval) only
  // on a server that has listened: it tracks connections from its 'listening' event on. The inner
  // server never listens, so a tunnel's half-sent head, or one trickled a byte a second, held its
  // connection (and a slot of the listener's limit) for ever. Told it is listening, it times them
  // as the listener does.
  inner.emit('listening')
  inner.on('request', (req, res) => pipeline.handleRequest(req, res, false, tunnels.get(req.socket) ?? null))
  inner.on('checkContinue', (req, res) => onContinue(req, res, tunnels.get(req.socket) ?? null))
  inner.on('checkExpectation', (req, res) => pipeline.handleUnmetExpectation(req, res, tunnels.get(req.socket) ?? null))
  inner.on('connect', (req, socket: Socket) => {
    if (pipeline.refusePipelinedTakeover(req, socket, 'tunnelled')) return
    const ctx = pipeline.newContext('tunnelled', 'CONNECT')
    pipeline.refuseSocket(ctx, socket, new LatchkeyError('LK_BAD_REQUEST', 'CONNECT inside a CONNECT tunnel is not supported'))
  })
  inner.on('upgrade', (req, socket: Socket, head: Buffer) => {
    const origin = tunnels.get(socket)
    // Every socket the inner server sees was adopted with its origin; one without is not served.
    if (!origin) return void socket.destroy()
    if (offersOnlyH2c(req)) parseAgain(inner, req, socket, head)
    else handleUpgrade(pipeline, req, socket, head, relayTimeouts, openStreams, origin)
  })
  inner.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => onClientError(err, socket, 'tunnelled'))
  const tunnelOptions = {
    ...relayTimeouts,
    open: openStreams,
    adoptPlaintext: (socket: Socket, origin: TunnelOrigin, first: Buffer, ctx: CallContext) => {
      tunnels.set(socket, origin)
      adopted.set(socket, ctx)
      socket.once('close', () => adopted.delete(socket))
      serveOn(inner, socket, first)
    },
  }
  server.on('connect', (req, socket: Socket, head: Buffer) => handleConnect(pipeline, req, socket, head, tunnelOptions))
  server.on('upgrade', (req, socket: Socket, head: Buffer) => (offersOnlyH2c(req) ? parseAgain(server, req, socket, head) : handleUpgrade(pipeline, req, socket, head, relayTimeouts, openStreams)))
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => onClientError(err, socket, 'absolute'))
  const closeIdleConnections = (code: ErrorCode, reason: string) => {
    server.closeIdleConnections()
    // The inner server tracks its connections (it was told it listens): node's own test of idleness
    // (no head or body being read, no response owed) picks the tunnels it destroys. A tunnel is an
    // admitted call (a tunnel to the sidecar itself is not): closed by the sidecar, it is recorded
    // so, where a tunnel its agent closed is not (tunnel.ts, handOver). Allocates only when called.
    const open = [...adopted.keys()].filter((socket) => !socket.destroyed)
    inner.closeIdleConnections()
    for (const socket of open) if (socket.destroyed) pipeline.endHeldTunnel(adopted.get(socket)!, code, reason)
  }
  /** Closes the connections that have not sent a byte: no request is being read or answered on them. */
  const closeUnused = () => {
    for (const socket of connections) if (socket.bytesRead === 0) socket.destroy()
  }
  // Read at scrape time only: the hot path keeps no count of its own.
  const heldTunnels = () => {
    let n = 0
    for (const ctx of adopted.values()) if (ctx.liveSocket !== null) n++
    return n
  }
  return { server, openStreams, closeIdleConnections, closeUnused, connections, heldTunnels, inTunnel: (socket) => tunnels.has(socket) }

  /** An h2c offer declined (listen/h2c.ts): the request, without it, and what followed it, parsed again as plain HTTP/1.1 on the same connection. */
  function parseAgain(into: Server, req: IncomingMessage, socket: Socket, head: Buffer): void {
    socket.pause()
    // Pipelined behind a response still being written, the offer waits for it: the connection's
    // first parser owns that response until it ends, and two on one socket answer out of order
    // (node asserts, and the process exits).
    const owed = owedResponse(socket)
    if (owed !== null && !owed.writableFinished) {
      owed.once('finish', () => setImmediate(() => parseAgain(into, req, socket, head)))
      return
    }
    if (socket.destroyed) return
    // The first parser's keep-alive timer, set as that response ended, is not the new one's to keep.
    socket.setTimeout(0)
    serveOn(into, socket, Buffer.concat([headWithoutH2cOffer(req), head]))
  }

  function onClientError(err: NodeJS.ErrnoException, socket: Socket, via: 'absolute' | 'tunnelled'): void {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy()
      return
    }
    const inFlight = owedResponse(socket)
    if (err.code === 'HPE_CLOSED_CONNECTION') return void afterClose(err as ParserError, socket, inFlight, via)
    // The agent left part-way through a request head: nothing to answer, and nothing malformed.
    if (err.code === 'HPE_INVALID_EOF_STATE' && inFlight === null) {
      pipeline.recordRefused(pipeline.newContext(via, 'UNKNOWN'), new LatchkeyError('LK_CLIENT_CLOSED', 'the agent closed the connection before its request head was complete'))
      return void socket.destroy()
    }
    const e = parserRefusal(err)
    // A complete call still being answered, not a refusal: it ends in its own time (its timeouts
    // bound it), and only then the connection.
    const answering = inFlight !== null && inFlight.req.complete && !pipeline.closingSockets.has(socket)
    let left = false
    if (inFlight && !pipeline.closingSockets.has(socket)) {
      if (!inFlight.req.complete) {
        // The parser met the end of the stream mid-body: the agent left (a FIN: see "A client's
        // FIN ends its calls in flight"). Its connection is closed now, which ends the call,
        // forwarded or still being admitted, as the agent's hang-up, and stops the upstream at
        // once (ResponseRelay, dispatchAfterWait); left to the timer below, a Content-Length
        // upload, whose forward is not tracked, held the upstream a second longer.
        if (err.code === 'HPE_INVALID_EOF_STATE') left = !inFlight.headersSent
        // The in-flight request's own chunked body is malformed, found after its head went to the
        // pipeline: its forward is aborted and it is refused with this 400 instead of hanging.
        else if (!inFlight.headersSent) abortChunkedForward(inFlight.req, new LatchkeyError('LK_BAD_REQUEST', `malformed request body (${err.code ?? 'parse error'})${parserReason(err as ParserError)}`))
      } else if (!pipeline.queuedBodyIncomplete(socket)) {
        // A new request, malformed, behind one still being answered: it cannot be answered in
        // order, so it is recorded, and the connection ends after the owed response. (Bytes
        // that are the body of a queued request are that request's: it is recorded as not sent.)
        // Status 0: no 400 goes (the owed response goes, then the close).
        pipeline.recordNotSent(pipeline.newContext(via, 'UNKNOWN'), e.code, `${e.reason}; not answered: it came behind a call still being answered, and the connection closes after that one`)
      }
    }
    // Otherwise the refusal of the request these bytes belong to is written or under way, and
    // audited. Whatever is still queued on this connection behind them is never sent.
    if (inFlight) pipeline.closingSockets.add(socket)
    if (left) return void socket.destroy()
    if (pipeline.closingSockets.has(socket) || inFlight) {
      if (!inFlight || inFlight.writableFinished) socket.destroySoon()
      else inFlight.once('finish', () => socket.destroy())
      // A refusal being written to a client that does not read it does not hold the socket.
      if (!answering) setTimeout(() => socket.destroy(), 1_000).unref()
      return
    }
    const ctx = pipeline.newContext(via, 'UNKNOWN')
    pipeline.refuseSocket(ctx, socket, e)
  }

  /**
   * Bytes after a request that closes its connection (`Connection: close`, HTTP/1.0 without
   * keep-alive): RFC 9112 §9.6, no further request is read there. What they began is recorded as
   * not sent (status 0: no response goes), not as a malformed request answered 400, which it
   * need not be and was not; a line break or two left after a body (RFC 9112 §2.2) not at all.
   */
  function afterClose(err: ParserError, socket: Socket, inFlight: ServerResponse | null, via: 'absolute' | 'tunnelled'): void {
    const rest = err.rawPacket?.subarray(err.bytesParsed ?? 0)
    if (rest === undefined || !ONLY_LINE_BREAKS.test(rest.toString('latin1'))) {
      pipeline.recordNotSent(pipeline.newContext(via, 'UNKNOWN'), 'LK_BAD_REQUEST', 'not sent: it came after a request that closes the connection (Connection: close, or HTTP/1.0 without keep-alive)')
    }
    pipeline.closingSockets.add(socket)
    if (!inFlight || inFlight.writableFinished) socket.destroySoon()
    else inFlight.once('finish', () => socket.destroySoon())
  }
}

const ONLY_LINE_BREAKS = /^[\r\n]*$/

/** What node:http's parser refused (its clientError), as the coded refusal both ports answer with. */
export function parserRefusal(err: NodeJS.ErrnoException): LatchkeyError {
  if (err.code === 'HPE_HEADER_OVERFLOW') return new LatchkeyError('LK_HEADERS_TOO_LARGE', `request headers too large (request line and headers over ${MAX_HEADER_BYTES} bytes)`)
  if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') return new LatchkeyError('LK_REQUEST_TIMEOUT', 'the request line and headers did not all arrive within timeouts.client_headers_ms')
  // curl --http2-prior-knowledge, gRPC without TLS: said in words (the audit read llhttp's code).
  if (err.code === 'HPE_PAUSED_H2_UPGRADE') return new LatchkeyError('LK_BAD_REQUEST', 'an HTTP/2 connection preface (prior knowledge): this sidecar serves HTTP/1.1 only, so send HTTP/1.1 (an h2c upgrade offer is answered in HTTP/1.1)')
  if (err.code === 'HPE_INVALID_URL') return new LatchkeyError('LK_BAD_REQUEST', `malformed HTTP request (HPE_INVALID_URL): ${invalidTargetReason(err as ParserError)}`)
  return new LatchkeyError('LK_BAD_REQUEST', `malformed HTTP request (${err.code ?? 'parse error'})${parserReason(err as ParserError)}`)
}

/** What node:http's clientError carries: the chunk being parsed, and where in it the parser stopped. */
type ParserError = NodeJS.ErrnoException & { rawPacket?: Buffer; bytesParsed?: number; reason?: string }

/**
 * Why llhttp refused the request target, told by the byte it stopped at. (Pure ASCII: the reason
 * also goes into the status line, where anything else shows as `?`.)
 */
function invalidTargetReason(err: ParserError): string {
  const at = err.rawPacket && err.bytesParsed !== undefined && err.bytesParsed < err.rawPacket.length ? err.rawPacket[err.bytesParsed]! : -1
  // curl percent-encodes a path for a server but sends a proxy raw UTF-8 (`?q=café`): the agent is told how to send it.
  if (at >= 0x80 || (at >= 0 && at < 0x20) || at === 0x7f) {
    return 'the request target holds a byte a URL may not carry as sent (beyond ASCII, or a control character); percent-encode its UTF-8 bytes (U+00E9 is %C3%A9)'
  }
  if (at === 0x23) return 'the request target holds a fragment (#...), which is never sent to a server; leave it out'
  // `http:/host`, `http:host`, `http//host`, `http:\\host`, `host/path`: llhttp's "Unexpected char in url schema".
  if (err.reason?.includes('schema')) return 'the request target must be a path (/...) or an absolute URL beginning http:// or https://'
  return 'the request target is not a path or an absolute http:// or https:// URL as HTTP/1.1 spells it (RFC 9112 section 3.2)'
}
