// Delegation chains and who the subject is: a chain is carried whole or refused (never cut, so a
// revoked root still stops every descendant), `users:` holds at every depth, a leased secret is
// bound by the user's consent as a JWT is, a user is never named like an agent, and any instance
// ID an attestor can produce can be revoked by ID.
import t from 'tap'
import { decodeJwt } from 'jose'
import { startTestBroker, delegatedRequest, TEST_REGISTRY, API, MAIL, LEGACY, why, type TestBroker } from '../helpers/broker.js'
import { GRANT_TYPE } from '../../broker/exchange.js'
import { TOKEN_TYPES, MAX_AGENT_ID } from '../../broker/attest/attestor.js'
import { MAX_ACT_DEPTH } from '../../broker/act.js'
import { parseRegistry } from '../../broker/registry.js'
import { stringify } from 'yaml'

// summarizer may task itself (chains of any length can be attempted); helper may task the
// assistant (users: required) and the loner (users: none).
const REGISTRY = structuredClone(TEST_REGISTRY) as Omit<typeof TEST_REGISTRY, 'agents'> & { agents: Record<string, { may_task?: string[] }> }
REGISTRY.agents.summarizer!.may_task = ['summarizer', 'helper']
REGISTRY.agents.helper!.may_task = ['assistant', 'loner']

function selfRequest(attestation: string, extra: Record<string, string> = {}): Record<string, string> {
  return { grant_type: GRANT_TYPE, subject_token: attestation, subject_token_type: TOKEN_TYPES.local, audience: API, task_id: 'task-1', ...extra }
}

async function introspect(b: TestBroker, token: string): Promise<Record<string, unknown>> {
  const res = await fetch(`${b.url}/oauth2/introspect`, {
    method: 'POST',
    headers: { authorization: 'Basic ' + Buffer.from(`api-server:${b.introspectionSecret}`).toString('base64') },
    body: new URLSearchParams({ token }),
  })
  return (await res.json()) as Record<string, unknown>
}

