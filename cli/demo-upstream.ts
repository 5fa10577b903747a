// The local upstream `latchkey up` starts so a newcomer has something to call. It reports what
// arrived and whether the credential the sidecar injected is genuine (the demo's static secret,
// or a JWT the broker signed, checked against the broker's JWKS), without ever echoing the
// credential: the agent must not see it, even here.
import type { Server } from 'node:http'
import { createServer } from '../lib/node-http.js'
import { timingSafeEqual } from 'node:crypto'
import { once } from 'node:events'
import { createRemoteJWKSet, jwtVerify } from 'jose'

export interface DemoTrust {
  /** The static secret `latchkey up` generated, as the whole Authorization value. */
  staticAuthorization: string
  /** The broker whose tokens this upstream accepts, and the audience they must carry. */
  broker?: { url: string; issuer: string; audience: string }
}

export async function startDemoUpstream(host: string, port: number, trust: DemoTrust): Promise<Server> {
  const expected = Buffer.from(trust.staticAuthorization)
  const jwks = trust.broker ? createRemoteJWKSet(new URL(`${trust.broker.url}/.well-known/jwks.json`)) : undefined
  const server = createServer((req, res) => {
    req.resume()
    const reply = (fields: Record<string, unknown>) => {
      const body = JSON.stringify({ upstream: 'latchkey demo', method: req.method, path: req.url, ...fields }, null, 2) + '\n'
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body)
    }
    const header = req.headers.authorization ?? ''
    const auth = Buffer.from(header)
    if (auth.length === 0) return reply({ credential: 'none' })
    if (auth.length === expected.length && timingSafeEqual(auth, expected)) return reply({ credential: 'injected by latchkey (verified)' })
    if (!jwks || !header.startsWith('Bearer ')) return reply({ credential: 'present but not the expected one' })
    jwtVerify(header.slice(7), jwks, { issuer: trust.broker!.issuer, audience: trust.broker!.audience }).then(
      ({ payload }) => reply({ credential: 'broker token, injected by latchkey (verified)', sub: payload.sub, act: payload.act, scope: payload.scope }),
      () => reply({ credential: 'present but not the expected one' }),
    )
  })
  server.listen(port, host)
  await once(server, 'listening')
  return server
}
