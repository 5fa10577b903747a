// The other credential providers behind the same cache: a secret the broker lends for a task
// (for APIs that take only a static key), and OAuth client credentials against an external
// authorization server (for APIs that trust their own). The agent sees neither.
import t from 'tap'
import { createServer, type IncomingMessage } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { Client } from 'undici'
import { startTestBroker, API, LEGACY } from '../helpers/broker.js'
import { startUpstream, startTestSidecar, loopbackPolicy, assertNoCanary, CANARY } from '../helpers/harness.js'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { AGENT } from '../helpers/tokens.js'
import { SPELLINGS, holds } from '../helpers/spellings.js'
import { existsSync, readFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'

async function get(proxy: string, url: string, handle?: string) {
  const c = new Client(proxy)
  const headers: Record<string, string> = { host: new URL(url).host }
  if (handle) headers['proxy-authorization'] = `Basic ${Buffer.from(`task:${handle}`).toString('base64')}`
  const res = await c.request({ method: 'GET', path: url, headers })
  const text = await res.body.text()
  await c.close()
  return { status: res.statusCode, text, body: (() => { try { return JSON.parse(text) as Record<string, unknown> } catch { return {} } })() }
}

/** A broker lending `secret` as LEGACY's leased secret, a sidecar injecting it as X-Api-Key, and a task opened on it. */
async function leasedSecretRig(t: { teardown(fn: () => unknown): void }, secret: string) {
  const broker = await startTestBroker({ broker: { leased_secrets: { [LEGACY]: 'LK_TEST_LEGACY_KEY' } }, env: { LK_TEST_LEGACY_KEY: secret } })
  const up = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    sidecar: { agent_id: AGENT, broker: { url: broker.url }, attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } } },
    credentials: [{ id: 'legacy', audience: up.origin, source: 'broker_secret', token_audience: LEGACY, inject: { type: 'header', name: 'X-Api-Key' } }],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
    await broker.close()
  })
  const task = s.sidecar.tasks.open({ purpose: 'legacy', durationS: 120, userToken: await broker.userToken('u', 'read') })
  return { broker, up, s, task }
}

t.test('a broker-leased secret: injected for the task, never seen by the agent, gone with the task', async (t) => {
  const { broker, up, s, task } = await leasedSecretRig(t, CANARY)
  const a = await get(s.proxy, `${up.origin}/a`, task.handle)
  const b = await get(s.proxy, `${up.origin}/b`, task.handle)
  t.equal(a.status, 200)
  t.equal(b.status, 200)
  t.same(up.requests.map((r) => r.headers['x-api-key']), [CANARY, CANARY], 'the upstream received the lent key')
  const leases = broker.events.filter((e) => e.type === 'token.exchange' && e.outcome === 'granted')
  t.equal(leases.length, 1, 'one lease for the task, cached')
  t.match(leases[0], { reason: 'leased', audience: LEGACY, agent: AGENT, user: 'u' })
  const audit = await s.audit()
  t.equal((audit[0]!.credential as { id: string }).id, (leases[0] as { jti: string }).jti, 'the audit names the lease, not the secret')
  assertNoCanary(t, s, a.text, b.text, JSON.stringify(broker.events), broker.logs())
  s.sidecar.tasks.end(task.handle)
  t.same(s.sidecar.brokerTokens!.describe(task.id), [], 'the lease is dropped with the task')

  // The broker lends nothing for an audience it holds no secret for, and nothing to a type without it.
  const other = await broker.exchange({
    grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
    subject_token: await broker.attest('agent:helper:prod:1'),
    subject_token_type: TOKEN_TYPES.local,
    audience: LEGACY,
    task_id: 't',
    requested_token_type: TOKEN_TYPES.leasedSecret,
  })
  t.equal(other.body.error, 'invalid_target', 'helper may not reach the legacy audience')
  t.notOk(other.text.includes(CANARY))
})

