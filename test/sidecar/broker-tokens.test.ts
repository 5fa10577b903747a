// Issue 4's done-when, end to end and all real: broker, sidecar, and an API that verifies the
// broker's JWT. A task is opened for a user; the agent (curl, its own process) calls through the
// task's proxy URL; the API sees sub = user, act.sub = agent instance, one aud, the intersected
// scopes and the task-derived expiry; nothing the agent can see holds the token.
import t from 'tap'
import { execFile } from 'node:child_process'
import { createHash } from 'node:crypto'
import { promisify } from 'node:util'
import { join } from 'node:path'
import { API, startTestBroker } from '../helpers/broker.js'
import { startTokenRig, AGENT } from '../helpers/tokens.js'
import { LocalKeyEvidence } from '../../proxy/attest/local-key.js'
import { BrokerClient } from '../../proxy/credentials/broker-client.js'
import { BrokerTokenSource, FAILURE_HOLD_MS } from '../../proxy/credentials/broker-source.js'
import { compileBinding } from '../../proxy/credentials/bindings.js'
import { TaskRegistry } from '../../proxy/tasks/registry.js'

const run = promisify(execFile)
const cleanEnv = () => {
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  return env
}

t.test('a task for a user: the API receives the delegated, narrowed, task-bound token', async (t) => {
  const rig = await startTokenRig()
  t.teardown(rig.close)
  // The user holds read, write and admin; the binding asks for read; the agent may have read+write.
  const userToken = await rig.broker.userToken('alice@example.com', 'read write admin')
  const opened = await rig.openTask({ purpose: 'summarise the inbox', duration_s: 600, user_token: userToken, audiences: [API] })
  t.equal(opened.status, 201, JSON.stringify(opened.body.reason ?? ''))
  const handle = opened.body.task as string
  t.match(handle, /^lkt_[A-Za-z0-9_-]{22}$/)
  t.equal(opened.body.proxy_url, `http://task:${handle}@${rig.sidecar.proxy.slice('http://'.length)}`)
  t.equal(opened.body.user, 'alice@example.com')
  t.equal(rig.broker.events.filter((e) => e.type === 'token.exchange').length, 1, 'the wanted audience was fetched when the task opened')

  const started = Math.floor(Date.now() / 1000)
  const curl = await run('curl', ['-sS', '-x', opened.body.proxy_url as string, `${rig.api.origin}/v1/messages`], { env: cleanEnv() })
  const answer = JSON.parse(curl.stdout) as Record<string, unknown>
  t.same(answer, { sub: 'alice@example.com', act: { sub: AGENT }, scope: 'read' }, 'the agent got the API\'s answer')

  const first = rig.api.seen[0]
  t.ok(first && 'claims' in first, 'the API verified the JWT against the broker\'s JWKS')
  const claims = (first as { claims: Record<string, unknown> }).claims
  t.equal(claims.sub, 'alice@example.com', 'sub = the user')
  t.same(claims.act, { sub: AGENT }, 'act.sub = the agent instance')
  t.equal(claims.aud, API, 'exactly one audience')
  t.equal(claims.scope, 'read', 'user ∩ agent policy ∩ what the binding asks')
  t.equal(claims.task_id, opened.body.id, 'the task ID, not its handle')
  const lifetime = (claims.exp as number) - (claims.iat as number)
  t.ok(lifetime >= 715 && lifetime <= 720, `expiry derived from the task: 600 s × 1.2 (got ${lifetime})`)
  t.ok((claims.iat as number) >= started - 5, 'freshly issued')

  // A second call reuses the cached token: no new exchange.
  await run('curl', ['-sS', '-x', opened.body.proxy_url as string, `${rig.api.origin}/v1/other`], { env: cleanEnv() })
  t.equal(rig.broker.events.filter((e) => e.type === 'token.exchange').length, 1, 'cached: one exchange for two calls')
  t.equal(rig.api.tokens[0], rig.api.tokens[1])
  // The handle alone as the user part (what the design first drew) works for curl too.
  const bare = await run('curl', ['-sS', '-x', `http://${handle}@${rig.sidecar.proxy.slice('http://'.length)}`, `${rig.api.origin}/v1/bare`], { env: cleanEnv() })
  t.match(JSON.parse(bare.stdout), { sub: 'alice@example.com' })

  // Nothing the agent saw, nothing logged or audited, holds the token.
  const token = rig.api.tokens[0]!
  const described = await (await fetch(`${rig.sidecar.sidecar.adminUrl}/v1/tasks/${handle}`)).text()
  t.match(JSON.parse(described), { id: opened.body.id, tokens: [{ audience: API, scopes: ['read'], jti: claims.jti }] }, 'the task lists what it holds')
  const seenByAgent = curl.stdout + curl.stderr + JSON.stringify(opened.body) + described
  const tail = token.slice(-40)
  t.notOk(seenByAgent.includes(tail), 'the agent never sees the token')
  t.notOk(rig.sidecar.logs.join('').includes(tail), 'no log line holds it')
  const audit = await rig.sidecar.audit()
  t.notOk(JSON.stringify(audit).includes(tail), 'no audit event holds it')
  t.notOk(JSON.stringify(audit).includes(handle) || rig.sidecar.logs.join('').includes(handle), 'nor the task handle')
  t.match(audit[0], { task: opened.body.id, user: 'alice@example.com', credential: { binding: 'api', id: claims.jti, scopes: ['read'] } }, 'the audit names the task, user and jti')
  // The JSON-lines event carries the hash the collector's does, so the broker's records join either.
  t.equal((audit[0]!.credential as Record<string, unknown>).token_sha256, createHash('sha256').update(token).digest('hex'), 'the audit line holds the token\'s SHA-256, not the token')

  // Ending the task drops its tokens; its handle is refused with 407.
  t.equal((await fetch(`${rig.sidecar.sidecar.adminUrl}/v1/tasks/${handle}`, { method: 'DELETE' })).status, 204)
  t.same(rig.sidecar.sidecar.brokerTokens!.describe(opened.body.id as string), [], 'its tokens are gone')
  const after = await run('curl', ['-sS', '-i', '-x', opened.body.proxy_url as string, `${rig.api.origin}/v1/messages`], { env: cleanEnv() })
  t.match(after.stdout, /^HTTP\/1\.1 407 /)
  t.match(after.stdout, /no open task/)
  t.equal(rig.api.seen.length, 3, 'the ended task\'s request never reached the API')
})

