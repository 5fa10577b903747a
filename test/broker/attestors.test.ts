// One conformance suite for every attestation verifier: each turns genuine evidence into the
// right agent instance, and refuses expired, mis-addressed, tampered, foreign-key and
// unregistered evidence. Each implementation supplies only how to mint its evidence.
import t from 'tap'
import { generateKeyPair, SignJWT, createLocalJWKSet, exportJWK, type JWK } from 'jose'
import { generateKeyPairSync, sign as signBytes } from 'node:crypto'
import { describeJwtError } from '../../broker/jwt.js'
import type { AttestationVerifier } from '../../broker/attest/attestor.js'
import { AttestationFailed, AttestationUnavailable } from '../../broker/attest/attestor.js'
import { SqliteRevocationStore } from '../../broker/revocations/sqlite.js'
import { KubernetesVerifier } from '../../broker/attest/kubernetes.js'
import { SpiffeVerifier } from '../../broker/attest/spiffe.js'
import { LocalVerifier } from '../../broker/attest/local.js'
import { ensureLocalAttestorKey, signLocalAttestation } from '../../lib/local-attestor.js'
import { parseRegistry } from '../../broker/registry.js'
import { TestIssuer } from '../helpers/issuer.js'
import { TEST_REGISTRY, K8S_ISSUER, TRUST_DOMAIN } from '../helpers/broker.js'
import { stringify } from 'yaml'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const BROKER = 'https://broker.test'
const registry = parseRegistry(stringify(TEST_REGISTRY))
const now = () => Math.floor(Date.now() / 1000)
/** The configured default of broker.attestors.kubernetes.max_token_age_s and spiffe.max_lifetime_s. */
const DAY = 86_400

interface Fixture {
  verifier: AttestationVerifier
  /** The registry's type for this attestor's summarizer: one type per attestor. */
  expectedType: string
  expectedInstance: string
  /** Evidence for the registered summarizer, with claim overrides. */
  mint(overrides?: Record<string, unknown>): Promise<string>
  /** Genuine evidence for a workload the registry does not know. */
  unregistered(): Promise<string>
  /** Evidence signed by a key the verifier does not trust. */
  foreignKey(): Promise<string>
}

async function kubernetes(): Promise<Fixture> {
  const iss = await TestIssuer.create(K8S_ISSUER)
  const claims = (ns: string, sa: string) => ({ aud: BROKER, sub: `system:serviceaccount:${ns}:${sa}`, 'kubernetes.io': { namespace: ns, serviceaccount: { name: sa, uid: 'u' }, pod: { name: 'summarizer-abc', uid: 'p' } } })
  const other = await TestIssuer.create(K8S_ISSUER)
  return {
    verifier: new KubernetesVerifier(createLocalJWKSet(iss.jwks), K8S_ISSUER, BROKER, DAY),
    expectedType: 'summarizer-k8s',
    expectedInstance: 'agent:summarizer-k8s:prod:summarizer-abc',
    mint: (o = {}) => iss.sign({ ...claims('agents', 'summarizer'), ...o }),
    unregistered: () => iss.sign(claims('agents', 'stranger')),
    foreignKey: () => other.sign(claims('agents', 'summarizer')),
  }
}

async function spiffe(): Promise<Fixture> {
  const iss = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const other = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const claims = (path: string) => ({ iss: null, aud: [BROKER], sub: `spiffe://${TRUST_DOMAIN}${path}` })
  return {
    verifier: new SpiffeVerifier(createLocalJWKSet(iss.jwks), TRUST_DOMAIN, BROKER, DAY),
    expectedType: 'summarizer-spiffe',
    expectedInstance: 'agent:summarizer-spiffe:prod:w-7',
    mint: (o = {}) => iss.sign({ ...claims('/agents/summarizer/w-7'), ...o }),
    unregistered: () => iss.sign(claims('/agents/stranger/1')),
    foreignKey: () => other.sign(claims('/agents/summarizer/w-7')),
  }
}

