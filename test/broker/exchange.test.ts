// The done-when of the broker: a standards-following OAuth client (openid-client, not ours)
// discovers the broker by RFC 8414, performs an RFC 8693 exchange, and the JWT it gets verifies
// with jose against the broker's JWKS, carrying exactly the claims the design promises.
import t from 'tap'
import * as oidc from 'openid-client'
import { createRemoteJWKSet, jwtVerify, decodeProtectedHeader } from 'jose'
import { startTestBroker, API, MAIL, delegatedRequest, why } from '../helpers/broker.js'
import { GRANT_TYPE } from '../../broker/exchange.js'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'

t.test('openid-client exchanges a user token + attestation for a task-scoped JWT', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:7a2c91'
  const config = await oidc.discovery(new URL(b.issuer), 'latchkey-sidecar', undefined, oidc.None(), {
    execute: [oidc.allowInsecureRequests],
    algorithm: 'oauth2',
  })
  t.equal(config.serverMetadata().token_endpoint, `${b.issuer}/oauth2/token`, 'RFC 8414 metadata names the token endpoint')

  const userToken = await b.userToken('alice@example.com', 'read write mail.send admin')
  const before = Math.floor(Date.now() / 1000)
  const res = await oidc.genericGrantRequest(config, GRANT_TYPE, {
    subject_token: userToken,
    subject_token_type: TOKEN_TYPES.jwt,
    actor_token: await b.attest(agent),
    actor_token_type: TOKEN_TYPES.local,
    audience: API,
    scope: 'read',
    task_id: 'task-42',
    task_duration: '600',
  })
  t.equal(res.token_type, 'bearer', 'token_type Bearer (openid-client lower-cases it)')
  t.equal(res.issued_token_type, TOKEN_TYPES.accessToken)
  t.equal(res.expires_in, 720, 'expires_in = task duration × 1.2')
  t.equal(res.scope, 'read')

  const jwks = createRemoteJWKSet(new URL(`${b.issuer}/.well-known/jwks.json`))
  const { payload, protectedHeader } = await jwtVerify(res.access_token, jwks, { issuer: b.issuer, audience: API })
  t.equal(protectedHeader.alg, 'ES256')
  t.equal(protectedHeader.typ, 'at+jwt')
  t.ok(protectedHeader.kid, 'signed with a kid')
  t.equal(payload.sub, 'alice@example.com', 'sub = the user')
  t.same(payload.act, { sub: agent }, 'act.sub = the agent instance')
  t.equal(payload.aud, API, 'exactly one audience, as a string')
  t.equal(payload.scope, 'read', 'narrowed to what was asked')
  t.equal(payload.task_id, 'task-42')
  t.match(payload.jti, /^[0-9a-f-]{36}$/)
  t.ok(payload.exp! - payload.iat! === 720 && payload.iat! >= before, 'exp from the task duration')
})

t.test('scopes are the intersection of the user grant and the agent policy', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:1'
  // The user holds write and mail.send but not read; the agent may have read+write on API.
  const res = await b.exchange(delegatedRequest(await b.userToken('bob', 'write mail.send'), await b.attest(agent)))
  t.equal(res.status, 200, why(res))
  t.equal(res.body.scope, 'write', 'read (user lacks) and mail.send (other audience) are dropped')
  t.equal(res.headers.get('cache-control'), 'no-store')
  t.equal(res.headers.get('pragma'), 'no-cache')

  const mail = await b.exchange(delegatedRequest(await b.userToken('bob', 'write mail.send'), await b.attest(agent), { audience: MAIL }))
  t.equal(mail.body.scope, 'mail.send')
})

t.test('an agent without a user gets a token whose subject is itself', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:solo'
  const res = await b.exchange({
    grant_type: GRANT_TYPE,
    subject_token: await b.attest(agent),
    subject_token_type: TOKEN_TYPES.local,
    audience: API,
    task_id: 't-solo',
  })
  t.equal(res.status, 200, why(res))
  const { payload } = await jwtVerify(res.body.access_token as string, createRemoteJWKSet(new URL(`${b.issuer}/.well-known/jwks.json`)), { audience: API })
  t.equal(payload.sub, agent)
  t.same(payload.act, { sub: agent })
  t.equal(payload.scope, 'read write', 'the agent policy alone bounds the scopes')
  t.equal(payload.exp! - payload.iat!, 360, 'default duration 300 s × 1.2')
})

t.test('lifetime: floor, policy maximum, and never beyond the user token', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:life'
  const user = await b.userToken('carol', 'read')
  const short = await b.exchange(delegatedRequest(user, await b.attest(agent), { task_duration: '5' }))
  t.equal(short.body.expires_in, 60, 'never below the 60 s floor')
  const long = await b.exchange(delegatedRequest(user, await b.attest(agent), { task_duration: '800' }))
  t.equal(long.body.expires_in, 900, '800 × 1.2 = 960 is capped at the policy maximum 900')
  const day = await b.exchange(delegatedRequest(user, await b.attest(agent), { task_duration: '86400' }))
  t.equal(day.status, 200, 'a task longer than the type allows a token to live is served...')
  t.equal(day.body.expires_in, 900, '...with a token that lives no longer than that')
  const expiring = await b.userToken('carol', 'read', { exp: Math.floor(Date.now() / 1000) + 100 })
  const capped = await b.exchange(delegatedRequest(expiring, await b.attest(agent), { task_duration: '600' }))
  t.ok((capped.body.expires_in as number) <= 100 && (capped.body.expires_in as number) >= 95, `capped at the user token's expiry (${String(capped.body.expires_in)})`)
})