t.test('a leased secret and a broker JWT for one token audience are two credentials: neither is sent for the other', async (t) => {
  // One cache holds both (source broker and broker_secret); keyed by audience and scopes alone,
  // whichever was fetched first was injected for the other: the lent key as a bearer token.
  const broker = await startTestBroker({ broker: { leased_secrets: { [API]: 'LK_TEST_LEGACY_KEY' } }, env: { LK_TEST_LEGACY_KEY: CANARY } })
  const keyed = await startUpstream()
  const bearer = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([keyed.port, bearer.port]),
    sidecar: { agent_id: AGENT, broker: { url: broker.url }, attestation: { local: { key_file: join(broker.dir, 'local', 'local-attestor.key.json'), audience: broker.issuer } } },
    credentials: [
      { id: 'api-key', audience: keyed.origin, source: 'broker_secret', token_audience: API, scopes: ['read'], inject: { type: 'header', name: 'X-Api-Key' } },
      { id: 'api-jwt', audience: bearer.origin, source: 'broker', token_audience: API, scopes: ['read'], inject: { type: 'bearer' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await keyed.close()
    await bearer.close()
    await broker.close()
  })
  const leaseFirst = s.sidecar.tasks.open({ purpose: 'lease first', durationS: 120 })
  const jwtFirst = s.sidecar.tasks.open({ purpose: 'jwt first', durationS: 120 })
  for (const [task, order] of [[leaseFirst, [keyed, bearer]], [jwtFirst, [bearer, keyed]]] as const) {
    for (const up of order) t.equal((await get(s.proxy, `${up.origin}/x`, task.handle)).status, 200)
  }
  t.same(keyed.requests.map((r) => r.headers['x-api-key']), [CANARY, CANARY], 'the keyed API got the lent key, both times')
  const bearers = bearer.requests.map((r) => String(r.headers.authorization))
  t.equal(bearers.filter((a) => /^Bearer eyJ[\w-]+\.[\w-]+\.[\w-]+$/.test(a)).length, 2, 'the bearer API got a broker JWT, both times')
  t.notOk(bearers.some((a) => a.includes(CANARY)), 'the lent key never went as a bearer token')
  t.equal(broker.events.filter((e) => e.type === 'token.exchange' && e.outcome === 'granted').length, 4, 'a lease and a token per task')
})

interface AsRequest {
  authorization: string | undefined
  form: URLSearchParams
}

async function startAuthorizationServer(behaviour: (req: AsRequest) => { status: number; body: unknown }) {
  const seen: AsRequest[] = []
  const server = createServer((req: IncomingMessage, res) => {
    let body = ''
    req.on('data', (c: Buffer) => (body += c.toString()))
    req.on('end', () => {
      const r = { authorization: req.headers.authorization, form: new URLSearchParams(body) }
      seen.push(r)
      const out = behaviour(r)
      res.writeHead(out.status, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(JSON.stringify(out.body))
    })
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/oauth/token`, seen, close: () => new Promise<void>((r) => server.close(() => r())) }
}

t.test('OAuth client credentials: basic auth, narrowed to the route, cached, refusals explained', async (t) => {
  let n = 0
  const as = await startAuthorizationServer((r) => {
    const expected = 'Basic ' + Buffer.from(`${encodeURIComponent('agent client')}:${encodeURIComponent(CANARY).replace(/%20/g, '+')}`.replace(/%20/g, '+')).toString('base64')
    if (r.authorization !== expected) return { status: 401, body: { error: 'invalid_client', error_description: 'bad client authentication' } }
    if (r.form.get('grant_type') !== 'client_credentials') return { status: 400, body: { error: 'unsupported_grant_type' } }
    const scope = r.form.get('scope') ?? ''
    if (scope.includes('greedy')) return { status: 200, body: { access_token: `tok-${++n}`, token_type: 'Bearer', expires_in: 600, scope: `${scope} admin` } }
    return { status: 200, body: { access_token: `cc-token-${++n}`, token_type: 'Bearer', expires_in: 600, scope } }
  })
  const up = await startUpstream()
  const up2 = await startUpstream()
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([up.port, up2.port]),
      credentials: [
        { id: 'reports', audience: up.origin, source: 'client_credentials', scopes: ['reports.read'], oauth: { token_url: as.url, client_id: 'agent client', client_secret: 'CANARY', resource: 'https://reports.example.com' }, inject: { type: 'bearer' } },
        { id: 'greedy', audience: up2.origin, source: 'client_credentials', scopes: ['greedy'], oauth: { token_url: as.url, client_id: 'agent client', client_secret: 'CANARY' }, inject: { type: 'bearer' } },
      ],
    },
  )
  t.teardown(async () => {
    await s.close()
    await up.close()
    await up2.close()
    await as.close()
  })
  const a = await get(s.proxy, `${up.origin}/a`)
  const b = await get(s.proxy, `${up.origin}/b`)
  t.equal(a.status, 200)
  t.equal(b.status, 200)
  t.same(up.requests.map((r) => r.headers.authorization), ['Bearer cc-token-1', 'Bearer cc-token-1'], 'one token, cached, injected')
  t.equal(as.seen.length, 1, 'one request to the authorization server')
  t.equal(as.seen[0]!.form.get('scope'), 'reports.read', 'asked for exactly the route\'s scopes')
  t.equal(as.seen[0]!.form.get('resource'), 'https://reports.example.com')
  t.notOk(as.seen[0]!.form.has('client_secret'), 'the secret went in the Authorization header, not the body')

  const greedy = await get(s.proxy, `${up2.origin}/g`)
  t.equal(greedy.status, 503)
  t.match(greedy.body.reason, /granted scopes not asked for \(admin\)/)
  t.equal(up2.requests.length, 0, 'a token broader than the route is not used')
  assertNoCanary(t, s, a.text, b.text, greedy.text)
})

t.test('two client-credentials registrations naming one token_audience each get their own client\'s token', async (t) => {
  // The token_audience only named the cache entry: a second client (another client_id, another
  // resource) was sent the first one's token.
  const as = await startAuthorizationServer((r) => ({ status: 200, body: { access_token: `cc-${r.form.get('resource')}`, token_type: 'Bearer', expires_in: 600, scope: 'read' } }))
  const eu = await startUpstream()
  const us = await startUpstream()
  const oauth = (resource: string) => ({ token_url: as.url, client_id: `client-${resource}`, client_secret: 'CANARY', auth_method: 'client_secret_post', resource })
  const s = await startTestSidecar({
    ...loopbackPolicy([eu.port, us.port]),
    credentials: [
      { id: 'eu', audience: eu.origin, source: 'client_credentials', token_audience: 'https://api.example', scopes: ['read'], oauth: oauth('eu'), inject: { type: 'bearer' } },
      { id: 'us', audience: us.origin, source: 'client_credentials', token_audience: 'https://api.example', scopes: ['read'], oauth: oauth('us'), inject: { type: 'bearer' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await eu.close()
    await us.close()
    await as.close()
  })
  t.equal((await get(s.proxy, `${eu.origin}/a`)).status, 200)
  t.equal((await get(s.proxy, `${us.origin}/a`)).status, 200)
  t.same(eu.requests.map((r) => r.headers.authorization), ['Bearer cc-eu'])
  t.same(us.requests.map((r) => r.headers.authorization), ['Bearer cc-us'], 'not the other registration\'s token')
  t.same(as.seen.map((r) => r.form.get('client_id')), ['client-eu', 'client-us'], 'each client asked once')
})

t.test('client credentials refused by the authorization server', async (t) => {
  const as = await startAuthorizationServer(() => ({ status: 401, body: { error: 'invalid_client', error_description: 'client disabled' } }))
  const up = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    credentials: [{ id: 'x', audience: up.origin, source: 'client_credentials', oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY', auth_method: 'client_secret_post' }, inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
    await as.close()
  })
  const res = await get(s.proxy, `${up.origin}/a`)
  t.equal(res.status, 403, 'refused, and not worth retrying')
  t.match(res.body, { code: 'LK_CREDENTIAL_REFUSED', retryable: false })
  t.match(res.body.reason, /authorization server refused client credentials \(401 invalid_client: client disabled\)/)
  t.equal(as.seen[0]!.form.get('client_secret'), CANARY, 'client_secret_post puts it in the body')
  t.equal(up.requests.length, 0)
  assertNoCanary(t, s, res.text)
})

t.test('an authorization server quoting the client secret in its refusal is not repeated to the agent, the audit or the log', async (t) => {
  // As a sloppy AS does: the secret it was sent, back in error_description or error, in any encoding.
  const as = await startAuthorizationServer((r) => {
    const secret = r.form.get('client_secret') ?? Buffer.from(String(r.authorization).slice(6), 'base64').toString().split(':')[1] ?? ''
    const quoted = r.form.get('scope') === 'plain' ? `client_secret '${secret}' is not valid` : r.form.get('scope') === 'header' ? `bad header ${String(r.authorization)}` : `bad ${[...secret].map((ch) => `%${ch.charCodeAt(0).toString(16).toUpperCase()}`).join('')}`
    return { status: 401, body: r.form.get('scope') === 'code' ? { error: `invalid_client ${secret}` } : { error: 'invalid_client', error_description: quoted } }
  })
  const ups = await Promise.all([0, 1, 2, 3].map(() => startUpstream()))
  const cases = [
    ['plain', 'client_secret_post'],
    ['header', 'client_secret_basic'],
    ['encoded', 'client_secret_post'],
    ['code', 'client_secret_basic'],
  ] as const
  const s = await startTestSidecar({
    ...loopbackPolicy(ups.map((u) => u.port)),
    credentials: cases.map(([scope, method], i) => ({ id: scope, audience: ups[i]!.origin, source: 'client_credentials', scopes: [scope], oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY', auth_method: method }, inject: { type: 'bearer' } })),
  })
  t.teardown(async () => {
    await s.close()
    for (const u of ups) await u.close()
    await as.close()
  })
  const seen: string[] = []
  for (const [i, [scope]] of cases.entries()) {
    const res = await get(s.proxy, `${ups[i]!.origin}/a`)
    seen.push(res.text)
    t.equal(res.status, 403, `${scope}: refused`)
    t.match(res.body, { code: 'LK_CREDENTIAL_REFUSED', reason: /authorization server refused client credentials \(401/ }, `${scope}: the refusal is still explained`)
  }
  t.equal(as.seen.length, cases.length, 'every refusal came from the authorization server')
  const b64 = Buffer.from(`c:${CANARY}`).toString('base64')
  t.notOk([...seen, ...s.logs, JSON.stringify(await s.audit())].some((x) => x.includes(b64) || /%4c%4b/i.test(x)), 'no encoded form either')
  assertNoCanary(t, s, ...seen)
})

t.test('an authorization server echoing the client secret in any spelling: withheld from the agent, the audit and the log', async (t) => {
  // Each row: the secret the AS was sent, spelled one way, put in one place of its answer.
  const spacy = `${CANARY} +/`
  let echo: (sent: { secret: string; raw: string }) => string = () => ''
  let place: (quoted: string) => { status: number; body: unknown } = () => ({ status: 500, body: {} })
  let quoted = ''
  const as = await startAuthorizationServer((r) => {
    const basic = r.authorization?.startsWith('Basic ') ? r.authorization : undefined
    const secret = r.form.get('client_secret') ?? decodeURIComponent(Buffer.from(basic!.slice(6), 'base64').toString().split(':')[1]!.replace(/\+/g, ' '))
    const raw = basic ?? new URLSearchParams({ client_secret: secret }).toString().slice('client_secret='.length)
    quoted = echo({ secret, raw })
    return place(quoted)
  })
  const ups = await Promise.all([0, 1].map(() => startUpstream()))
  let clock = Date.now()
  const s = await startTestSidecar(
    {
      ...loopbackPolicy(ups.map((u) => u.port)),
      credentials: [
        { id: 'basic', audience: ups[0]!.origin, source: 'client_credentials', scopes: ['read'], oauth: { token_url: as.url, client_id: 'agent client', client_secret: 'CANARY', auth_method: 'client_secret_basic' }, inject: { type: 'bearer' } },
        { id: 'post', audience: ups[1]!.origin, source: 'client_credentials', scopes: ['read'], oauth: { token_url: as.url, client_id: 'c', client_secret: 'SPACY', auth_method: 'client_secret_post' }, inject: { type: 'bearer' } },
      ],
    },
    { LATCHKEY_SECRET_SPACY: spacy },
    // A failed fetch is answered from memory for half a second: each row moves the clock past that.
    { now: () => clock },
  )
  t.teardown(async () => {
    await s.close()
    for (const u of ups) await u.close()
    await as.close()
  })
  const withheld = /authorization server refused client credentials \(40[01]; its error text quoted the client secret and is not repeated\)/
  const pad = 'x'.repeat(280)
  const places: [string, (q: string) => { status: number; body: unknown }, (q: string) => string, RegExp][] = [
    ['error_description', (q) => ({ status: 401, body: { error: 'invalid_client', error_description: q } }), (q) => q.slice(0, 300), withheld],
    ['error_description, across the cut', (q) => ({ status: 400, body: { error: 'invalid_request', error_description: pad + q } }), (q) => (pad + q).slice(0, 300), withheld],
    ['error', (q) => ({ status: 401, body: { error: q } }), (q) => q.slice(0, 64), withheld],
    ['scope', (q) => ({ status: 200, body: { access_token: 'tok', token_type: 'Bearer', expires_in: 600, scope: `read ${q}` } }), (q) => q.slice(0, 200), /granted scopes not asked for \(not repeated: they quote the client secret\)/],
  ]
  const spellings: [string, (sent: { secret: string; raw: string }) => string][] = [
    ...Object.entries(SPELLINGS).map(([name, spell]) => [name, (sent: { secret: string }) => spell(sent.secret)] as [string, (sent: { secret: string; raw: string }) => string]),
    ['as sent (the form value, or the Basic header)', (sent) => sent.raw],
    ['as sent, base64-encoded', (sent) => Buffer.from(sent.raw).toString('base64')],
  ]
  const leaked = (output: string, shown: string) => holds(output, shown) || output.includes(CANARY)
  const auditText = () => (existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : '')
  let rows = 0
  for (const [where, respond, shownOf, said] of places) {
    for (const [name, spell] of spellings) {
      for (const [i, method] of ['basic', 'post'].entries()) {
        const row = `${method}: the secret ${name} in ${where}`
        echo = spell
        place = respond
        clock += 1000
        const before = as.seen.length
        // Only what this row wrote is looked at: a row that leaked must not fail the rows after it.
        await s.sidecar.audit.flush()
        const auditFrom = auditText().length
        const logFrom = s.logs.length
        const c = new Client(s.proxy)
        const res = await c.request({ method: 'GET', path: `${ups[i]!.origin}/a`, headers: { host: new URL(ups[i]!.origin).host } })
        const text = await res.body.text()
        await c.close()
        t.equal(as.seen.length, before + 1, `${row}: the AS was asked`)
        t.ok(res.statusCode === 403 || res.statusCode === 503, `${row}: refused (${res.statusCode})`)
        t.match(text, said, `${row}: the reason says the text is withheld`)
        await s.sidecar.audit.flush()
        const shown = shownOf(quoted)
        t.notOk(leaked(text, shown) || leaked(JSON.stringify(res.headers), shown), `${row}: not in the agent's response (body, headers)`)
        t.notOk(leaked(auditText().slice(auditFrom), shown), `${row}: not in the audit file`)
        t.notOk(s.logs.slice(logFrom).some((l) => leaked(l, shown)), `${row}: not in the log`)
        rows++
      }
    }
  }
  t.equal(rows, places.length * spellings.length * 2, `${rows} rows`)
  t.same(ups.map((u) => u.requests.length), [0, 0], 'nothing went upstream')
  assertNoCanary(t, s)
})