async function local(): Promise<Fixture> {
  const key = await ensureLocalAttestorKey(join(mkdtempSync(join(tmpdir(), 'lk-att-')), 'k'))
  const { readFileSync } = await import('node:fs')
  const jwks = JSON.parse(readFileSync(key.jwksFile, 'utf8'))
  const mint = async (o: Record<string, unknown> = {}, signer = key.privateKey) => {
    const n = now()
    return new SignJWT({ jti: crypto.randomUUID(), iat: n, exp: n + 60, sub: 'agent:summarizer:prod:local-1', aud: BROKER, iss: 'latchkey-local', ...o })
      .setProtectedHeader({ alg: 'ES256', kid: key.kid })
      .sign(signer)
  }
  return {
    verifier: new LocalVerifier(createLocalJWKSet(jwks), BROKER, await openStore()),
    expectedType: 'summarizer',
    expectedInstance: 'agent:summarizer:prod:local-1',
    mint,
    unregistered: () => signLocalAttestation(key, 'agent:stranger:prod:1', BROKER),
    foreignKey: async () => mint({}, (await generateKeyPair('ES256')).privateKey),
  }
}

for (const [name, make] of [['kubernetes', kubernetes], ['spiffe', spiffe], ['local', local]] as const) {
  t.test(`${name} attestor conformance`, async (t) => {
    const f = await make()
    const a = await f.verifier.verify(await f.mint(), registry)
    t.equal(a.kind, name)
    t.equal(a.instanceId, f.expectedInstance)
    t.equal(a.agentType, f.expectedType)
    t.ok(a.expiresAt > now(), 'carries the evidence expiry')

    await t.rejects(f.verifier.verify(await f.mint({ exp: now() - 120 }), registry), 'expired evidence is refused')
    await t.rejects(f.verifier.verify(await f.mint({ aud: 'https://someone-else' }), registry), 'evidence for another audience is refused')
    await t.rejects(f.verifier.verify(await f.foreignKey(), registry), 'evidence signed by an untrusted key is refused')
    const genuine = await f.mint()
    const [h, p, s] = genuine.split('.')
    const claims = JSON.parse(Buffer.from(p!, 'base64url').toString()) as Record<string, unknown>
    const tampered = `${h}.${Buffer.from(JSON.stringify({ ...claims, sub: String(claims.sub).replace('summarizer', 'helper') })).toString('base64url')}.${s}`
    await t.rejects(f.verifier.verify(tampered, registry), 'tampered evidence is refused')
    const err = await f.verifier.verify(await f.unregistered(), registry).catch((e: unknown) => e)
    t.ok(err instanceof AttestationFailed && err.unregistered, 'genuine evidence for an unknown workload is refused as unregistered')
  })
}

