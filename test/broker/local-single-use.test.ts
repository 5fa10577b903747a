// A local attestation is single-use across broker restarts and across replicas sharing a store:
// its jti is recorded in the store, not in one process's memory. Real brokers, one local key and
// one issuer shared, so the replayed evidence is refused for being replayed and nothing else.
import t from 'tap'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import pg from 'pg'
import { startTestBroker, API, why, type TestBroker } from '../helpers/broker.js'
import { ensureLocalAttestorKey, signLocalAttestation, LOCAL_ISSUER } from '../../lib/local-attestor.js'
import { SignJWT } from 'jose'
import { GRANT_TYPE } from '../../broker/exchange.js'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'
import type { BrokerConfig } from '../../lib/config/schema.js'

const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'
const ISSUER = 'https://broker.single-use.test'
const AGENT = 'agent:summarizer:prod:once'

async function setup() {
  const dir = mkdtempSync(join(tmpdir(), 'lk-single-use-'))
  const key = await ensureLocalAttestorKey(join(dir, 'local'))
  const start = (store: BrokerConfig['store']) => startTestBroker({ store, broker: { issuer: ISSUER, attestors: { local: { keys_file: key.jwksFile } } } })
  // The agent acting for itself: no user IdP, whose test keys differ from broker to broker.
  const request = (attestation: string) => ({ grant_type: GRANT_TYPE, subject_token: attestation, subject_token_type: TOKEN_TYPES.local, audience: API, task_id: 'task-1' })
  /** Evidence as the local attestor would sign it, with claims of a test's choosing. */
  const attestWith = (claims: Record<string, unknown>) => {
    const now = Math.floor(Date.now() / 1000)
    return new SignJWT({ iss: LOCAL_ISSUER, sub: AGENT, aud: ISSUER, iat: now, exp: now + 60, jti: randomBytes(8).toString('hex'), ...claims })
      .setProtectedHeader({ alg: 'ES256', kid: key.kid, typ: 'JWT' })
      .sign(key.privateKey)
  }
  return { dir, start, request, attest: () => signLocalAttestation(key, AGENT, ISSUER), attestWith }
}

t.test('a local attestation used before a restart is refused after it', async (t) => {
  const s = await setup()
  const store = { sqlite: { path: join(s.dir, 'broker.db') } }
  const attestation = await s.attest()
  const before = await s.start(store)
  const used = await before.exchange(s.request(attestation))
  t.equal(used.status, 200, why(used))
  await before.close()

  const after = await s.start(store)
  t.teardown(after.close)
  const replay = await after.exchange(s.request(attestation))
  t.equal(replay.status, 400, 'refused after the restart')
  t.match(String(replay.body.error_description), /replayed/)
  const fresh = await after.exchange(s.request(await s.attest()))
  t.equal(fresh.status, 200, `fresh evidence is taken at once after the restart (${why(fresh)})`)
})

t.test('replicas sharing a PostgreSQL store accept a local attestation once between them', async (t) => {
  const s = await setup()
  const schema = `lk_test_${randomBytes(6).toString('hex')}`
  t.teardown(async () => {
    const c = new pg.Client(PG_URL)
    await c.connect()
    await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`)
    await c.end()
  })
  const store = { postgres: { url: PG_URL, schema } }
  const replicas: TestBroker[] = [await s.start(store), await s.start(store)]
  t.teardown(() => Promise.all(replicas.map((r) => r.close())))
  const [a, b] = replicas as [TestBroker, TestBroker]

  const attestation = await s.attest()
  const first = await a.exchange(s.request(attestation))
  t.equal(first.status, 200, why(first))
  const elsewhere = await b.exchange(s.request(attestation))
  t.equal(elsewhere.status, 400, 'refused by the other replica')
  t.match(String(elsewhere.body.error_description), /replayed/)

  // Any jti a JWT may carry, and a fractional exp (RFC 7519 NumericDate), is recorded as any
  // other: PostgreSQL refused a NUL, a key over its index row size, and a non-integer BIGINT,
  // each a 503 that sent the operator after a healthy database.
  const now = Math.floor(Date.now() / 1000)
  for (const [what, claims] of [
    ['a NUL in the jti', { jti: `nul-${randomBytes(4).toString('hex')}\u0000x` }],
    ['an 8,000-character jti', { jti: randomBytes(4000).toString('hex') }],
    ['a lone surrogate in the jti', { jti: `s-${randomBytes(4).toString('hex')}\ud800` }],
    ['a fractional exp', { exp: now + 60.0001 }],
  ] as const) {
    const odd = await s.attestWith(claims)
    const once = await a.exchange(s.request(odd))
    t.equal(once.status, 200, `${what}: taken (${why(once)})`)
    const again = await b.exchange(s.request(odd))
    t.match([again.status, again.body.error_description], [400, /replayed/], `${what}: and refused when replayed`)
  }

  // Sent to both at once: one wins.
  const racing = await s.attest()
  const both = await Promise.all([a.exchange(s.request(racing)), b.exchange(s.request(racing))])
  t.same(both.map((r) => r.status).sort(), [200, 400], 'the same evidence sent to both replicas at once is granted once')
})

t.test('a store that cannot record the single use: 503, retryable, and no token', async (t) => {
  const s = await setup()
  const b = await s.start({ sqlite: { path: join(s.dir, 'broker.db') } })
  t.teardown(b.close)
  await b.broker.revocations.store.close()
  const res = await b.exchange(s.request(await s.attest()))
  t.equal(res.status, 503)
  t.equal(res.body.error, 'temporarily_unavailable')
  t.equal(res.body.error_description, 'subject_token: could not be checked; try again later')
  t.notOk('access_token' in res.body, 'no token')
  const event = [...b.events].reverse().find((e) => e.type === 'token.exchange')
  t.match(event, { outcome: 'refused', reason: /single use could not be recorded \(store unavailable: / }, 'the event says why')
})
