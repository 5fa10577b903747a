// The broker over time: registry reloads (and the events a widening raises), revocation
// through the authenticated admin API, introspection reporting revoked tokens inactive, and a
// restart that forgets no revocation.
import t from 'tap'
import { writeFileSync, renameSync } from 'node:fs'
import { stringify } from 'yaml'
import { decodeJwt } from 'jose'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'
import { startTestBroker, delegatedRequest, TEST_REGISTRY, API, why } from '../helpers/broker.js'
import { setTimeout as sleep } from 'node:timers/promises'

async function until(cond: () => boolean, ms = 3000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (cond()) return true
    await sleep(20)
  }
  return cond()
}

t.test('registry reload: applied without restart, widenings reported, bad files rejected whole', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const agent = 'agent:helper:prod:r'
  const before = await b.exchange(delegatedRequest(await b.userToken('u', 'read write'), await b.attest(agent), { scope: 'write' }))
  t.equal(before.body.error, 'invalid_scope', 'helper may not write yet')

  const widened = structuredClone(TEST_REGISTRY) as typeof TEST_REGISTRY
  widened.agents.helper.audiences[API] = ['read', 'write']
  // Atomic replace, as an editor or a ConfigMap update does it.
  writeFileSync(b.registryFile + '.tmp', stringify(widened))
  renameSync(b.registryFile + '.tmp', b.registryFile)
  t.ok(await until(() => b.events.some((e) => e.type === 'policy.widened')), 'a widening event is emitted')
  t.match(b.events.find((e) => e.type === 'policy.widened'), { agent_type: 'helper', audience: API, added: ['write'] })
  const after = await b.exchange(delegatedRequest(await b.userToken('u', 'read write'), await b.attest(agent), { scope: 'write' }))
  t.equal(after.status, 200, why(after))

  writeFileSync(b.registryFile, 'version: 1\nagents:\n  helper:\n    env: prod\n    surprise: true\n')
  t.ok(await until(() => b.events.some((e) => e.type === 'policy.rejected')), 'an invalid registry is rejected')
  t.match(b.events.find((e) => e.type === 'policy.rejected'), { reason: /unknown key "surprise"/ })
  const still = await b.exchange(delegatedRequest(await b.userToken('u', 'read write'), await b.attest(agent), { scope: 'write' }))
  t.equal(still.status, 200, 'the previous registry stays in force')
})

t.test('revocation via the admin API, introspection, and a restart', async (t) => {
  const store = { sqlite: { path: '' } }
  const b = await startTestBroker()
  store.sqlite.path = `${b.dir}/broker.db`
  const agent = 'agent:summarizer:prod:victim'
  const bystander = 'agent:summarizer:prod:bystander'
  const token = (await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(agent)))).body.access_token as string
  const other = (await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(bystander), { task_id: 'task-2' }))).body.access_token as string

  const introspect = async (tok: string, auth = 'Basic ' + Buffer.from(`api-server:${b.introspectionSecret}`).toString('base64')) => {
    const res = await fetch(`${b.url}/oauth2/introspect`, { method: 'POST', headers: { authorization: auth }, body: new URLSearchParams({ token: tok }) })
    return { status: res.status, body: (await res.json()) as Record<string, unknown>, headers: res.headers }
  }
  const active = await introspect(token)
  t.match(active.body, { active: true, sub: 'u', act: { sub: agent }, aud: API, scope: 'read', task_id: 'task-1' })
  t.equal(active.headers.get('cache-control'), 'no-store')
  const unauth = await introspect(token, 'Basic ' + Buffer.from('api-server:wrong').toString('base64'))
  t.equal(unauth.status, 401)
  t.equal(unauth.body.error, 'invalid_client')
  t.notOk('sub' in unauth.body, 'nothing about the token without authentication')
  t.same((await introspect('garbage')).body, { active: false })
  t.same((await introspect(`${token.slice(0, -10)}\n${token.slice(-10)}`)).body, { active: false }, 'nor another spelling of the token (whitespace in its signature)')
  const b64url = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  const spareBit = token.slice(0, -1) + b64url[b64url.indexOf(token.at(-1)!) ^ 1]
  t.same((await introspect(spareBit)).body, { active: false }, "nor its signature's last character with a spare bit set (the same bytes decoded)")

  const admin = (method: string, path: string, body?: unknown, token = b.adminToken) =>
    fetch(`${b.url}${path}`, { method, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) })
  const refused = await admin('POST', '/v1/revocations', { kind: 'agent', value: agent }, 'not-the-token')
  t.equal(refused.status, 401, 'an unauthenticated revocation is refused')
  t.equal((await fetch(`${b.url}/v1/revocations`)).status, 401, 'no token at all: refused')
  t.equal((await admin('POST', '/v1/revocations', { kind: 'agent', value: 'not-an-agent-id' })).status, 400, 'a malformed agent ID is refused')
  const r = await admin('POST', '/v1/revocations', { kind: 'agent', value: agent, reason: 'compromised' })
  t.equal(r.status, 201)
  t.equal(r.headers.get('cache-control'), 'no-store', 'admin answers are not for caches')
  const lower = await fetch(`${b.url}/v1/revocations`, { headers: { authorization: `bearer ${b.adminToken}` } })
  t.equal(lower.status, 200, 'the auth scheme is case-insensitive')
  t.equal(lower.headers.get('cache-control'), 'no-store')
  t.equal((await fetch(`${b.url}/v1/revocations`, { headers: { authorization: `Basic ${b.adminToken}` } })).status, 401, 'but it must be Bearer')
  t.equal((await admin('POST', '/v1/revocations', { kind: 'agent', value: 'agent:ghost:prod:0' })).status, 201, 'revoking an unknown agent is accepted and harmless')

  t.same((await introspect(token)).body, { active: false }, 'the revoked agent\'s token is inactive at once')
  t.equal((await introspect(other)).body.active, true, 'the bystander is untouched')
  const again = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(agent)))
  t.match(again.body, { error: 'invalid_request', error_description: `agent ${agent} is revoked` }, 'its exchanges are refused at once')
  t.ok(b.events.some((e) => e.type === 'revocation' && e.value === agent && e.reason === 'compromised'), 'the revocation is an event')
  await b.close()

  // Restart on the same store and keys: the revocation is still there.
  const b2 = await startTestBroker({ store })
  t.teardown(b2.close)
  t.ok(b2.broker.revocations.get('agent', agent), 'the revocation survived a restart')
  const del = await fetch(`${b2.url}/v1/revocations/agent/${encodeURIComponent(agent)}`, { method: 'DELETE', headers: { authorization: `Bearer ${b2.adminToken}` } })
  t.equal(del.status, 200, 'unrevoke')
  const back = await b2.exchange(delegatedRequest(await b2.userToken('u', 'read'), await b2.attest(agent)))
  t.equal(back.status, 200, why(back))
})