const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'

t.test('a user token is taken as the broker takes it: its newline dropped, any other spelling refused when the task opens', async (t) => {
  const rig = await startTokenRig()
  t.teardown(rig.close)
  const userToken = await rig.broker.userToken('carol@example.com', 'read')
  // Read from a file, with its newline: the same token.
  const withNewline = await rig.openTask({ purpose: 'from a file', duration_s: 60, user_token: `${userToken}\n`, audiences: [API] })
  t.equal(withNewline.status, 201, JSON.stringify(withNewline.body.reason ?? ''))
  t.equal(withNewline.body.user, 'carol@example.com')
  const [head, payload, signature] = userToken.split('.')
  for (const [how, spelling] of [
    ['padded', `${userToken}==`],
    ['whitespace inside', `${head}.${payload}.${signature!.slice(0, 10)} ${signature!.slice(10)}`],
    ['standard base64', `${head}.${payload}.${signature!.replace(/-/g, '+').replace(/_/g, '/')}+/`],
    ['no signature', `${head}.${payload}.`],
    // The bits past the signature's last whole byte: decoders drop them, so 16 spellings read alike.
    ['a spare bit set', `${userToken.slice(0, -1)}${B64URL[B64URL.indexOf(userToken.at(-1)!) ^ 1]}`],
  ] as const) {
    const r = await rig.openTask({ purpose: how, duration_s: 60, user_token: spelling, audiences: [API] })
    t.same([r.status, r.body.reason], [400, 'user_token must be a signed JWT in compact form: three base64url segments joined by dots, without padding, each spelled canonically (no spare bits set)'], `${how}: refused at once, naming what is wrong`)
    t.notOk(JSON.stringify(r.body).includes(signature!.slice(0, 20)), `${how}: the answer does not quote the token`)
  }
})

