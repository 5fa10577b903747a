// Broker + sidecar + a resource server that verifies the broker's JWTs, all real, for the
// credential-lifecycle tests.
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { createRemoteJWKSet, jwtVerify, type JWTPayload } from 'jose'
import { startTestBroker, API, type TestBroker } from './broker.js'
import { startTestSidecar, loopbackPolicy, type TestSidecar } from './harness.js'
import type { SidecarOptions } from '../../proxy/sidecar.js'

export const AGENT = 'agent:summarizer:prod:e2e'

export interface ResourceServer {
  origin: string
  port: number
  /** Verified claims of every request, or the verification error. */
  seen: ({ claims: JWTPayload } | { error: string })[]
  /** Raw bearer tokens received, to compare with what agents saw. */
  tokens: string[]
  close(): Promise<void>
}

/** An API that trusts the broker: verifies each bearer JWT against its JWKS, issuer and audience. */
export async function startResourceServer(broker: TestBroker, audience = API): Promise<ResourceServer> {
  const jwks = createRemoteJWKSet(new URL(`${broker.url}/.well-known/jwks.json`))
  const seen: ResourceServer['seen'] = []
  const tokens: string[] = []
  const server: Server = createServer((req, res) => {
    req.resume()
    const auth = req.headers.authorization ?? ''
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : ''
    tokens.push(token)
    jwtVerify(token, jwks, { issuer: broker.issuer, audience, typ: 'at+jwt' }).then(
      ({ payload }) => {
        seen.push({ claims: payload })
        // Answers with the claims, as an API might echo who called it, but never the token.
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ sub: payload.sub, act: payload.act, scope: payload.scope }))
      },
      (err: Error) => {
        seen.push({ error: err.constructor.name })
        res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"invalid_token"}')
      },
    )
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    origin: `http://127.0.0.1:${port}`,
    port,
    seen,
    tokens,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}

export interface TokenRig {
  broker: TestBroker
  api: ResourceServer
  sidecar: TestSidecar
  /** Opens a task on the sidecar's local API. */
  openTask(body: Record<string, unknown>): Promise<{ status: number; body: Record<string, unknown> }>
  close(): Promise<void>
}

export async function startTokenRig(
  opts: { sidecar?: Record<string, unknown>; sidecarOptions?: Omit<SidecarOptions, 'env' | 'logDestination'>; broker?: TestBroker; brokerUrl?: string; /** The binding's scopes: ['read'] unless given; none asks for what the registry allows. */ scopes?: string[] } = {},
): Promise<TokenRig> {
  const broker = opts.broker ?? (await startTestBroker())
  const api = await startResourceServer(broker)
  const sidecarFragment = (opts.sidecar ?? {}) as Record<string, unknown>
  const sidecar = await startTestSidecar(
    {
      ...loopbackPolicy([api.port]),
      ...sidecarFragment,
      sidecar: {
        agent_id: AGENT,
        broker: { url: opts.brokerUrl ?? broker.url, timeout_ms: 1000, ...((sidecarFragment.sidecar as { broker?: object } | undefined)?.broker ?? {}) },
        attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } },
      },
      credentials: [{ id: 'api', audience: api.origin, source: 'broker', token_audience: API, ...((opts.scopes ?? ['read']).length > 0 ? { scopes: opts.scopes ?? ['read'] } : {}), inject: { type: 'bearer' } }],
    },
    {},
    opts.sidecarOptions ?? {},
  )
  return {
    broker,
    api,
    sidecar,
    async openTask(body) {
      const res = await fetch(`${sidecar.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
      return { status: res.status, body: (await res.json()) as Record<string, unknown> }
    },
    async close() {
      await sidecar.close()
      await api.close()
      await broker.close()
    },
  }
}