// A resync diffs the store's answer against memory. The answer is a snapshot from when its query
// ran: a revocation acknowledged while it was on its way (a large store answers slowly) was
// dropped again, told to every sidecar as lifted, and its agent served tokens until the next
// resync; on PostgreSQL with 30,000 rows, 213 of 400 acknowledged revocations were. Here the
// store's answer is held back, as a slow one is, while the admin API revokes and unrevokes.
t.test('a revoke or unrevoke acknowledged while a resync reads the store is not undone by it', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const list = b.broker.revocations
  const store = list.store
  const agent = 'agent:summarizer:prod:mid-resync'
  const lifted = 'agent:summarizer:prod:lifted-mid-resync'
  const admin = (method: string, path: string, body?: unknown) =>
    fetch(`${b.url}${path}`, { method, headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) })
  t.equal((await admin('POST', '/v1/revocations', { kind: 'agent', value: lifted })).status, 201)
  const announced: string[] = []
  list.onChange((c) => announced.push(`${c.op} ${c.op === 'revoke' ? c.revocation.value : c.value}${c.remote ? ' (resync)' : ''}`))

  const read = store.list.bind(store)
  let release!: () => void
  const held = new Promise<void>((resolve) => (release = resolve))
  let snapshotTaken!: () => void
  const taken = new Promise<void>((resolve) => (snapshotTaken = resolve))
  store.list = async () => {
    const snapshot = await read()
    snapshotTaken()
    await held
    return snapshot
  }
  t.teardown(() => void (store.list = read))
  const resync = list.resync()
  await taken
  t.equal((await admin('POST', '/v1/revocations', { kind: 'agent', value: agent })).status, 201, 'revoked while the resync reads')
  t.equal((await admin('DELETE', `/v1/revocations/agent/${encodeURIComponent(lifted)}`)).status, 200, 'unrevoked while the resync reads')
  release()
  await resync

  t.ok(list.get('agent', agent), 'the revocation is still in force')
  t.notOk(list.get('agent', lifted), 'the lifted one stays lifted')
  t.same(announced, [`revoke ${agent}`, `unrevoke ${lifted}`], 'and sidecars were told each once, never the reverse')
  const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(agent)))
  t.equal(res.status, 400, why(res))
  t.match(res.body, { error: 'invalid_request', error_description: `agent ${agent} is revoked` }, 'its exchanges are refused')
  t.notOk('access_token' in res.body, 'no token')
  // Once nothing is in flight, a resync still catches up with what the store says.
  store.list = read
  t.equal(await list.resync(), 0, 'nothing left to reconcile')
})