t.test('Node fetch and Python with the proxy URL', async (t) => {
  const rig = await startTokenRig()
  t.teardown(rig.close)
  const opened = await rig.openTask({ purpose: 'clients', duration_s: 120, user_token: await rig.broker.userToken('bob', 'read') })
  const proxy = opened.body.proxy_url as string
  const node = await run(process.execPath, ['-e', `
    const { EnvHttpProxyAgent, fetch } = require('undici');
    fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() }).then(r => r.text()).then(console.log)
  `, `${rig.api.origin}/n`], { env: { ...cleanEnv(), HTTP_PROXY: proxy } })
  t.match(JSON.parse(node.stdout), { sub: 'bob', act: { sub: AGENT } })
  const py = await run('python3', ['-c', 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())', `${rig.api.origin}/p`], { env: { ...cleanEnv(), HTTP_PROXY: proxy } })
  t.match(JSON.parse(py.stdout), { sub: 'bob', act: { sub: AGENT } })
})

t.test('an agent acting for itself, and a default task', async (t) => {
  const rig = await startTokenRig({ sidecar: { tasks: { default: { enabled: true, duration_s: 300 } } } })
  t.teardown(rig.close)
  const res = await run('curl', ['-sS', '-x', rig.sidecar.proxy, `${rig.api.origin}/d`], { env: cleanEnv() })
  t.same(JSON.parse(res.stdout), { sub: AGENT, act: { sub: AGENT }, scope: 'read' }, 'no proxy credential: the default task, the agent as subject')
})

// The probe's case: sidecar.agent_id says one instance, the workload's evidence attests another.
// The API would see act.sub = the attested one while the audit and revocation state name the
// configured one, so the token is refused: never injected, never cached.
const DECLARED = AGENT // agent:summarizer:prod:e2e, the rig's sidecar.agent_id
const REAL = 'agent:summarizer:prod:real'

t.test('the broker attests another agent than sidecar.agent_id: no token, the API sees nothing, the audit says why', async (t) => {
  const broker = await startTestBroker()
  const rig = await startTokenRig({
    broker,
    sidecarOptions: { evidence: new LocalKeyEvidence(join(broker.dir, 'local', 'local-attestor.key.json'), REAL, broker.issuer) },
  })
  t.teardown(rig.close)
  // (With a user token the task would not open at all: the broker verifies one before it does.)
  const opened = await rig.openTask({ purpose: 'mismatch', duration_s: 120 })
  t.equal(opened.status, 201)
  const res = await run('curl', ['-sS', '-i', '-x', opened.body.proxy_url as string, `${rig.api.origin}/v1/messages`], { env: cleanEnv() })
  t.match(res.stdout, /^HTTP\/1\.1 503 /)
  t.match(res.stdout, /LK_CREDENTIAL_UNAVAILABLE/)
  t.match(res.stdout, /the broker attested agent agent:summarizer:prod:real, not sidecar\.agent_id agent:summarizer:prod:e2e/)
  t.equal(rig.api.seen.length, 0, 'the API saw nothing')
  t.equal(rig.api.tokens.length, 0)
  t.same(rig.sidecar.sidecar.brokerTokens!.describe(opened.body.id as string), [], 'nothing cached for a revocation of either ID to miss')
  const exchanged = rig.broker.events.filter((e) => e.type === 'token.exchange')
  t.ok(exchanged.length >= 1 && exchanged.every((e) => e.agent === REAL), 'the broker did issue, for the attested agent')

  const audit = await rig.sidecar.audit()
  const refusal = audit.find((e) => JSON.stringify(e).includes('LK_CREDENTIAL_UNAVAILABLE'))
  t.ok(refusal, 'the refusal is audited')
  t.match(JSON.stringify(refusal), /attested agent agent:summarizer:prod:real, not sidecar\.agent_id agent:summarizer:prod:e2e/, 'naming both IDs')
  t.notOk(JSON.stringify(audit).includes('eyJ') || rig.sidecar.logs.join('').includes('eyJ'), 'no token in the audit or the logs')
})

t.test('the token source refuses a token for another actor, and reports it once', async (t) => {
  const broker = await startTestBroker()
  t.teardown(broker.close)
  const reports: [string, string | null][] = []
  const granted: string[] = []
  let clock = Date.now()
  const src = new BrokerTokenSource(new BrokerClient(broker.url, 2000, new LocalKeyEvidence(join(broker.dir, 'local', 'local-attestor.key.json'), REAL, broker.issuer)), {
    minRemainingMs: 1000,
    now: () => clock,
    onExchange: (o) => granted.push(o),
    onActorMismatch: (configured, attested) => reports.push([configured, attested]),
  })
  t.teardown(() => src.close())
  const binding = compileBinding({ id: 'api', audience: 'https://api.example.com', source: 'broker', inject: { type: 'bearer' } })
  const declared = new TaskRegistry(DECLARED, { maxDurationS: 3600, now: () => clock })
  const task = declared.open({ purpose: 'p', durationS: 60 })
  for (let i = 0; i < 3; i++) {
    await t.rejects(Promise.resolve().then(() => src.get(binding, task.identity)), { code: 'LK_CREDENTIAL_UNAVAILABLE', message: /attested agent agent:summarizer:prod:real, not sidecar\.agent_id agent:summarizer:prod:e2e/ })
    clock += FAILURE_HOLD_MS + 1
  }
  t.same(granted, ['invalid_response', 'invalid_response', 'invalid_response'], 'every attempt was an exchange, refused')
  t.same(reports, [[DECLARED, REAL]], 'reported once, not once per attempt')
  t.same(src.describe(task.id), [])

  // The same source, for a task of the agent it does attest: served.
  const real = new TaskRegistry(REAL, { maxDurationS: 3600, now: () => clock })
  const ok = await src.get(binding, real.open({ purpose: 'q', durationS: 60 }).identity)
  t.ok(ok.value.length > 0)
})