t.test('granted scopes are checked whether or not the binding names any: none quoting the client secret, each a scope-token, bounded', async (t) => {
  // With no `scopes:` configured, an AS's scope text went into every audit event and log line of
  // the calls its token served, unchecked: the client secret it was sent, or anything it chose.
  let scope: (secret: string) => unknown = () => 'read'
  let quoted = ''
  const as = await startAuthorizationServer((r) => {
    const secret = r.form.get('client_secret') ?? ''
    const s = scope(secret)
    quoted = typeof s === 'string' ? s : ''
    return { status: 200, body: { access_token: 'ACCESStokenOK1234567890', token_type: 'Bearer', expires_in: 600, ...(s === undefined ? {} : { scope: s }) } }
  })
  const up = await startUpstream()
  let clock = Date.now()
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([up.port]),
      credentials: [{ id: 'unscoped', audience: up.origin, source: 'client_credentials', oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY', auth_method: 'client_secret_post' }, inject: { type: 'bearer' } }],
    },
    {},
    // A failed fetch is answered from memory for half a second: each row moves the clock past that.
    { now: () => clock },
  )
  t.teardown(async () => {
    await s.close()
    await up.close()
    await as.close()
  })
  const auditText = () => (existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : '')
  const refused: [string, (secret: string) => unknown, RegExp][] = [
    ...Object.entries(SPELLINGS).map(([name, spell]) => [`the client secret ${name}`, (secret: string) => `read ${spell(secret)}`, /authorization server granted scopes that quote the client secret \(not repeated\)/] as [string, (secret: string) => unknown, RegExp]),
    ['a line break', () => 'read\r\nX-Injected: yes', /granted a scope that is not a scope-token/],
    ['a quote', () => 'read "x"', /granted a scope that is not a scope-token/],
    ['a backslash', () => 'read a\\b', /granted a scope that is not a scope-token/],
    ['a character beyond ASCII', () => 'read ключ', /granted a scope that is not a scope-token/],
    ['a tab', () => 'read\twrite', /granted a scope that is not a scope-token/],
    ['300 scopes', () => Array.from({ length: 300 }, (_, i) => `s${i}`).join(' '), /granted 300 scopes, more than the 256 taken/],
    ['a scope of 300 characters', () => `read ${'a'.repeat(300)}`, /granted a scope over 256 characters/],
    ['20,000 characters', () => 'ab '.repeat(7000), /granted scope text over 16384 characters/],
    ['a number', () => 42, /answered 200 with a scope that is not a string/],
  ]
  for (const [name, answer, said] of refused) {
    scope = answer
    clock += 1000
    await s.sidecar.audit.flush()
    const auditFrom = auditText().length
    const logFrom = s.logs.length
    const res = await get(s.proxy, `${up.origin}/a`)
    t.equal(res.status, 503, `${name}: refused`)
    t.match(res.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: said }, `${name}: an invalid answer, said so`)
    await s.sidecar.audit.flush()
    const out = [res.text, auditText().slice(auditFrom), ...s.logs.slice(logFrom)]
    t.notOk(out.some((o) => o.includes(CANARY) || (quoted.length > 0 && quoted !== 'read' && holds(o, quoted.slice(5, 205)))), `${name}: the scope text is not repeated`)
  }
  t.equal(up.requests.length, 0, 'no token from those answers was used')

  // A well-formed grant is taken as it is, and audited.
  for (const [name, answer, audited] of [
    ['two scopes, spaced twice', () => 'read  https://api.example/write', ['read', 'https://api.example/write']],
    ['no scope', () => undefined, []],
  ] as [string, () => unknown, string[]][]) {
    scope = answer
    clock += 601_000
    const ok = await get(s.proxy, `${up.origin}/b`)
    t.equal(ok.status, 200, `${name}: taken`)
    const last = (await s.audit()).at(-1) as { credential: { scopes: string[] } }
    t.same(last.credential.scopes, audited, `${name}: audited as granted`)
  }
  assertNoCanary(t, s)
})

