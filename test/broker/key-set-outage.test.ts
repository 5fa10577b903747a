// A key set the broker fetches (the user IdP's or an attestor's jwks_url) that cannot be had is
// the broker's side failing, not the client's request: 503 temporarily_unavailable, which the
// sidecar reads as "try again" (503 LK_CREDENTIAL_UNAVAILABLE, retryable), not 400 (a refusal the agent takes as
// final). Real HTTP servers play the IdP, down, failing, hanging and then serving.
import t from 'tap'
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { startTestBroker, delegatedRequest, why, K8S_ISSUER, USER_ISSUER, API } from '../helpers/broker.js'
import { TestIssuer } from '../helpers/issuer.js'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'
import type { BrokerEvent, ExchangeEvent } from '../../broker/events.js'

const exchanges = (events: BrokerEvent[]) => events.filter((e): e is ExchangeEvent => e.type === 'token.exchange')

type Mode = 'serve' | 'fail' | 'not-json' | 'hang'

/** A JWKS endpoint whose behaviour the test switches; it can also be closed and reopened on its port. */
async function keySetServer(issuer: TestIssuer): Promise<{ url: string; mode: (m: Mode) => void; down: () => Promise<void>; up: () => Promise<void>; close: () => Promise<void> }> {
  let mode: Mode = 'serve'
  const make = () =>
    createServer((_req, res) => {
      if (mode === 'hang') return
      if (mode === 'fail') return void res.writeHead(500).end('upstream trouble')
      if (mode === 'not-json') return void res.writeHead(200, { 'content-type': 'text/html' }).end('<html>maintenance</html>')
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(issuer.jwks))
    })
  let server: Server = make()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  const stop = () =>
    new Promise<void>((resolve) => {
      server.closeAllConnections()
      server.close(() => resolve())
    })
  return {
    url: `http://127.0.0.1:${port}/jwks.json`,
    mode: (m) => (mode = m),
    down: stop,
    up: async () => {
      server = make()
      await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
    },
    close: () => (server.listening ? stop() : Promise.resolve()),
  }
}

t.test("the user IdP's key set down, failing or not a key set: 503 temporarily_unavailable, then served once it is back", async (t) => {
  const idp = await TestIssuer.create(USER_ISSUER, 'RS256')
  const jwks = await keySetServer(idp)
  t.teardown(jwks.close)
  await jwks.down()
  const b = await startTestBroker({ broker: { users: { issuer: USER_ISSUER, audience: 'latchkey', jwks_url: jwks.url } } })
  t.teardown(b.close)
  const request = async () => b.exchange(delegatedRequest(await idp.sign({ sub: 'alice@example.com', aud: 'latchkey', scope: 'read' }), await b.attest('agent:summarizer:prod:1')))

  for (const [state, set] of [
    ['nothing listening', async () => {}],
    ['HTTP 500', async () => (await jwks.up(), jwks.mode('fail'))],
    ['an HTML page', async () => jwks.mode('not-json')],
  ] as const) {
    await set()
    const res = await request()
    t.equal(res.status, 503, `${state}: ${why(res)}`)
    t.equal(res.body.error, 'temporarily_unavailable', state)
    t.equal(res.body.error_description, 'subject_token: the key set to verify it could not be fetched; try again later', state)
    t.notMatch(res.text, /127\.0\.0\.1|jwks/, `${state}: the key set's address is not the client's business`)
    t.equal(res.headers.get('cache-control'), 'no-store')
  }
  const reasons = exchanges(b.events).filter((e) => e.outcome !== 'granted').map((e) => e.reason)
  t.match(reasons[0], /^subject_token: key set unavailable \(ECONNREFUSED\)$/, 'the operator sees why in the event')
  t.match(reasons[1], /^subject_token: key set unavailable \(Expected 200 OK/)

  jwks.mode('serve')
  const ok = await request()
  t.equal(ok.status, 200, `served once the key set is: ${why(ok)}`)

  // A token that is wrong stays the client's fault with the key set at hand.
  const forged = await b.exchange(delegatedRequest(idp.hs256WithPublicKey({ sub: 'alice@example.com', aud: 'latchkey', scope: 'read' }), await b.attest('agent:summarizer:prod:1')))
  t.equal(forged.status, 400, why(forged))
  t.equal(forged.body.error, 'invalid_request')
})

t.test("an attestor's key set that does not answer in time: 503 for the actor_token, not a refusal", async (t) => {
  const cluster = await TestIssuer.create(K8S_ISSUER)
  const jwks = await keySetServer(cluster)
  t.teardown(jwks.close)
  jwks.mode('hang')
  const b = await startTestBroker({ broker: { attestors: { kubernetes: { issuer: K8S_ISSUER, jwks_url: jwks.url } } } })
  t.teardown(b.close)
  const evidence = await cluster.sign({
    aud: b.issuer,
    sub: 'system:serviceaccount:agents:summarizer',
    'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name: 'summarizer-abc', uid: 'p' } },
  })
  const params = { grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange', subject_token: evidence, subject_token_type: TOKEN_TYPES.jwt, audience: API, task_id: 't1' }
  const started = Date.now()
  const res = await b.exchange(params)
  t.equal(res.status, 503, why(res))
  t.equal(res.body.error, 'temporarily_unavailable')
  t.equal(res.body.error_description, 'subject_token: the key set to verify it could not be fetched; try again later')
  t.ok(Date.now() - started < 8_000, 'within the fetch timeout')
  t.match(exchanges(b.events).at(-1)?.reason, /^subject_token: key set unavailable \(timed out\)$/)

  jwks.mode('serve')
  const ok = await b.exchange(params)
  t.equal(ok.status, 200, why(ok))
})