async function admin(b: TestBroker, method: string, path: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${b.url}${path}`, { method, headers: { authorization: `Bearer ${b.adminToken}`, 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) })
  return { status: res.status, body: (await res.json()) as Record<string, unknown> }
}

function depth(act: unknown): number {
  let n = 0
  for (let cur = act as { act?: unknown } | undefined; cur; cur = cur.act as typeof cur) n++
  return n
}

t.test('a delegation chain is carried whole or refused, never cut', async (t) => {
  const b = await startTestBroker({ registry: REGISTRY })
  t.teardown(b.close)
  const root = 'agent:summarizer:prod:root'
  const first = await b.exchange(selfRequest(await b.attest(root), { audience: b.issuer }))
  t.equal(first.status, 200, why(first))
  // tokens[i] has an act chain of i + 1 agents, root innermost.
  const tokens = [first.body.access_token as string]
  for (let i = 1; i < MAX_ACT_DEPTH; i++) {
    const r = await b.exchange(delegatedRequest(tokens[i - 1]!, await b.attest(`agent:summarizer:prod:hop${i}`), { audience: b.issuer }))
    t.equal(r.status, 200, `hop ${i}: ${why(r)}`)
    tokens.push(r.body.access_token as string)
  }
  const deepest = tokens[MAX_ACT_DEPTH - 1]!
  t.equal(depth(decodeJwt(deepest).act), MAX_ACT_DEPTH, `a chain of ${MAX_ACT_DEPTH} agents is issued whole`)

  const tooDeep = `subject_token: delegating again would make a chain of ${MAX_ACT_DEPTH + 1} agents; at most ${MAX_ACT_DEPTH} are allowed`
  for (const audience of [b.issuer, API]) {
    const r = await b.exchange(delegatedRequest(deepest, await b.attest('agent:summarizer:prod:one-more'), { audience }))
    t.equal(r.status, 400)
    t.same(r.body, { error: 'invalid_request', error_description: tooDeep }, `one more hop is refused (audience ${audience === API ? 'API' : 'broker'})`)
  }

  // A token this broker signed with a deeper chain (an older broker cut chains at 8 and issued 9):
  // refused as a subject and inactive at introspection, its root revoked or not.
  const nowS = Math.floor(Date.now() / 1000)
  let act: Record<string, unknown> = { sub: root }
  for (let i = 1; i <= MAX_ACT_DEPTH; i++) act = { sub: `agent:summarizer:prod:hop${i}`, act }
  const forged = await b.broker.keys.sign({ iss: b.issuer, sub: root, aud: b.issuer, act, client_id: 'x', scope: 'read', task_id: 'task-1', iat: nowS, exp: nowS + 300, jti: 'deep-1' }, 'at+jwt')
  t.equal(depth(decodeJwt(forged).act), MAX_ACT_DEPTH + 1)
  const forgedUse = await b.exchange(delegatedRequest(forged, await b.attest('agent:helper:prod:h')))
  t.same(forgedUse.body, { error: 'invalid_request', error_description: `subject_token: its delegation chain is deeper than ${MAX_ACT_DEPTH} agents` })
  t.same(await introspect(b, forged), { active: false }, 'a chain too deep to read whole is inactive (fail closed)')
  t.equal((await introspect(b, deepest)).active, true, `a chain of ${MAX_ACT_DEPTH} is active`)

  // Revoking the root reaches every descendant, the deepest included.
  t.equal((await admin(b, 'POST', '/v1/revocations', { kind: 'agent', value: root })).status, 201)
  t.same(await introspect(b, deepest), { active: false }, 'the deepest descendant of a revoked root is inactive')
  const after = await b.exchange(delegatedRequest(tokens[MAX_ACT_DEPTH - 2]!, await b.attest('agent:summarizer:prod:late')))
  t.same(after.body, { error: 'invalid_request', error_description: `agent ${root} is revoked` })
})

t.test('users: required and users: none hold at every depth of a chain', async (t) => {
  const b = await startTestBroker({ registry: REGISTRY })
  t.teardown(b.close)
  // No user: summarizer acts for itself, hands to helper, helper hands on.
  const selfDel = await b.exchange(selfRequest(await b.attest('agent:summarizer:prod:s'), { audience: b.issuer }))
  t.equal(selfDel.status, 200, why(selfDel))
  const helperDel = await b.exchange(delegatedRequest(selfDel.body.access_token as string, await b.attest('agent:helper:prod:h'), { audience: b.issuer }))
  t.equal(helperDel.status, 200, why(helperDel))
  t.equal(decodeJwt(helperDel.body.access_token as string).sub, 'agent:summarizer:prod:s', 'the subject is still the first agent')

  const assistant = await b.exchange(delegatedRequest(helperDel.body.access_token as string, await b.attest('agent:assistant:prod:a')))
  t.equal(assistant.status, 400)
  t.same(assistant.body, { error: 'invalid_request', error_description: 'agent type "assistant" requires a user subject_token' }, 'two hops from an agent are still no user')
  const refused = b.events.filter((e) => e.type === 'token.exchange').at(-1)
  t.match(refused, { outcome: 'refused', user: null, delegated_by: ['agent:summarizer:prod:s', 'agent:helper:prod:h'] })
  const loner = await b.exchange(delegatedRequest(helperDel.body.access_token as string, await b.attest('agent:loner:prod:l')))
  t.equal(loner.status, 200, `users: none may act for an agent-rooted chain: ${why(loner)}`)

  // With a user at the root, the same two hops carry the user.
  const userDel = await b.exchange(delegatedRequest(await b.userToken('alice', 'read write'), await b.attest('agent:summarizer:prod:s'), { audience: b.issuer }))
  const userHelper = await b.exchange(delegatedRequest(userDel.body.access_token as string, await b.attest('agent:helper:prod:h'), { audience: b.issuer }))
  t.equal(userHelper.status, 200, why(userHelper))
  const ok = await b.exchange(delegatedRequest(userHelper.body.access_token as string, await b.attest('agent:assistant:prod:a')))
  t.equal(ok.status, 200, why(ok))
  t.equal(decodeJwt(ok.body.access_token as string).sub, 'alice')
  const lonerUser = await b.exchange(delegatedRequest(userHelper.body.access_token as string, await b.attest('agent:loner:prod:l')))
  t.same(lonerUser.body, { error: 'invalid_request', error_description: 'agent type "loner" may not act for users' })
})

t.test('a leased secret is bound by the user consent as a JWT is', async (t) => {
  const MAIL_KEY = 'LK-CANARY-MAIL-KEY-7731'
  const LEGACY_KEY = 'LK-CANARY-LEGACY-KEY-7732'
  const b = await startTestBroker({
    broker: { leased_secrets: { [MAIL]: 'LK_TEST_MAIL_KEY', [LEGACY]: 'LK_TEST_LEGACY_KEY' } },
    env: { LK_TEST_MAIL_KEY: MAIL_KEY, LK_TEST_LEGACY_KEY: LEGACY_KEY },
  })
  t.teardown(b.close)
  const agent = 'agent:summarizer:prod:lease'
  const withActor = async (user: string, extra: Record<string, string> = {}) =>
    b.exchange(delegatedRequest(user, await b.attest(agent), { audience: MAIL, requested_token_type: TOKEN_TYPES.leasedSecret, ...extra }))
  const none = 'the subject_token grants none of the scopes this agent may receive for this audience'

  const jwt = await b.exchange(delegatedRequest(await b.userToken('alice', 'read'), await b.attest(agent), { audience: MAIL }))
  t.same(jwt.body, { error: 'invalid_scope', error_description: none }, 'a JWT for mail is refused to a user who granted only read')
  const readOnly = await withActor(await b.userToken('alice', 'read'))
  t.same(readOnly.body, { error: 'invalid_scope', error_description: none }, 'and so is the mail lease')
  const noScope = await withActor(await b.users.sign({ sub: 'alice', aud: 'latchkey', exp: Math.floor(Date.now() / 1000) + 3600 }))
  t.same(noScope.body, { error: 'invalid_scope', error_description: none }, 'a user token with no scope claim leases nothing')
  const asked = await withActor(await b.userToken('alice', 'read'), { scope: 'mail.send' })
  t.same(asked.body, { error: 'invalid_scope', error_description: 'the subject_token does not grant scope mail.send' }, 'a requested scope the user did not grant is refused')
  const beyond = await withActor(await b.userToken('alice', 'read mail.send'), { scope: 'admin' })
  t.same(beyond.body, { error: 'invalid_scope', error_description: 'agent type "summarizer" may not receive 1 requested scope no agent type is granted (not repeated: it may be a token)' })
  for (const r of [readOnly, noScope, asked, beyond]) t.notOk(JSON.stringify(r.body).includes(MAIL_KEY), 'no secret in a refusal')

  const granted = await withActor(await b.userToken('alice', 'read mail.send'))
  t.equal(granted.status, 200, why(granted))
  t.match(granted.body, { access_token: MAIL_KEY, token_type: 'N_A', issued_token_type: TOKEN_TYPES.leasedSecret })
  const alone = await b.exchange(selfRequest(await b.attest(agent), { audience: MAIL, requested_token_type: TOKEN_TYPES.leasedSecret }))
  t.equal(alone.status, 200, `an agent acting for itself is bounded by its policy alone: ${why(alone)}`)
  // An audience the registry names no scopes for has nothing to consent to: lent as before.
  const legacy = await withActor(await b.userToken('alice', 'read'), { audience: LEGACY })
  t.equal(legacy.status, 200, why(legacy))
  t.equal(legacy.body.access_token, LEGACY_KEY)
})

t.test('a user token whose sub reads as an agent ID is refused, whatever its case or spacing', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const said = { error: 'invalid_request', error_description: 'subject_token: its sub is an agent instance ID (agent:…), not a user' }
  for (const sub of ['agent:summarizer:prod:x', 'AGENT:summarizer:prod:x', 'Agent:summarizer:prod:x', ' agent:summarizer:prod:x', '\tagent:summarizer:prod:x\n', '\uff41gent:summarizer:prod:x']) {
    const r = await b.exchange(delegatedRequest(await b.userToken(sub, 'read'), await b.attest('agent:summarizer:prod:1')))
    t.same(r.body, said, `${JSON.stringify(sub)} is refused`)
  }
  const fine = await b.exchange(delegatedRequest(await b.userToken('agentsmith', 'read'), await b.attest('agent:summarizer:prod:1')))
  t.equal(fine.status, 200, `a user merely named agent… is a user: ${why(fine)}`)
})

t.test('the longest instance ID an attestor issues can be revoked by ID', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const pod = 'p' + 'x'.repeat(252)
  const sa = await b.k8s.sign({
    aud: b.issuer,
    sub: 'system:serviceaccount:agents:summarizer',
    'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u1' }, pod: { name: pod, uid: 'p1' } },
  })
  const k8sRequest = async () =>
    delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u1' }, pod: { name: pod, uid: 'p1' } } }), { actor_token_type: TOKEN_TYPES.kubernetes })
  const first = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), sa, { actor_token_type: TOKEN_TYPES.kubernetes }))
  t.equal(first.status, 200, why(first))
  const instance = `agent:summarizer-k8s:prod:${pod}`
  t.equal(instance.length, 279)
  t.equal((decodeJwt(first.body.access_token as string).act as { sub: string }).sub, instance)

  const revoked = await admin(b, 'POST', '/v1/revocations', { kind: 'agent', value: instance })
  t.equal(revoked.status, 201, `a 253-character instance is revocable: ${JSON.stringify(revoked.body)}`)
  const refused = await b.exchange(await k8sRequest())
  t.same(refused.body, { error: 'invalid_request', error_description: `agent ${instance} is revoked` })
  t.same(await introspect(b, first.body.access_token as string), { active: false })
  t.equal((await admin(b, 'DELETE', `/v1/revocations/agent/${encodeURIComponent(instance)}`)).status, 200)
  t.equal((await b.exchange(await k8sRequest())).status, 200, 'and unrevocable')

  // The limit is the longest ID the registry and attestors allow, and no more.
  const name63 = 'n'.repeat(63)
  const longest = `agent:${name63}:${name63}:${'i'.repeat(253)}`
  t.equal(longest.length, MAX_AGENT_ID)
  t.equal((await admin(b, 'POST', '/v1/revocations', { kind: 'agent', value: longest })).status, 201)
  t.same(await admin(b, 'POST', '/v1/revocations', { kind: 'agent', value: longest + 'i' }), {
    status: 400,
    body: { error: 'invalid_request', error_description: `value must be a string of 1 to ${MAX_AGENT_ID} characters` },
  })
  t.equal((await admin(b, 'POST', '/v1/revocations', { kind: 'task', value: 't'.repeat(257) })).status, 400, 'a task or jti keeps its own limit')
  const long = structuredClone(TEST_REGISTRY) as { agents: Record<string, unknown> }
  long.agents['t'.repeat(64)] = { env: 'prod', match: { local: true }, audiences: { [API]: ['read'] }, max_lifetime_s: 60 }
  t.throws(() => parseRegistry(stringify(long)), { code: 'LK_REGISTRY_INVALID', message: /more than 63 characters/ }, 'an agent type name longer than a DNS label is refused by the registry')
})

t.test("revoking a delegation's task or jti reaches every token already derived from it", async (t) => {
  const b = await startTestBroker({ registry: REGISTRY })
  t.teardown(b.close)
  const user = await b.userToken('u', 'read write')
  const ok = (r: { status: number; body: Record<string, unknown> }) => {
    t.equal(r.status, 200, why(r))
    return r.body.access_token as string
  }
  // root (task root-task) delegates to mid (its own task), which delegates on; each leaf has its own task.
  const root = ok(await b.exchange(delegatedRequest(user, await b.attest('agent:summarizer:prod:root'), { audience: b.issuer, task_id: 'root-task' })))
  const mid = ok(await b.exchange(delegatedRequest(root, await b.attest('agent:summarizer:prod:mid'), { audience: b.issuer, task_id: 'mid-task' })))
  const leaf = ok(await b.exchange(delegatedRequest(root, await b.attest('agent:helper:prod:leaf'), { task_id: 'leaf-task' })))
  const deep = ok(await b.exchange(delegatedRequest(mid, await b.attest('agent:helper:prod:deep'), { task_id: 'deep-task' })))
  const other = ok(await b.exchange(delegatedRequest(user, await b.attest('agent:summarizer:prod:other'), { audience: b.issuer, task_id: 'other-task' })))
  const bystander = ok(await b.exchange(delegatedRequest(other, await b.attest('agent:helper:prod:by'), { task_id: 'by-task' })))
  for (const tok of [leaf, deep, bystander]) t.equal((await introspect(b, tok)).active, true)

  t.equal((await admin(b, 'POST', '/v1/revocations', { kind: 'task', value: 'root-task' })).status, 201)
  t.same(await introspect(b, leaf), { active: false }, "a token derived from the root's delegation falls with the root's task")
  t.same(await introspect(b, deep), { active: false }, 'and one derived two delegations down')
  const again = await b.exchange(delegatedRequest(mid, await b.attest('agent:helper:prod:deep'), { task_id: 'deep-task-2' }))
  t.equal(again.status, 400, why(again))
  t.match(again.body.error_description, /task root-task is revoked/, "mid's delegation, resting on the revoked task, is refused too")
  t.equal((await introspect(b, bystander)).active, true, 'another delegation is untouched')

  // A jti revocation of the delegation token reaches its descendants the same way.
  t.equal((await admin(b, 'POST', '/v1/revocations', { kind: 'jti', value: decodeJwt(other).jti })).status, 201)
  t.same(await introspect(b, bystander), { active: false }, "a token derived from a revoked delegation token")
})

t.test('a delegation is bounded audience by audience: a scope held at one audience is not delegated at another', async (t) => {
  const BILLING = 'https://billing.example.com'
  const registry = structuredClone(TEST_REGISTRY) as { version: number; agents: Record<string, unknown> }
  // `admin` means one thing at MAIL and another at API: the planner holds it only at MAIL.
  registry.agents = {
    planner: { env: 'prod', match: { local: true }, audiences: { [API]: ['read'], [MAIL]: ['admin'] }, max_lifetime_s: 600, users: 'optional', may_task: ['worker'] },
    worker: { env: 'prod', match: { local: true }, audiences: { [API]: ['read', 'admin'], [MAIL]: ['admin'], [BILLING]: ['read'] }, max_lifetime_s: 600, users: 'optional', may_task: ['worker'] },
  }
  const b = await startTestBroker({ registry: registry as typeof TEST_REGISTRY })
  t.teardown(b.close)
  const details = (token: string) => decodeJwt(token).authorization_details
  const grant = (aud: string, actions: string[]) => ({ type: 'latchkey_delegation', locations: [aud], actions })

  const del = await b.exchange(delegatedRequest(await b.userToken('alice', 'read admin'), await b.attest('agent:planner:prod:p'), { audience: b.issuer }))
  t.equal(del.status, 200, why(del))
  const token = del.body.access_token as string
  t.same(details(token), [grant(API, ['read']), grant(MAIL, ['admin'])], 'the delegation names each audience with the scopes held there')
  t.equal(del.body.scope, 'read admin', 'its scope is their union, as before')
  t.same((await introspect(b, token)).authorization_details, details(token), 'introspection answers them (RFC 9396 §9.2)')

  const worker = async (subject: string, extra: Record<string, string> = {}) => b.exchange(delegatedRequest(subject, await b.attest('agent:worker:prod:w'), extra))
  const adminAtApi = await worker(token, { scope: 'admin' })
  t.same(adminAtApi.body, { error: 'invalid_scope', error_description: 'the subject_token does not grant scope admin' }, 'admin, delegated at MAIL, is refused at API')
  const plain = await worker(token)
  t.equal(plain.status, 200, why(plain))
  t.equal(plain.body.scope, 'read', 'unasked, the worker gets at API only what the planner held at API')
  const atMail = await worker(token, { audience: MAIL })
  t.equal(atMail.body.scope, 'admin', `at MAIL it gets admin: ${why(atMail)}`)
  const billing = await worker(token, { audience: BILLING })
  t.same(billing.body, { error: 'invalid_target', error_description: 'the delegation in subject_token does not cover this audience' }, 'an audience the planner holds nothing at is not reached through it')

  // Narrowed by what the delegator asks for: an audience left with no scope is not delegated.
  const narrow = await b.exchange(selfRequest(await b.attest('agent:planner:prod:p'), { audience: b.issuer, scope: 'read' }))
  t.same(details(narrow.body.access_token as string), [grant(API, ['read'])], 'asking for read delegates API alone')
  const mailNarrow = await worker(narrow.body.access_token as string, { audience: MAIL })
  t.same(mailNarrow.body, { error: 'invalid_target', error_description: 'the delegation in subject_token does not cover this audience' })

  // Delegated again, the worker's wider registry entry does not widen the chain.
  const again = await b.exchange(delegatedRequest(token, await b.attest('agent:worker:prod:w'), { audience: b.issuer }))
  t.equal(again.status, 200, why(again))
  t.same(details(again.body.access_token as string), [grant(API, ['read']), grant(MAIL, ['admin'])], 'a second hop keeps each audience to the first')
  const leaf = await worker(again.body.access_token as string, { scope: 'admin' })
  t.same(leaf.body, { error: 'invalid_scope', error_description: 'the subject_token does not grant scope admin' })

  // A delegation token without the claim (or with one that cannot be read whole) bounds nothing: refused.
  const nowS = Math.floor(Date.now() / 1000)
  const sign = (extra: Record<string, unknown>) =>
    b.broker.keys.sign({ iss: b.issuer, sub: 'alice', aud: b.issuer, act: { sub: 'agent:planner:prod:p' }, client_id: 'agent:planner:prod:p', scope: 'read admin', task_id: 'task-1', iat: nowS, exp: nowS + 300, jti: `j-${Math.random()}`, ...extra }, 'at+jwt')
  const malformed = 'subject_token: authorization_details claim is missing or malformed'
  for (const [label, extra] of [
    ['absent (a flat scope only)', {}],
    ['not a list', { authorization_details: grant(API, ['read']) }],
    ['another type', { authorization_details: [{ ...grant(API, ['read']), type: 'payment_initiation' }] }],
    ['two locations in one entry', { authorization_details: [{ type: 'latchkey_delegation', locations: [API, BILLING], actions: ['read'] }] }],
    ['one audience twice', { authorization_details: [grant(API, ['read']), grant(API, ['admin'])] }],
    ['an action that is not a string', { authorization_details: [grant(API, [1 as unknown as string])] }],
  ] as [string, Record<string, unknown>][]) {
    const r = await worker(await sign(extra))
    t.same(r.body, { error: 'invalid_request', error_description: malformed }, `refused: ${label}`)
  }
})

// RFC 8693 §4.4: a user token's may_act names the one agent allowed to act for the user. A
// delegation token carries no may_act, so one issued from such a user token let the agent tasked
// with it act for the user (sub = the user, act = the tasked agent), whom the user never named.
t.test("a user token's may_act is not delegated away: no delegation token is issued from it", async (t) => {
  const b = await startTestBroker({ registry: REGISTRY })
  t.teardown(b.close)
  const named = 'agent:summarizer:prod:named'
  const user = await b.userToken('u', 'read', { may_act: { sub: named } })
  const own = await b.exchange(delegatedRequest(user, await b.attest(named)))
  t.equal(own.status, 200, `the named agent acts for the user itself (${why(own)})`)
  const d = await b.exchange(delegatedRequest(user, await b.attest(named), { audience: b.issuer }))
  t.equal(d.status, 400, why(d))
  t.match(d.body, { error: 'invalid_request', error_description: /may_act lets only the agent it names act for the user/ })
  t.notOk('access_token' in d.body, 'no delegation token')
  // Without may_act the same delegation is served, and its child acts for the user.
  const free = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(named), { audience: b.issuer }))
  t.equal(free.status, 200, why(free))
  const child = await b.exchange(delegatedRequest(free.body.access_token as string, await b.attest('agent:helper:prod:tasked')))
  t.equal(child.status, 200, why(child))
})
