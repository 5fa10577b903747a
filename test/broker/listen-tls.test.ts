// The broker's HTTP listener over TLS (broker.listen.tls): the token exchange carries workload
// evidence and user tokens, so off loopback it is served over HTTPS.
import t from 'tap'
import { join } from 'node:path'
import { Agent, request } from 'undici'
import { startTestBroker } from '../helpers/broker.js'
import { testPki } from '../helpers/tls.js'

t.test('broker.listen.tls serves the broker over HTTPS, and nothing over plain HTTP', async (t) => {
  const pki = testPki()
  const b = await startTestBroker({ broker: { listen: { host: '127.0.0.1', port: 0, tls: { cert_file: join(pki.dir, 'leaf.pem'), key_file: join(pki.dir, 'leaf.key') } } } })
  t.teardown(() => b.close())
  t.match(b.url, /^https:\/\/127\.0\.0\.1:\d+$/, 'its URL says https')
  const trusting = new Agent({ connect: { ca: pki.ca } })
  t.teardown(() => trusting.close())
  const jwks = await request(`${b.url}/.well-known/jwks.json`, { dispatcher: trusting })
  t.equal(jwks.statusCode, 200)
  t.ok(((await jwks.body.json()) as { keys: unknown[] }).keys.length > 0, 'the signing keys, over TLS')
  const plain = await request(b.url.replace('https:', 'http:') + '/.well-known/jwks.json').then(
    async (r) => `HTTP ${r.statusCode} ${await r.body.text()}`.slice(0, 80),
    (err: Error & { code?: string }) => err.code ?? err.message,
  )
  t.notMatch(plain, /keys/, `plain HTTP gets no keys (${plain})`)
  const untrusting = await request(`${b.url}/.well-known/jwks.json`).catch((err: Error & { code?: string }) => err.code)
  t.match(untrusting, /UNABLE_TO_VERIFY|SELF_SIGNED|DEPTH_ZERO/, 'a client without its CA refuses it')
})