// Two workloads must never share an instance: a long name is kept whole or refused, never cut,
// and a name outside the alphabet is refused, never rewritten onto another's.
t.test('instance names are kept exactly or refused', async (t) => {
  const iss = await TestIssuer.create(K8S_ISSUER)
  const k8s = new KubernetesVerifier(createLocalJWKSet(iss.jwks), K8S_ISSUER, BROKER, DAY)
  const pod = (name: string) =>
    iss.sign({ aud: BROKER, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name, uid: 'p' } } })
  const stem = 'summarizer-' + 'x'.repeat(230)
  const [a, b] = await Promise.all([k8s.verify(await pod(stem + '-0'), registry), k8s.verify(await pod(stem + '-1'), registry)])
  t.equal(a.instanceId, `agent:summarizer-k8s:prod:${stem}-0`, 'a 243-character pod name is the instance, whole')
  t.not(a.instanceId, b.instanceId, 'StatefulSet pods whose long names differ only at the end stay two instances')
  await t.rejects(k8s.verify(await pod('p' + 'x'.repeat(253)), registry), /254 characters; at most 253/, 'a name longer than a DNS name is refused')
  for (const bad of ['summarizer/abc', 'summarizer abc', '-summarizer', 'summarizer\u00e9'])
    await t.rejects(k8s.verify(await pod(bad), registry), /must start with a letter or digit and hold only/, `${JSON.stringify(bad)} is refused, not rewritten`)

  const svid = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const spiffe = new SpiffeVerifier(createLocalJWKSet(svid.jwks), TRUST_DOMAIN, BROKER, DAY)
  const id = (instance: string) => svid.sign({ iss: null, aud: [BROKER], sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/${instance}` })
  t.equal((await spiffe.verify(await id('w'.repeat(253)), registry)).instanceId, `agent:summarizer-spiffe:prod:${'w'.repeat(253)}`)
  await t.rejects(spiffe.verify(await id('w'.repeat(254)), registry), /at most 253/, 'a SPIFFE instance segment is not cut to fit')
})

// The admin API refuses a revocation value holding a task handle (a pasted proxy credential): an
// instance named like one could be stopped only by a pattern stopping every instance of its type.
t.test('an instance name shaped like a task handle is refused: no revocation could name it', async (t) => {
  const handleShaped = 'lkt_' + 'A'.repeat(22)
  const svid = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const spiffe = new SpiffeVerifier(createLocalJWKSet(svid.jwks), TRUST_DOMAIN, BROKER, DAY)
  const id = (instance: string) => svid.sign({ iss: null, aud: [BROKER], sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/${instance}` })
  await t.rejects(spiffe.verify(await id(handleShaped), registry), /task handle's shape/, 'SPIFFE')
  await t.rejects(spiffe.verify(await id(`w-${handleShaped}-1`), registry), /task handle's shape/, 'SPIFFE, inside the name')
  t.equal((await spiffe.verify(await id('lkt_short'), registry)).instanceId, 'agent:summarizer-spiffe:prod:lkt_short', 'a name merely starting lkt_ is kept')
  const l = await local()
  await t.rejects(l.verifier.verify(await l.mint({ sub: `agent:summarizer:prod:${handleShaped}` }), registry), /task handle's shape/, 'local')
})

// The bounds are the configured ones, not a constant (the defaults are tested through the broker, exchange.test.ts).
t.test('a configured max_token_age_s (kubernetes) and max_lifetime_s (spiffe) are the bounds', async (t) => {
  const iss = await TestIssuer.create(K8S_ISSUER)
  const k8s = new KubernetesVerifier(createLocalJWKSet(iss.jwks), K8S_ISSUER, BROKER, 600)
  const sa = (iat: number) => iss.sign({ iat, aud: BROKER, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name: 'p', uid: 'p' } } })
  t.ok(await k8s.verify(await sa(now() - 500), registry), 'issued 500 s ago: taken')
  await t.rejects(k8s.verify(await sa(now() - 700), registry), { message: 'issued more than 600 s ago (iat)' }, 'issued 700 s ago: refused')

  const svid = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const spiffe = new SpiffeVerifier(createLocalJWKSet(svid.jwks), TRUST_DOMAIN, BROKER, 600)
  const id = (claims: Record<string, unknown>) => svid.sign({ iss: null, aud: BROKER, sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/w`, ...claims })
  t.ok(await spiffe.verify(await id({ iat: now(), exp: now() + 600 }), registry), 'a 600 s lifetime: taken')
  await t.rejects(spiffe.verify(await id({ iat: now(), exp: now() + 601 }), registry), { message: 'lifetime (exp - iat) over 600 s' })
  await t.rejects(spiffe.verify(await id({ iat: null, exp: now() + 700 }), registry), { message: 'no iat, and exp is more than 600 s away' })
  // Whose it is is said before how long it lives: the first thing an operator needs to read.
  const foreign = await id({ sub: 'spiffe://other.example/agents/summarizer/w', iat: now(), exp: now() + 6000 })
  await t.rejects(spiffe.verify(foreign, registry), { message: `SPIFFE ID is not in trust domain ${TRUST_DOMAIN}` }, 'a foreign, long-lived SVID: refused for its trust domain')
})

// Single use is recorded in the store before the evidence counts: a store that cannot record it
// refuses the evidence as retryable (the exchange answers 503), never accepts it unrecorded.
t.test('local attestor: evidence whose single use cannot be recorded is refused, retryably', async (t) => {
  const key = await ensureLocalAttestorKey(join(mkdtempSync(join(tmpdir(), 'lk-att-')), 'k'))
  const { readFileSync } = await import('node:fs')
  const store = await openStore()
  const verifier = new LocalVerifier(createLocalJWKSet(JSON.parse(readFileSync(key.jwksFile, 'utf8'))), BROKER, store)
  const first = await signLocalAttestation(key, 'agent:summarizer:prod:local-1', BROKER)
  t.ok(await verifier.verify(first, registry), 'accepted once')
  await t.rejects(verifier.verify(first, registry), { message: /replayed/ }, 'not twice')
  await store.close()
  const err = await verifier.verify(await signLocalAttestation(key, 'agent:summarizer:prod:local-1', BROKER), registry).catch((e: unknown) => e)
  t.ok(err instanceof AttestationUnavailable, 'store closed: refused as unavailable')
  t.match((err as Error).message, /single use could not be recorded \(store unavailable: /)
})

/** A real store in a temp file, as the broker opens it. */
async function openStore(): Promise<SqliteRevocationStore> {
  const store = new SqliteRevocationStore(join(mkdtempSync(join(tmpdir(), 'lk-att-db-')), 'broker.db'))
  await store.init()
  return store
}

// A refusal for the key set's sake says which: the operator reads it, not jose's words.
t.test('a token whose key the set cannot give is refused, saying why', async (t) => {
  const n = now()
  const claims = { iss: K8S_ISSUER, aud: BROKER, sub: 'system:serviceaccount:agents:summarizer', iat: n, exp: n + 60, 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name: 'p', uid: 'p' } } }
  const weak = generateKeyPairSync('rsa', { modulusLength: 512 })
  const weakInput = `${Buffer.from(JSON.stringify({ alg: 'RS256', kid: 'weak' })).toString('base64url')}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}`
  const a = await generateKeyPair('ES256', { extractable: true })
  const b = await generateKeyPair('ES256', { extractable: true })
  const jwk = async (k: CryptoKey, kid: string): Promise<JWK> => ({ ...(await exportJWK(k)), kid, alg: 'ES256' })
  const cases: [string, JWK[], Promise<string> | string, string][] = [
    ['an RSA key of 512 bits', [{ ...(weak.publicKey.export({ format: 'jwk' }) as JWK), kid: 'weak', alg: 'RS256' }], `${weakInput}.${signBytes('sha256', Buffer.from(weakInput), weak.privateKey).toString('base64url')}`, 'its key is an RSA key shorter than 2048 bits, which is not accepted'],
    ['no kid, two keys in the set', [await jwk(a.publicKey, 'a'), await jwk(b.publicKey, 'b')], new SignJWT(claims).setProtectedHeader({ alg: 'ES256' }).sign(b.privateKey), 'names no key (no kid), and the key set holds several it could be'],
    ['a kid two keys of the set carry', [await jwk(a.publicKey, 'a'), await jwk(b.publicKey, 'a')], new SignJWT(claims).setProtectedHeader({ alg: 'ES256', kid: 'a' }).sign(b.privateKey), 'its kid names several keys of the key set'],
  ]
  for (const [what, keys, token, says] of cases) {
    const err = await new KubernetesVerifier(createLocalJWKSet({ keys }), K8S_ISSUER, BROKER, DAY).verify(await token, registry).catch((e: unknown) => e)
    t.equal(describeJwtError(err), says, what)
  }
})
