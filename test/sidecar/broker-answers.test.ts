// The sidecar checks what the broker answers instead of trusting it: no scope beyond what was
// asked, no token for another audience, no lifetime past a day nor past the JWT's own exp, no body
// past 1 MB. Each refusal is a 503 that says why and quotes no token; nothing reaches the API. A
// real broker behind a front that rewrites or makes up its answers (faults a real broker lacks).
import t from 'tap'
import { readFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { startTestBroker, API } from '../helpers/broker.js'
import { startBrokerFront, type BrokerFront } from '../helpers/broker-front.js'
import { startTokenRig, AGENT, type TokenRig } from '../helpers/tokens.js'
import { isoTime } from '../../proxy/credentials/broker-source.js'
import { viaProxy } from '../control/rig.js'

const AT = 'urn:ietf:params:oauth:token-type:access_token'
const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url')
const fakeJwt = (claims: Record<string, unknown>) => `${b64({ alg: 'ES256', typ: 'at+jwt' })}.${b64(claims)}.c2lnbmF0dXJl`
const nowS = () => Math.floor(Date.now() / 1000)
const answer = (token: string, extra: Record<string, unknown> = {}) => JSON.stringify({ access_token: token, token_type: 'Bearer', expires_in: 300, issued_token_type: AT, ...extra })

async function rig(t: { teardown(fn: () => unknown): void }, scopes?: string[]): Promise<{ rig: TokenRig; front: BrokerFront; call(path: string): Promise<{ status: number; body: Record<string, unknown>; handle: string }> }> {
  const broker = await startTestBroker()
  const front = await startBrokerFront(broker.url)
  const r = await startTokenRig({ broker, brokerUrl: front.url, sidecar: { sidecar: { broker: { timeout_ms: 5000 } } }, scopes })
  t.teardown(async () => {
    await r.close()
    await front.close()
  })
  return {
    rig: r,
    front,
    async call(path) {
      const task = await r.openTask({ purpose: 'answers', duration_s: 120 })
      const handle = task.body.task as string
      const res = await viaProxy({ proxy: r.sidecar.proxy } as Parameters<typeof viaProxy>[0], handle, `${r.api.origin}${path}`)
      return { status: res.status, body: res.body, handle }
    },
  }
}

t.test('refused: more scope than asked, another audience, a JWT already expired', async (t) => {
  const { rig: r, front, call } = await rig(t)
  front.mode = { mode: 'patch', patch: { scope: 'read write' } }
  const wider = await call('/wider')
  t.match(wider, { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker granted scope "write" beyond the read asked for/ } })

  const evil = fakeJwt({ sub: 'x', aud: 'https://evil.example', scope: 'read', exp: nowS() + 600, jti: 'wrong-aud' })
  front.mode = { mode: 'raw', text: answer(evil, { scope: 'read' }) }
  const wrongAud = await call('/wrong-aud')
  t.match(wrongAud, { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /another audience \(aud "https:\/\/evil.example", asked for https:\/\/api.example.com\)/ } })
  t.notOk(JSON.stringify(wrongAud.body).includes(evil.split('.')[1]!), 'the reason quotes no token')

  const stale = fakeJwt({ sub: 'x', aud: API, scope: 'read', exp: nowS() - 3600, jti: 'expired' })
  front.mode = { mode: 'raw', text: answer(stale, { scope: 'read', expires_in: 1e300 }) }
  const expired = await call('/expired')
  t.match(expired, { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker issued a token that expired 3\d{3} s ago/ } })
  t.equal(r.api.tokens.length, 0, 'nothing reached the API')
})

t.test('asked for no scope, what the broker grants is still checked: bounded scope-tokens, none quoting what was sent', async (t) => {
  // Asking for none takes what the registry allows: the grant was taken as the broker wrote it,
  // into every audit event and log line of the task (injector probe, for the OAuth source).
  const { rig: r, front, call } = await rig(t, [])
  front.mode = { mode: 'patch', patch: { scope: 'read "x\\y"' } }
  t.match(await call('/quoted'), { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker granted a scope that is not a scope-token/ } })
  front.mode = { mode: 'patch', patch: { scope: 'read '.repeat(4000) } }
  t.match(await call('/long'), { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker granted scope text over 16384 characters/ } })
  front.mode = { mode: 'patch', patch: { scope: Array.from({ length: 300 }, (_, i) => `s${i}`).join(' ') } }
  t.match(await call('/many'), { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker granted 300 scopes, more than the 256 taken/ } })
  t.equal(r.api.tokens.length, 0, 'nothing reached the API')
  front.mode = { mode: 'patch', patch: { scope: 'read write' } }
  t.equal((await call('/fine')).status, 200, 'a grant of scope-tokens is taken')
  t.notOk(readFileSync(r.sidecar.auditPath, 'utf8').includes('"x\\\\y"'), 'the refused grant is in no audit event')
})

