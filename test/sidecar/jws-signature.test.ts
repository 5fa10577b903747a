// A broker JWT injected as a bearer, echoed back by an upstream as a JWT debugger shows one: its
// header and payload decoded, and the signature segment as it came. The first two are readable by
// anyone; with the third the agent could put the token back together. The signature, short beside
// the whole token, showed too little of it to be overwritten as a cut copy (leastShown), so it is
// a needle of its own: overwritten in a body (as is, or as an echo escapes it), replaced in a header.
import t from 'tap'
import { join } from 'node:path'
import { Client } from 'undici'
import { startTestBroker, API } from '../helpers/broker.js'
import { startUpstream, startTestSidecar, loopbackPolicy } from '../helpers/harness.js'
import { AGENT } from '../helpers/tokens.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { leastShown } from '../../proxy/forward/body-scrub.js'

const decoded = (segment: string) => JSON.parse(Buffer.from(segment, 'base64url').toString()) as Record<string, unknown>

t.test('an upstream echoing a JWT as header, payload and signature: the agent never gets the signature', async (t) => {
  const broker = await startTestBroker()
  const tokens: string[] = []
  const up = await startUpstream({
    handler: (req, res) => {
      const jwt = String(req.headers.authorization).slice('Bearer '.length)
      tokens.push(jwt)
      const [header, payload, signature] = jwt.split('.') as [string, string, string]
      const parts = { header: decoded(header), payload: decoded(payload), signature }
      const body = req.url === '/html' ? `<pre>${JSON.stringify(parts, null, 2).replace(/"/g, '&quot;')}</pre>` : JSON.stringify(parts)
      res.writeHead(200, { 'content-type': req.url === '/html' ? 'text/html' : 'application/json', 'x-jwt-signature': signature, 'x-debug': `alg=${String(decoded(header).alg)} sig=${signature}` }).end(body)
      return true
    },
  })
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    sidecar: { agent_id: AGENT, broker: { url: broker.url }, attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } } },
    credentials: [{ id: 'api', audience: up.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
    await broker.close()
  })
  const task = s.sidecar.tasks.open({ purpose: 'echo', durationS: 120, userToken: await broker.userToken('alice', 'read') })
  for (const path of ['/json', '/html']) {
    const c = new Client(s.proxy)
    const res = await c.request({ method: 'GET', path: `${up.origin}${path}`, headers: { host: up.origin.slice('http://'.length), 'proxy-authorization': `Basic ${Buffer.from(`task:${task.handle}`).toString('base64')}` } })
    const text = await res.body.text()
    await c.close()
    t.equal(res.statusCode, 200, `${path}: answered`)
    const jwt = tokens.at(-1)!
    const signature = jwt.split('.')[2]!
    t.ok(signature.length >= 43 && signature.length < leastShown(jwt.length), `${path}: a signature (${signature.length} characters) shows less of the token (${jwt.length}) than a cut copy must`)
    // Not whole, nor the part of it a cut copy is overwritten at, in the body or the head.
    t.notOk(text.includes(signature.slice(0, leastShown(signature.length))), `${path}: the signature is not in the body`)
    t.notOk(JSON.stringify(res.headers).includes(signature.slice(0, leastShown(signature.length))), `${path}: nor in the head`)
    const body = JSON.parse(path === '/html' ? text.slice(5, -6).replace(/&quot;/g, '"') : text) as { header: Record<string, unknown>; payload: Record<string, unknown>; signature: string }
    t.match(body, { header: { alg: String }, payload: { sub: 'alice' } }, `${path}: the header and payload, not secret, are left as they are`)
    t.notOk(jwt.includes(body.signature), `${path}: the signature the agent got is not the token's`)
    t.equal(res.headers['x-jwt-signature'], '[removed by latchkey: it contained the injected credential]', `${path}: a header holding it is replaced`)
  }
})

t.test('the signature is a needle of its own for a JWS compact token only, under every injector', async (t) => {
  const sig = 'A-b_'.repeat(11)
  const jwt = `eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.${sig}`
  for (const inject of [{ type: 'bearer' }, { type: 'header', name: 'X-Key' }, { type: 'query', name: 'key' }, { type: 'basic', username: 'u' }] as const) {
    const b = compileBinding({ id: 'x', audience: 'https://x.example', source: 'static', secret: 'S', inject })
    const forms = b.encodedForms({ value: jwt, id: 'x', expiresAt: null, scopes: [] })
    t.ok(forms.includes(sig), `${inject.type}: the signature as sent`)
    for (const other of ['sk_live_abcdefghijklmnopqrstuvwxyz', 'a.b.short', 'a.b.c.d.eeeeeeeeeeeeeeeeeeee', 'a..cccccccccccccccccccc']) {
      const last = other.split('.').at(-1)!
      t.notOk(b.encodedForms({ value: other, id: 'x', expiresAt: null, scopes: [] }).includes(last), `${inject.type}: ${other} is not a JWS: no segment of it is looked for alone`)
    }
  }
})