// RFC 7519 lets a user token's exp be fractional; the token issued from it must still carry whole
// seconds: RFC 6749 clients read expires_in as an integer (Go's x/oauth2 fails on 100.5).
t.test('a user token with a fractional exp yields whole-second exp and expires_in, never past it', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:frac'
  const exp = Math.floor(Date.now() / 1000) + 100.75
  const res = await b.exchange(delegatedRequest(await b.userToken('carol', 'read', { exp }), await b.attest(agent), { task_duration: '600' }))
  t.equal(res.status, 200, why(res))
  const issued = JSON.parse(Buffer.from((res.body.access_token as string).split('.')[1]!, 'base64url').toString()) as { exp: number; iat: number }
  t.ok(Number.isInteger(res.body.expires_in), `expires_in is whole (${String(res.body.expires_in)})`)
  t.ok(Number.isInteger(issued.exp), `exp is whole (${issued.exp})`)
  t.ok(issued.exp <= exp, 'not past the user token')
  // Under a second left (and still within the skew jose allows): refused, not a token living a fraction of one.
  const nearly = await b.userToken('carol', 'read', { exp: Math.floor(Date.now() / 1000) + 0.5 })
  const r2 = await b.exchange(delegatedRequest(nearly, await b.attest(agent)))
  t.equal(r2.status, 400, why(r2))
  t.match(String(r2.body.error_description), /subject_token: expired/)
  t.notOk('access_token' in r2.body)
})