t.test('an absurd expires_in is clamped: to the JWT\'s own exp, or to a day; the task API still describes it', async (t) => {
  const { rig: r, front, call } = await rig(t)
  front.mode = { mode: 'patch', patch: { expires_in: 1e300 } }
  const jwt = await call('/jwt-huge-exp')
  t.equal(jwt.status, 200, 'a real broker token, used')
  const claims = JSON.parse(Buffer.from(r.api.tokens.at(-1)!.split('.')[1]!, 'base64url').toString()) as { exp: number }
  const described = (await (await fetch(`${r.sidecar.sidecar.adminUrl}/v1/tasks/${jwt.handle}`)).json()) as { tokens: { expires_at: string }[] }
  const at = Date.parse(described.tokens[0]!.expires_at)
  t.ok(Math.abs(at - claims.exp * 1000) < 2000, `held until the JWT's exp (${described.tokens[0]!.expires_at})`)

  front.mode = { mode: 'raw', text: answer('opaque-token-huge-exp', { scope: 'read', expires_in: 1e300 }) }
  const opaque = await call('/opaque-huge-exp')
  t.equal(r.api.tokens.at(-1), 'opaque-token-huge-exp', 'the opaque token was injected')
  const res = await fetch(`${r.sidecar.sidecar.adminUrl}/v1/tasks/${opaque.handle}`)
  t.equal(res.status, 200, 'GET /v1/tasks/<handle> answers')
  const body = (await res.json()) as { tokens: { expires_at: string }[] }
  t.ok(Date.parse(body.tokens[0]!.expires_at) <= Date.now() + 24 * 3600 * 1000 + 1000, `lifetime clamped to a day (${body.tokens[0]!.expires_at})`)
})

t.test('a JWT without iat is held to its exp on this clock, with no leeway: never past it, and one already past it is refused', async (t) => {
  // expires_in (300) says longer than the token's exp: the exp wins. A minute's leeway for skew
  // held such a token 60 s past its exp, and took one that had expired 30 s before.
  const { rig: r, front, call } = await rig(t)
  const exp = nowS() + 30
  front.mode = { mode: 'raw', text: answer(fakeJwt({ sub: 'x', aud: API, scope: 'read', exp, jti: 'no-iat', act: { sub: AGENT } }), { scope: 'read' }) }
  const soon = await call('/no-iat')
  t.equal(r.api.tokens.length, 1, 'injected while its exp is ahead')
  const described = (await (await fetch(`${r.sidecar.sidecar.adminUrl}/v1/tasks/${soon.handle}`)).json()) as { tokens: { expires_at: string }[] }
  t.ok(Date.parse(described.tokens[0]!.expires_at) <= exp * 1000, `held until ${described.tokens[0]!.expires_at}, not past its exp ${new Date(exp * 1000).toISOString()}`)

  front.mode = { mode: 'raw', text: answer(fakeJwt({ sub: 'x', aud: API, scope: 'read', exp: nowS() - 30, jti: 'no-iat-expired', act: { sub: AGENT } }), { scope: 'read' }) }
  t.match(await call('/no-iat-expired'), { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker issued a token that expired 3\d s ago by this host's clock \(it has no iat\)/ } })
  t.equal(r.api.tokens.length, 1, 'the expired one reached nothing')
})

t.test('a body past 1 MB is refused without reading it all', async (t) => {
  const { rig: r, front, call } = await rig(t)
  front.mode = { mode: 'huge', mb: 64 }
  const started = Date.now()
  const huge = await call('/huge')
  t.match(huge, { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /broker answered 200 with a body over 1048576 bytes/ } })
  t.ok(Date.now() - started < 3000, `answered in ${Date.now() - started} ms`)
  t.equal(r.api.tokens.length, 0)
})

t.test('isoTime never throws', async (t) => {
  t.equal(isoTime(0), '1970-01-01T00:00:00.000Z')
  t.equal(isoTime(1e300), '+275760-09-13T00:00:00.000Z')
  t.equal(isoTime(-1e300), '-271821-04-20T00:00:00.000Z')
  t.equal(isoTime(Number.NaN), '1970-01-01T00:00:00.000Z')
})

t.test('a broker echoing the token it issued into `scope` or `lease_id`: the agent, the task API, the audit and the log get none of it', async (t) => {
  // An opaque token (no claims to read) and its own text echoed where the sidecar quotes or keeps
  // what the broker says: a scope beyond the one asked (quoted in the 503), a scope asked for none
  // (kept for every audit event, log line and GET /v1/tasks/<handle> the token serves), the
  // lease_id (kept as its jti, the same places). Held, the agent could call the API without the sidecar.
  const issued = `ISSUEDbk${randomBytes(16).toString('hex')}`
  const cases: [string, string[] | undefined, Record<string, unknown>, RegExp][] = [
    ['a scope beyond the one asked', undefined, { scope: `read ${issued}` }, /broker granted scope \(not repeated: it quotes the token it issued\)/],
    ['a scope asked for none', [], { scope: `read ${issued}` }, /broker granted scope \(not repeated: it quotes the token it issued\)/],
    ['the lease_id', undefined, { scope: 'read', lease_id: issued }, /broker issued a token whose lease_id is not repeated: it quotes the token it issued/],
  ]
  for (const [name, scopes, extra, said] of cases) {
    const { rig: r, front, call } = await rig(t, scopes)
    front.mode = { mode: 'raw', text: answer(issued, extra) }
    const res = await call(`/echo`)
    const described = await (await fetch(`${r.sidecar.sidecar.adminUrl}/v1/tasks/${res.handle}`)).text()
    t.match(res, { status: 503, body: { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: said } }, `${name}: an invalid answer, said so`)
    await r.sidecar.sidecar.audit.flush()
    const audit = readFileSync(r.sidecar.auditPath, 'utf8')
    t.notOk([JSON.stringify(res.body), described, audit, ...r.sidecar.logs].some((o) => o.includes(issued)), `${name}: the issued token is in no response, task description, audit event or log line`)
    t.equal(r.api.tokens.length, 0, `${name}: the token was not used`)
  }
})