t.test('a token its injector cannot send is an invalid answer, not cached: the next fetch after the AS recovers is used', async (t) => {
  // Once cached, such a token failed every call in undici (502 LK_UPSTREAM_UNREACHABLE, "retry")
  // for its whole life, up to a day, however soon the AS was mended; or went out padded.
  const GOOD = 'ACCESStokenOK1234567890'
  let token = GOOD
  const as = await startAuthorizationServer(() => ({ status: 200, body: { access_token: token, token_type: 'Bearer', expires_in: 600 } }))
  const up = await startUpstream()
  const up2 = await startUpstream()
  let clock = Date.now()
  const s = await startTestSidecar(
    {
      ...loopbackPolicy([up.port, up2.port]),
      credentials: [
        { id: 'bearer', audience: up.origin, source: 'client_credentials', oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY' }, inject: { type: 'bearer' } },
        { id: 'query', audience: up2.origin, source: 'client_credentials', oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY' }, inject: { type: 'query', name: 'key' } },
      ],
    },
    {},
    { now: () => clock },
  )
  t.teardown(async () => {
    await s.close()
    await up.close()
    await up2.close()
    await as.close()
  })
  const rows: [string, string, string, RegExp | null][] = [
    ['bearer', 'a line break', 'ACCESSbad\r\nX-Injected: yes', /it holds characters a header cannot carry/],
    ['bearer', 'text beyond ASCII', 'ACCESSbadé秘密token', /it holds characters a header cannot carry/],
    ['bearer', 'padding', ' ACCESSbadpadded ', /it starts or ends with whitespace/],
    ['bearer', 'a trailing line break', 'ACCESSbadecho\n', /it starts or ends with whitespace/],
    ['bearer', '20,000 characters', 'ACCESSbad' + 'x'.repeat(20_000), /it is over 16384 characters/],
    ['query', 'a lone surrogate', 'ACCESSbad\ud800', /it is not well-formed text/],
    ['query', 'padding', ' ACCESSbadpadded ', /it starts or ends with whitespace/],
    // A query parameter is percent-encoded: text beyond ASCII is carried, as a static secret's is.
    ['query', 'text beyond ASCII', 'ACCESSé秘密token', null],
  ]
  for (const [binding, name, bad, said] of rows) {
    const upstream = binding === 'bearer' ? up : up2
    clock += 601_000
    token = bad
    const asked = as.seen.length
    const sent = upstream.requests.length
    const logFrom = s.logs.length
    const res = await get(s.proxy, `${upstream.origin}/a`)
    t.equal(as.seen.length, asked + 1, `${binding}, ${name}: the AS was asked`)
    if (said === null) {
      t.equal(res.status, 200, `${binding}, ${name}: sent`)
      t.equal(new URL(upstream.requests.at(-1)!.url, upstream.origin).searchParams.get('key'), bad, `${binding}, ${name}: as issued, percent-encoded`)
      continue
    }
    t.equal(res.status, 503, `${binding}, ${name}: refused`)
    t.match(res.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /the authorization server issued a token that cannot be sent: / }, `${binding}, ${name}: an invalid answer`)
    t.match(res.body.reason, said, `${binding}, ${name}: saying why`)
    t.equal(upstream.requests.length, sent, `${binding}, ${name}: nothing went upstream`)
    await s.sidecar.audit.flush()
    t.notOk([res.text, ...s.logs.slice(logFrom)].some((o) => o.includes('ACCESSbad')), `${binding}, ${name}: the token is not quoted`)

    // The AS mended: the next fetch (past the half second a failure is answered from memory) is used.
    token = GOOD
    clock += 1000
    const again = await get(s.proxy, `${upstream.origin}/b`)
    t.equal(again.status, 200, `${binding}, ${name}: not cached, the mended token is fetched`)
    const got = upstream.requests.at(-1)!
    t.equal(binding === 'bearer' ? got.headers.authorization : new URL(got.url, upstream.origin).searchParams.get('key'), binding === 'bearer' ? `Bearer ${GOOD}` : GOOD, `${binding}, ${name}: and sent`)
  }
  const audit = readFileSync(s.auditPath, 'utf8')
  t.notOk(audit.includes('ACCESSbad'), 'no audit event quotes a refused token')
  assertNoCanary(t, s)
})

t.test('a leased secret a header cannot carry (as `echo` leaves it) is refused by the sidecar, not sent', async (t) => {
  const { up, s, task } = await leasedSecretRig(t, `${CANARY}\n`)
  const res = await get(s.proxy, `${up.origin}/a`, task.handle)
  t.equal(res.status, 503)
  t.match(res.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /the broker issued a leased secret that cannot be sent: it starts or ends with whitespace \(not repeated\)/ })
  t.equal(up.requests.length, 0, 'nothing went upstream')
  t.same(s.sidecar.brokerTokens!.describe(task.id), [], 'nothing cached')
  assertNoCanary(t, s, res.text)
})