t.test('metadata and JWKS', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const meta = (await (await fetch(`${b.url}/.well-known/oauth-authorization-server`)).json()) as Record<string, unknown>
  t.match(meta, { issuer: b.issuer, jwks_uri: `${b.issuer}/.well-known/jwks.json`, grant_types_supported: ['urn:ietf:params:oauth:grant-type:token-exchange'] })
  const jwks = (await (await fetch(`${b.url}/.well-known/jwks.json`)).json()) as { keys: Record<string, unknown>[] }
  t.equal(jwks.keys.length, 1)
  t.match(jwks.keys[0], { kty: 'EC', crv: 'P-256', alg: 'ES256', use: 'sig' })
  t.notOk('d' in jwks.keys[0]!, 'no private part')
  t.equal((await fetch(`${b.url}/nope`)).status, 404)
})

t.test('a revocation that could never match anything is refused, naming the rule, on SQLite and PostgreSQL', async (t) => {
  const { randomBytes } = await import('node:crypto')
  const schema = `lk_test_${randomBytes(6).toString('hex')}`
  const pgUrl = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'
  t.teardown(async () => {
    const pg = (await import('pg')).default
    const c = new pg.Client(pgUrl)
    await c.connect()
    await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`)
    await c.end()
  })
  for (const store of [undefined, { postgres: { url: pgUrl, schema } }]) {
    const b = await startTestBroker(store ? { store } : {})
    t.teardown(b.close)
    const name = store ? 'postgres' : 'sqlite'
    const revoke = async (body: unknown) => {
      const res = await fetch(`${b.url}/v1/revocations`, { method: 'POST', headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' }, body: JSON.stringify(body) })
      return { status: res.status, body: (await res.json()) as Record<string, unknown> }
    }
    const TASK = 'task must be a task ID: 1-128 characters of A-Z a-z 0-9 . _ : - (what the broker accepts as task_id)'
    const JTI = 'jti must be 1 to 256 printable ASCII characters, no spaces'
    const HANDLE = (what: string) => `${what} must not hold a task handle (lkt_…, the proxy credential); a task is revoked by its id: GET /v1/tasks/<handle> on the sidecar shows it`
    // An operator's paste with a trailing space or newline used to be stored (201) and match nothing.
    for (const [body, description] of [
      [{ kind: 'task', value: 'task-1 ' }, TASK],
      [{ kind: 'task', value: 'task-1\n' }, TASK],
      [{ kind: 'task', value: 't\u0000x' }, TASK],
      // The handle POST /v1/tasks answers with, pasted for the id: a no-op revocation holding a credential.
      [{ kind: 'task', value: 'lkt_ahkpbNET1OKz8kBNlQK4Lw' }, HANDLE('task')],
      // ...or copied with what surrounds it in a proxy_url, or under another kind, or in the reason.
      [{ kind: 'task', value: 'task:lkt_ahkpbNET1OKz8kBNlQK4Lw' }, HANDLE('task')],
      [{ kind: 'jti', value: 'lkt_ahkpbNET1OKz8kBNlQK4Lw' }, HANDLE('value')],
      [{ kind: 'jti', value: 'http://task:lkt_ahkpbNET1OKz8kBNlQK4Lw@127.0.0.1:15001' }, HANDLE('value')],
      [{ kind: 'task', value: 'task-1', reason: 'its proxy_url was task:lkt_ahkpbNET1OKz8kBNlQK4Lw' }, HANDLE('reason')],
      [{ kind: 'jti', value: 'abc', reason: 'lkt_ahkpbNET1OKz8kBNlQK4Lw' }, HANDLE('reason')],
      [{ kind: 'jti', value: ' ' }, JTI],
      [{ kind: 'jti', value: 'jti\u0000' }, JTI],
      [{ kind: 'task', value: 'task-1', reason: 'leaked\u0000' }, 'reason must be a string of at most 512 characters, without control characters other than tab and newline'],
    ] as const) {
      t.same(await revoke(body), { status: 400, body: { error: 'invalid_request', error_description: description } }, `${name}: ${JSON.stringify(body)}`)
    }
    // RFC 8259 §8.1: UTF-8. A 0xFF byte was read as U+FFFD and stored in a reason the operator never wrote.
    const notUtf8 = await fetch(`${b.url}/v1/revocations`, { method: 'POST', headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' }, body: new Uint8Array(Buffer.from('{"kind":"task","value":"task-1","reason":"ops \xff"}', 'latin1')) })
    t.same({ status: notUtf8.status, body: await notUtf8.json() }, { status: 400, body: { error: 'invalid_request', error_description: 'body is not valid UTF-8' } }, `${name}: a body that is not UTF-8`)
    const twice = await fetch(`${b.url}/v1/revocations`, { method: 'POST', headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' }, body: '{"kind":"task","value":"task-1","value":"task-2"}' })
    t.same({ status: twice.status, body: await twice.json() }, { status: 400, body: { error: 'invalid_request', error_description: 'body names "value" twice (which one counts is ambiguous)' } }, `${name}: a member named twice`)
    t.same(b.broker.revocations.all(), [], `${name}: nothing was revoked`)
    const ok = await revoke({ kind: 'task', value: 'task-1', reason: 'ended early\n\tby ops' })
    t.equal(ok.status, 201, `${name}: a real task ID is revoked`)
    const jti = await revoke({ kind: 'jti', value: '7c9e6679-7425-40de-944b-e07fc1f90ae7' })
    t.equal(jti.status, 201, `${name}: a jti is revoked`)
    const again = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:summarizer:prod:t1')))
    t.match(again.body, { error: 'invalid_request', error_description: 'task task-1 is revoked' }, `${name}: and it holds`)
  }
})

t.test('a registry in which two agent types match one workload is rejected whole', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const sa = () =>
    b.k8s.sign({
      aud: b.issuer,
      sub: 'system:serviceaccount:agents:summarizer',
      'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u1' }, pod: { name: 'pod-1', uid: 'p1' } },
    })
  const typeOf = async () => {
    const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await sa(), { actor_token_type: TOKEN_TYPES.jwt }))
    t.equal(res.status, 200, why(res))
    return (decodeJwt(res.body.access_token as string).act as { sub: string }).sub
  }
  t.equal(await typeOf(), 'agent:summarizer-k8s:prod:pod-1')
  // A type listed first, matching summarizer-k8s's service account: the first match would win, so
  // the workload would have become an `aaa` (its policy, its revocations) on this reload.
  const shared = { version: 1, agents: { aaa: { env: 'prod', match: { kubernetes: { namespace: 'agents', service_account: 'summarizer' } }, audiences: { [API]: ['read'] }, max_lifetime_s: 600 }, ...TEST_REGISTRY.agents } }
  writeFileSync(b.registryFile + '.tmp', stringify(shared))
  renameSync(b.registryFile + '.tmp', b.registryFile)
  t.ok(await until(() => b.events.some((e) => e.type === 'policy.rejected')), 'rejected')
  t.match(b.events.find((e) => e.type === 'policy.rejected'), { reason: /service account agents\/summarizer is also matched by agent type "aaa"/ })
  t.equal(await typeOf(), 'agent:summarizer-k8s:prod:pod-1', 'the workload keeps its type')

  // SPIFFE prefixes one inside the other: which type an ID under both gets would depend on the order.
  const nested = { version: 1, agents: { aaa: { env: 'prod', match: { spiffe: { path_prefix: '/agents' } }, audiences: { [API]: ['read'] }, max_lifetime_s: 600 }, ...TEST_REGISTRY.agents } }
  writeFileSync(b.registryFile + '.tmp', stringify(nested))
  renameSync(b.registryFile + '.tmp', b.registryFile)
  t.ok(await until(() => b.events.some((e) => e.type === 'policy.rejected' && /overlaps/.test(e.reason))), 'rejected')
  t.match(b.events.filter((e) => e.type === 'policy.rejected').at(-1), { reason: /path_prefix: \/agents\/summarizer overlaps the path_prefix of agent type "aaa"/ })
})

t.test('introspection: active until the exp this broker set, inactive from it (no skew on its own clock)', async (t) => {
  let clock = Date.now()
  const b = await startTestBroker({ now: () => clock })
  t.teardown(b.close)
  const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:summarizer:prod:exp'), { task_duration: '100' }))
  t.equal(res.status, 200, why(res))
  const expiresIn = res.body.expires_in as number
  const introspect = async () => {
    const r = await fetch(`${b.url}/oauth2/introspect`, {
      method: 'POST',
      headers: { authorization: 'Basic ' + Buffer.from(`api-server:${b.introspectionSecret}`).toString('base64') },
      body: new URLSearchParams({ token: res.body.access_token as string }),
    })
    return ((await r.json()) as { active: boolean }).active
  }
  const issued = clock
  clock = issued + (expiresIn - 1) * 1000
  t.equal(await introspect(), true, 'a second before exp: active')
  clock = issued + (expiresIn + 1) * 1000
  t.equal(await introspect(), false, 'a second after exp: inactive (it was active for 30 s more)')
  clock = issued + (expiresIn + 29) * 1000
  t.equal(await introspect(), false, 'and within what the skew used to allow')
})