t.test('kubernetes and SPIFFE evidence map to agent instances', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const sa = await b.k8s.sign({
    aud: b.issuer,
    sub: 'system:serviceaccount:agents:summarizer',
    'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u1' }, pod: { name: 'summarizer-5f7d-xk2', uid: 'p1' } },
  })
  const k = await b.exchange(delegatedRequest(await b.userToken('dan', 'read'), sa, { actor_token_type: TOKEN_TYPES.jwt }))
  t.equal(k.status, 200, why(k))
  const kp = JSON.parse(Buffer.from((k.body.access_token as string).split('.')[1]!, 'base64url').toString()) as { act: { sub: string } }
  t.equal(kp.act.sub, 'agent:summarizer-k8s:prod:summarizer-5f7d-xk2', 'instance = pod name')

  const svid = await b.spiffe.sign({ iss: null, aud: [b.issuer], sub: 'spiffe://example.org/agents/summarizer/9f3e' })
  const s = await b.exchange(delegatedRequest(await b.userToken('dan', 'read'), svid, { actor_token_type: TOKEN_TYPES.spiffe }))
  t.equal(s.status, 200, why(s))
  const sp = JSON.parse(Buffer.from((s.body.access_token as string).split('.')[1]!, 'base64url').toString()) as { act: { sub: string } }
  t.equal(sp.act.sub, 'agent:summarizer-spiffe:prod:9f3e')

  // Evidence kept for days is refused (default bounds: a day). Kubernetes by age from iat, which
  // it must carry; an exp years ahead (the API server's extension for legacy clients) is no bar.
  const n = Math.floor(Date.now() / 1000)
  const pod = { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u1' }, pod: { name: 'summarizer-5f7d-xk2', uid: 'p1' } }
  const viaK8s = async (claims: Record<string, unknown>) =>
    b.exchange(delegatedRequest(await b.userToken('dan', 'read'), await b.k8s.sign({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': pod, ...claims }), { actor_token_type: TOKEN_TYPES.kubernetes }))
  const viaSpiffe = async (claims: Record<string, unknown>) =>
    b.exchange(delegatedRequest(await b.userToken('dan', 'read'), await b.spiffe.sign({ iss: null, aud: b.issuer, sub: 'spiffe://example.org/agents/summarizer/9f3e', ...claims }), { actor_token_type: TOKEN_TYPES.spiffe }))
  const refused = (description: string) => ({ status: 400, body: { error: 'invalid_request', error_description: description } })
  t.match(await viaK8s({ iat: n - 86_400 - 120, exp: n + 3600 }), refused('actor_token: issued more than 86400 s ago (iat)'), 'a service-account token issued over a day ago')
  t.match(await viaK8s({ iat: null, exp: n + 10 * 365 * 86_400 }), refused('actor_token: claim "iat" is missing'), 'one without iat, exp 10 years ahead')
  const extended = await viaK8s({ iat: n - 3600, exp: n + 365 * 86_400 })
  t.equal(extended.status, 200, `issued an hour ago, exp extended a year: taken (${why(extended)})`)
  t.match(await viaSpiffe({ iat: n, exp: n + 86_400 + 1 }), refused('actor_token: lifetime (exp - iat) over 86400 s'), 'an SVID minted to live over a day')
  t.match(await viaSpiffe({ iat: null, exp: n + 86_400 + 120 }), refused('actor_token: no iat, and exp is more than 86400 s away'), 'and one without iat expiring over a day from now')
  const short = await viaSpiffe({ iat: null, exp: n + 300 })
  t.equal(short.status, 200, `an SVID without iat (optional in JWT-SVID) living 5 minutes: taken (${why(short)})`)
})

t.test('delegation: an agent may task only the types it is granted, and act chains nest', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const parent = 'agent:summarizer:prod:p'
  const child = 'agent:helper:prod:c'
  const user = await b.userToken('erin', 'read write')
  const del = await b.exchange(delegatedRequest(user, await b.attest(parent), { audience: b.issuer }))
  t.equal(del.status, 200, why(del))
  const res = await b.exchange(delegatedRequest(del.body.access_token as string, await b.attest(child)))
  t.equal(res.status, 200, why(res))
  const { payload } = await jwtVerify(res.body.access_token as string, b.broker.keys.verifier, { audience: API })
  t.equal(payload.sub, 'erin', 'the user stays the subject down the chain')
  t.same(payload.act, { sub: child, act: { sub: parent } }, 'nested act: current actor outermost')
  t.equal(payload.scope, 'read', 'helper may only read')

  // helper may not task anyone; loner's type may not get a delegation token at all.
  const grand = await b.exchange(delegatedRequest(res.body.access_token as string, await b.attest('agent:summarizer:prod:g')))
  t.equal(grand.status, 400)
  t.equal(grand.body.error, 'invalid_request', 'a token for another audience is no delegation')
  const lonerDel = await b.exchange({
    grant_type: GRANT_TYPE,
    subject_token: await b.attest('agent:loner:prod:x'),
    subject_token_type: TOKEN_TYPES.local,
    audience: b.issuer,
    task_id: 't',
  })
  t.equal(lonerDel.status, 400)
  t.equal(lonerDel.body.error, 'invalid_target', 'an agent that may task nobody gets no delegation token')
  // summarizer's delegation used by a type it may not task
  const del2 = await b.exchange(delegatedRequest(user, await b.attest(parent), { audience: b.issuer }))
  const wrong = await b.exchange(delegatedRequest(del2.body.access_token as string, await b.attest('agent:assistant:prod:a')))
  t.equal(wrong.body.error, 'unauthorized_client')
  t.equal(decodeProtectedHeader(del.body.access_token as string).typ, 'at+jwt')
})

t.test('every exchange is an event, granted or refused, and names no token', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const user = await b.userToken('frank', 'read')
  const actor = await b.attest('agent:summarizer:prod:ev')
  const ok = await b.exchange(delegatedRequest(user, actor))
  const replay = await b.exchange(delegatedRequest(user, actor))
  t.equal(ok.status, 200)
  t.equal(replay.status, 400)
  const ex = b.events.filter((e) => e.type === 'token.exchange')
  t.equal(ex.length, 2)
  t.match(ex[0], { outcome: 'granted', agent: 'agent:summarizer:prod:ev', user: 'frank', audience: API, scopes: ['read'], task: 'task-1', attestor: 'local' })
  t.match(ex[1], { outcome: 'refused', error: 'invalid_request', reason: /replayed/ })
  const everything = JSON.stringify(b.events) + b.logs()
  for (const secret of [user, actor, ok.body.access_token as string]) {
    t.notOk(everything.includes(secret.split('.')[2]!), 'no token signature in events or logs')
  }
})

t.test('a verified user token is reused only while it is valid', async (t) => {
  let clock = Date.now()
  const b = await startTestBroker({ now: () => clock })
  t.teardown(b.close)
  const user = await b.userToken('gina', 'read', { exp: Math.floor(clock / 1000) + 120 })
  const first = await b.exchange(delegatedRequest(user, await b.attest('agent:summarizer:prod:c1')))
  t.equal(first.status, 200, why(first))
  clock += 200_000 // past exp + 30 s skew: the cached verification must not outlive the token
  const later = await b.exchange(delegatedRequest(user, await b.attest('agent:summarizer:prod:c1')))
  t.equal(later.status, 400)
  t.equal(later.body.error_description, 'subject_token: expired')
})

t.test('EdDSA signing keys work end to end', async (t) => {
  const b = await startTestBroker({ broker: { keys: { alg: 'EdDSA' } } })
  t.teardown(b.close)
  const res = await b.exchange(delegatedRequest(await b.userToken('h', 'read'), await b.attest('agent:summarizer:prod:ed')))
  t.equal(res.status, 200, why(res))
  const jwks = (await (await fetch(`${b.url}/.well-known/jwks.json`)).json()) as { keys: Record<string, unknown>[] }
  t.match(jwks.keys[0], { kty: 'OKP', crv: 'Ed25519', alg: 'EdDSA' })
  const { protectedHeader } = await jwtVerify(res.body.access_token as string, createRemoteJWKSet(new URL(`${b.issuer}/.well-known/jwks.json`)), { audience: API })
  t.equal(protectedHeader.alg, 'EdDSA')
})