t.test('an authorization server echoing the token it issued into `scope`: neither the agent, the audit nor the log gets it', async (t) => {
  // The agent holding the token could call the API without the sidecar: quoted in the 503 for a
  // scope not asked for, or, asked for none, taken into every audit event and log line it serves.
  const issued = `ISSUEDcc${randomBytes(16).toString('hex')}`
  const as = await startAuthorizationServer((r) => {
    const asked = r.form.get('scope')
    return { status: 200, body: { access_token: issued, token_type: 'Bearer', expires_in: 600, scope: asked ? `${asked} ${issued}` : issued } }
  })
  const up = await startUpstream()
  const up2 = await startUpstream()
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port, up2.port]),
    credentials: [
      { id: 'scoped', audience: up.origin, source: 'client_credentials', scopes: ['read'], oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY' }, inject: { type: 'bearer' } },
      { id: 'unscoped', audience: up2.origin, source: 'client_credentials', oauth: { token_url: as.url, client_id: 'c', client_secret: 'CANARY' }, inject: { type: 'bearer' } },
    ],
  })
  t.teardown(async () => {
    await s.close()
    await up.close()
    await up2.close()
    await as.close()
  })
  const scoped = await get(s.proxy, `${up.origin}/a`)
  const unscoped = await get(s.proxy, `${up2.origin}/a`)
  for (const [name, res] of [['a scope not asked for', scoped], ['asked for none', unscoped]] as const) {
    t.equal(res.status, 503, `${name}: refused`)
    t.match(res.body, { code: 'LK_CREDENTIAL_UNAVAILABLE', reason: /authorization server granted scopes that quote the access token it issued \(not repeated\)/ }, `${name}: an invalid answer, said so`)
  }
  await s.sidecar.audit.flush()
  const audit = existsSync(s.auditPath) ? readFileSync(s.auditPath, 'utf8') : ''
  t.notOk([scoped.text, unscoped.text, audit, ...s.logs].some((o) => o.includes(issued)), 'the issued token is in no response, audit event or log line')
  t.equal(up.requests.length + up2.requests.length, 0, 'the token was not used')
})
