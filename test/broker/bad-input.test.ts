// The broker's bad-input table: every forgery, mismatch and malformed request gets the RFC's
// error, no token, `no-store`, and neither the error body nor any log line nor any event
// contains a token that was sent.
import t from 'tap'
import { generateKeyPair, SignJWT } from 'jose'
import { startTestBroker, delegatedRequest, API, MAIL, TRUST_DOMAIN, why, type TestBroker } from '../helpers/broker.js'
import { GRANT_TYPE } from '../../broker/exchange.js'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'
import { signRawJws } from '../helpers/issuer.js'
import { rawRequest } from '../helpers/harness.js'

const now = () => Math.floor(Date.now() / 1000)
const AGENT = 'agent:summarizer:prod:bad'

interface Case {
  name: string
  params: (b: TestBroker) => Promise<Record<string, string | string[]>>
  error: string
  status?: number
  /** A fragment the description must contain, so the refusal says what was wrong. */
  says: RegExp
}

const cases: Case[] = [
  // --- the actor's attestation
  { name: 'actor alg none', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), b.k8s.unsigned({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer' }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: (signing algorithm not allowed|not a valid signed JWT)/ },
  { name: 'actor HS256 keyed with the public key', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), b.k8s.hs256WithPublicKey({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: signing algorithm not allowed/ },
  { name: 'actor for another audience', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: 'https://other-broker', sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: claim "aud"/ },
  { name: 'actor from another issuer', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ iss: 'https://evil-cluster', aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: claim "iss"/ },
  { name: 'actor expired', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, exp: now() - 60, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: expired/ },
  { name: 'actor not yet valid', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, nbf: now() + 120, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: not yet valid/ },
  { name: 'actor without a signature', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), stripSignature(await b.attest(AGENT))), error: 'invalid_request', says: /actor_token: (signature does not verify|not a valid signed JWT)/ },
  { name: 'actor signed by an unknown kid', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await foreign(b.issuer, AGENT)), error: 'invalid_request', says: /actor_token: signed by an unknown key/ },
  { name: 'actor with a known kid but a foreign key', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await foreign(b.issuer, AGENT, b.localKey.kid)), error: 'invalid_request', says: /actor_token: signature does not verify/ },
  { name: 'actor local attestation replayed', params: async (b) => {
      const actor = await b.attest(AGENT)
      const first = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), actor))
      if (first.status !== 200) throw new Error(`setup: ${why(first)}`)
      return delegatedRequest(await b.userToken('u', 'read'), actor)
    }, error: 'invalid_request', says: /replayed/ },
  { name: 'actor legacy service-account token (not pod-bound)', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'x' } } }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /not bound to a pod/ },
  { name: 'actor from an unregistered service account', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, sub: 'system:serviceaccount:default:default', 'kubernetes.io': { namespace: 'default', serviceaccount: { name: 'default', uid: 'x' }, pod: { name: 'p', uid: 'y' } } }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'unauthorized_client', says: /no agent type matches/ },
  { name: 'actor unregistered local agent type', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:intruder:prod:1')), error: 'unauthorized_client', says: /not registered/ },
  // Evidence minted for several audiences was handed to each: any of them could replay it here.
  { name: 'actor for this broker and another audience', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: [b.issuer, 'https://vault.example.com'], sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: claim "aud" must name this broker alone/ },
  { name: 'actor SVID for this broker and another audience', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.spiffe.sign({ iss: null, aud: ['https://vault.example.com', b.issuer], sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/x` }), { actor_token_type: TOKEN_TYPES.spiffe }), error: 'invalid_request', says: /actor_token: claim "aud" must name this broker alone/ },
  { name: 'actor SPIFFE ID nested below the instance', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.spiffe.sign({ iss: null, aud: b.issuer, sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/team-a/b` }), { actor_token_type: TOKEN_TYPES.spiffe }), error: 'invalid_request', says: /one segment after \/agents\/summarizer/ },
  { name: 'actor SPIFFE ID from another trust domain', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.spiffe.sign({ iss: null, aud: b.issuer, sub: 'spiffe://evil.org/agents/summarizer/1' }), { actor_token_type: TOKEN_TYPES.spiffe }), error: 'invalid_request', says: /not in trust domain/ },
  { name: 'actor of an untrusted issuer as plain JWT', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.users.sign({ sub: AGENT, aud: b.issuer }), { actor_token_type: TOKEN_TYPES.jwt }), error: 'invalid_request', says: /not issued by a trusted workload attestor/ },
  { name: 'actor garbage', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), 'not.a.jwt', { actor_token_type: TOKEN_TYPES.jwt }), error: 'invalid_request', says: /actor_token: not a valid signed JWT/ },
  { name: 'actor revoked', params: async (b) => {
      await b.broker.revocations.revoke('agent', AGENT, 'test')
      return delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT))
    }, error: 'invalid_request', says: /is revoked/ },
  { name: 'task revoked', params: async (b) => {
      await b.broker.revocations.revoke('task', 'task-1', 'test')
      return delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT))
    }, error: 'invalid_request', says: /task task-1 is revoked/ },
  // --- the user's subject token
  { name: 'subject alg none', params: async (b) => delegatedRequest(b.users.unsigned({ sub: 'u', aud: 'latchkey', scope: 'read' }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: (signing algorithm not allowed|not a valid signed JWT)/ },
  { name: 'subject HS256 keyed with the public key', params: async (b) => delegatedRequest(b.users.hs256WithPublicKey({ sub: 'u', aud: 'latchkey', scope: 'read' }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: signing algorithm not allowed/ },
  // RFC 7515 compact form only: jose's decoder skips whitespace and takes padding in the
  // signature, so one genuine token verified under endless spellings (each a new cache entry).
  ...([['a space', (s: string) => `${s.slice(0, 10)} ${s.slice(10)}`], ['a newline', (s: string) => `${s.slice(0, 10)}\n${s.slice(10)}`], ['trailing whitespace', (s: string) => s + ' '.repeat(100)]] as const).map(([what, spell]) => ({
    name: `subject whose signature holds ${what}`,
    params: async (b: TestBroker) => {
      const [h, p, sig] = (await b.userToken('u', 'read')).split('.')
      return delegatedRequest(`${h}.${p}.${spell(sig!)}`, await b.attest(AGENT))
    },
    error: 'invalid_request',
    says: /subject_token: not a valid signed JWT/,
  })),
  {
    name: 'actor whose signature is padded',
    params: async (b) => {
      // An ES256 signature is 86 base64url characters: with "==" it is well-formed padded base64.
      const attestation = await b.attest(AGENT)
      return delegatedRequest(await b.userToken('u', 'read'), attestation + '==')
    },
    error: 'invalid_request',
    says: /actor_token: not a valid signed JWT/,
  },
  // Each segment in its one spelling (RFC 4648 §3.5: the bits past the last whole byte are zero).
  // An ES256 or RS256 signature's last character carries 4 spare bits: 16 spellings verified.
  { name: "subject whose signature's spare bits are set", params: async (b) => delegatedRequest(spareBitSet(await b.userToken('u', 'read')), await b.attest(AGENT)), error: 'invalid_request', says: /^subject_token: not a valid signed JWT/ },
  { name: "actor whose signature's spare bits are set", params: async (b) => delegatedRequest(await b.userToken('u', 'read'), spareBitSet(await b.attest(AGENT))), error: 'invalid_request', says: /^actor_token: not a valid signed JWT/ },
  // A member named twice: jose takes the last, another parser the first. Genuinely signed, each attestor and the user's token.
  ...(
    [
      ['subject whose claims name sub twice', 'subject', (b: TestBroker) => b.users.signRaw(b.users.headerText, '{"sub":"mallory",' + b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read' }).slice(1)), /^subject_token: its claims name "sub" twice/],
      ['subject whose header names alg twice', 'subject', (b: TestBroker) => b.users.signRaw('{"alg":"none",' + b.users.headerText.slice(1), b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read' })), /^subject_token: its header names "alg" twice/],
      ['subject whose claims begin with a byte order mark', 'subject', (b: TestBroker) => b.users.signRaw(b.users.headerText, '\ufeff' + b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read' })), /^subject_token: its claims begin with a byte order mark/],
      ['actor (kubernetes) naming its namespace twice', 'kubernetes', (b: TestBroker) => b.k8s.signRaw(b.k8s.headerText, b.k8s.claimsText({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }).replace('"namespace":"agents"', '"namespace":"default","namespace":"agents"')), /^actor_token: its claims name "namespace" twice/],
      ['actor (kubernetes) whose header begins with a byte order mark', 'kubernetes', (b: TestBroker) => b.k8s.signRaw('\ufeff' + b.k8s.headerText, b.k8s.claimsText({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() })), /^actor_token: its header begins with a byte order mark/],
      ['actor (SPIFFE) naming aud twice', 'spiffe', (b: TestBroker) => b.spiffe.signRaw(b.spiffe.headerText, '{"aud":"https://vault.example.com",' + b.spiffe.claimsText({ aud: b.issuer, sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/x` }).slice(1)), /^actor_token: its claims name "aud" twice/],
      // Compared unescaped: "\u0073ub" is "sub".
      ['actor (local) naming sub twice, once escaped', 'local', (b: TestBroker) => signRawJws(JSON.stringify({ alg: 'ES256', kid: b.localKey.kid }), '{"\\u0073ub":"agent:helper:prod:h",' + JSON.stringify({ iss: 'latchkey-local', sub: AGENT, aud: b.issuer, iat: now(), exp: now() + 60, jti: crypto.randomUUID() }).slice(1), b.localKey.privateKey, 'ES256'), /^actor_token: its claims name "sub" twice/],
      // A time that is no number is malformed, not "not yet valid"; one beyond any date never comes.
      ['subject whose nbf is a string', 'subject', (b: TestBroker) => b.userToken('u', 'read', { nbf: String(now()) }), /^subject_token: claim "nbf" must be a number of seconds/],
      ['actor (kubernetes) whose iat is null', 'kubernetes', (b: TestBroker) => b.k8s.signRaw(b.k8s.headerText, b.k8s.claimsText({ iat: null, aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() })), /^actor_token: claim "iat" must be a number of seconds/],
      ['actor (SPIFFE) whose exp is a string', 'spiffe', (b: TestBroker) => b.spiffe.sign({ iss: null, exp: String(now() + 300), aud: b.issuer, sub: `spiffe://${TRUST_DOMAIN}/agents/summarizer/x` }), /^actor_token: claim "exp" must be a number of seconds/],
      ['subject whose exp is 1e400 (Infinity to JSON.parse)', 'subject', (b: TestBroker) => b.users.signRaw(b.users.headerText, b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read' }).replace(/"exp":\d+/, '"exp":1e400')), /^subject_token: claim "exp" is beyond any date/],
      ['subject whose nbf is -1e400', 'subject', (b: TestBroker) => b.users.signRaw(b.users.headerText, b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read', nbf: 0 }).replace('"nbf":0', '"nbf":-1e400')), /^subject_token: claim "nbf" is beyond any date/],
      // Critical extensions (RFC 7515 §4.1.11) refuse the token unless understood: b64 is, and no JWT may use it.
      ['actor (kubernetes) with a critical extension not understood', 'kubernetes', (b: TestBroker) => b.k8s.signRaw(JSON.stringify({ alg: 'ES256', kid: b.k8s.kid, crit: ['x-binding'], 'x-binding': 1 }), b.k8s.claimsText({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() })), /^actor_token: its header marks as critical \(crit\) an extension/],
      ['subject with an unencoded payload (b64: false)', 'subject', (b: TestBroker) => b.users.signRaw(JSON.stringify({ alg: 'RS256', kid: b.users.kid, b64: false, crit: ['b64'] }), b.users.claimsText({ sub: 'u', aud: 'latchkey', scope: 'read' })), /^subject_token: its payload is not base64url-encoded \(b64: false\)/],
      ['actor (kubernetes) whose exp is 1e20', 'kubernetes', (b: TestBroker) => b.k8s.sign({ exp: 1e20, aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), /^actor_token: claim "exp" is beyond any date/],
    ] as const
  ).map(([name, who, token, says]) => ({
    name,
    params: async (b: TestBroker) =>
      who === 'subject'
        ? delegatedRequest(await token(b), await b.attest(AGENT))
        : delegatedRequest(await b.userToken('u', 'read'), await token(b), { actor_token_type: TOKEN_TYPES[who] }),
    error: 'invalid_request',
    says,
  })),
  { name: 'subject for another audience', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { aud: 'some-other-app' }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: claim "aud"/ },
  { name: 'subject from another issuer', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { iss: 'https://evil-idp' }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: issuer is not the configured user identity provider/ },
  { name: 'subject expired beyond the 30 s skew', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { exp: now() - 31 - 5 }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: expired/ },
  { name: 'subject not yet valid', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { nbf: now() + 300 }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: not yet valid/ },
  // A subject must name someone, as a string: anything else would be copied into the issued token's sub.
  ...([['a number', 12345], ['an array', ['u']], ['an object', { id: 'u' }], ['empty', '']] as const).map(([what, sub]) => ({
    name: `subject whose sub is ${what}`,
    params: async (b: TestBroker) => delegatedRequest(await b.userToken('u', 'read', { sub }), await b.attest(AGENT)),
    error: 'invalid_request',
    says: /subject_token: claim "sub" must be a non-empty string/,
  })),
  { name: 'subject issued in the future (iat beyond the skew)', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { iat: now() + 365 * 86400 }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: not yet valid \(iat\)/ },
  // Missing is not "in the future": the description says which.
  {
    name: 'local attestation without iat',
    params: async (b) =>
      delegatedRequest(
        await b.userToken('u', 'read'),
        await new SignJWT({ jti: 'no-iat-1' }).setProtectedHeader({ alg: 'ES256', kid: b.localKey.kid, typ: 'JWT' }).setIssuer('latchkey-local').setSubject(AGENT).setAudience(b.issuer).setExpirationTime('60s').sign(b.localKey.privateKey),
      ),
    error: 'invalid_request',
    says: /^actor_token: claim "iat" is missing$/,
  },
  { name: 'actor issued in the future (iat beyond the skew)', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.k8s.sign({ aud: b.issuer, iat: now() + 3600, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims() }), { actor_token_type: TOKEN_TYPES.kubernetes }), error: 'invalid_request', says: /actor_token: not yet valid \(iat\)/ },
  // RFC 8693 §4.4 and §4.1: the user's own restriction on who may act holds; a token that is
  // already a delegation would have its earlier actors dropped from the chain issued here.
  { name: 'subject whose sub is an agent instance ID', params: async (b) => delegatedRequest(await b.userToken('agent:helper:prod:h-1', 'read'), await b.attest(AGENT)), error: 'invalid_request', says: /its sub is an agent instance ID/ },
  // Spelled to read as one: look-alike letters of other scripts, accents, small capitals, other
  // colons (the whole category: test/broker/agent-lookalikes.test.ts).
  ...['\u0430gent:helper:prod:h-1', 'ag\u0435nt:helper:prod:h-1', '\u00e0gent:helper:prod:h-1', 'AGENT\u2236helper:prod:h-1', ' Agent:helper:prod:h-1', '\u1d00\u0262\u1d07\u0274\u1d1b:helper:prod:h-1', 'agent\u02f8helper:prod:h-1'].map((sub) => ({
    name: `subject whose sub reads as an agent instance ID (${JSON.stringify(sub)})`,
    params: async (b: TestBroker) => delegatedRequest(await b.userToken(sub, 'read'), await b.attest(AGENT)),
    error: 'invalid_request',
    says: /its sub is an agent instance ID/,
  })),
  // Invisible characters: a zero-width space, a soft hyphen, a word joiner, a bidi override, a Braille blank.
  ...['\u200bagent:helper:prod:h-1', 'ag\u00adent:helper:prod:h-1', '\u2060agent:helper:prod:h-1', 'alice\u202e', 'alice\u2800'].map((sub) => ({
    name: `subject whose sub holds an invisible character (${JSON.stringify(sub)})`,
    params: async (b: TestBroker) => delegatedRequest(await b.userToken(sub, 'read'), await b.attest(AGENT)),
    error: 'invalid_request',
    says: /its sub holds an invisible, format or control character/,
  })),
  // Half a surrogate pair: a resource server's decoder reads each as U+FFFD, making these one user there.
  ...['alice\ud800', 'alice\udc00'].map((sub) => ({
    name: `subject whose sub holds half a surrogate pair (${JSON.stringify(sub)})`,
    params: async (b: TestBroker) => delegatedRequest(await b.userToken(sub, 'read'), await b.attest(AGENT)),
    error: 'invalid_request',
    says: /^subject_token: its sub holds half a surrogate pair/,
  })),
  { name: 'subject whose may_act names another agent', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { may_act: { sub: 'agent:summarizer:prod:someone-else' } }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: its may_act names another actor/ },
  { name: 'subject whose may_act is not an object with a sub', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { may_act: AGENT }), await b.attest(AGENT)), error: 'invalid_request', says: /claim "may_act" must be an object/ },
  { name: 'subject already delegated (act)', params: async (b) => delegatedRequest(await b.userToken('u', 'read', { act: { sub: 'agent:other:prod:1' } }), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: carries an act claim/ },
  { name: 'subject unsigned', params: async (b) => delegatedRequest(stripSignature(await b.userToken('u', 'read')), await b.attest(AGENT)), error: 'invalid_request', says: /subject_token: (signature does not verify|not a valid signed JWT)/ },
  { name: 'subject scopes do not cover the request', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { scope: 'read write' }), error: 'invalid_scope', says: /subject_token does not grant scope write/ },
  { name: 'subject grants nothing the agent may have', params: async (b) => delegatedRequest(await b.userToken('u', 'admin'), await b.attest(AGENT)), error: 'invalid_scope', says: /grants none/ },
  { name: 'scope beyond the agent policy', params: async (b) => delegatedRequest(await b.userToken('u', 'read admin'), await b.attest(AGENT), { scope: 'admin' }), error: 'invalid_scope', says: /may not receive scope admin/ },
  { name: 'user token for an agent that may not act for users', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:loner:prod:1')), error: 'invalid_request', says: /may not act for users/ },
  { name: 'no user for an agent that requires one', params: async (b) => ({ grant_type: GRANT_TYPE, subject_token: await b.attest('agent:assistant:prod:1'), subject_token_type: TOKEN_TYPES.local, audience: API, task_id: 't' }), error: 'invalid_request', says: /requires a user/ },
  // --- target, duration, request shape
  { name: 'audience the agent may not reach', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:helper:prod:1'), { audience: MAIL }), error: 'invalid_target', says: /may not receive tokens for this audience/ },
  { name: 'audience named after an Object.prototype member', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { audience: 'constructor' }), error: 'invalid_target', says: /may not receive tokens for this audience/ },
  { name: 'audience __proto__', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { audience: '__proto__' }), error: 'invalid_target', says: /may not receive tokens for this audience/ },
  { name: 'agent type named after an Object.prototype member', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:constructor:prod:1')), error: 'unauthorized_client', says: /not registered/ },
  {
    name: 'local attestation whose sub is an array',
    params: async (b) =>
      delegatedRequest(
        await b.userToken('u', 'read'),
        await new SignJWT({ sub: [AGENT] as unknown as string })
          .setProtectedHeader({ alg: 'ES256', kid: b.localKey.kid, typ: 'JWT' })
          .setIssuer('latchkey-local')
          .setAudience(b.issuer)
          .setIssuedAt()
          .setExpirationTime('60s')
          .setJti('array-sub')
          .sign(b.localKey.privateKey),
      ),
    error: 'invalid_request',
    says: /claim "sub" must be a non-empty string/,
  },
  {
    name: 'local attestation with an empty jti',
    params: async (b) =>
      delegatedRequest(
        await b.userToken('u', 'read'),
        await new SignJWT({})
          .setProtectedHeader({ alg: 'ES256', kid: b.localKey.kid, typ: 'JWT' })
          .setSubject(AGENT)
          .setIssuer('latchkey-local')
          .setAudience(b.issuer)
          .setIssuedAt()
          .setExpirationTime('60s')
          .setJti('')
          .sign(b.localKey.privateKey),
      ),
    error: 'invalid_request',
    says: /jti must be a string, not empty/,
  },
  { name: 'two audiences', params: async (b) => ({ ...delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)), audience: [API, MAIL] }), error: 'invalid_target', says: /exactly one audience/ },
  { name: 'no audience', params: async (b) => { const p: Record<string, string> = delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)); delete p.audience; return p }, error: 'invalid_target', says: /exactly one audience/ },
  { name: 'duration not a number', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { task_duration: '1e3' }), error: 'invalid_request', says: /whole number of seconds/ },
  { name: 'missing task_id', params: async (b) => { const p: Record<string, string> = delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)); delete p.task_id; return p }, error: 'invalid_request', says: /missing task_id/ },
  { name: 'missing grant_type', params: async () => ({ subject_token: 'x' }), error: 'invalid_request', says: /missing grant_type/ },
  { name: 'another grant type', params: async () => ({ grant_type: 'client_credentials' }), error: 'unsupported_grant_type', says: /token-exchange/ },
  { name: 'repeated subject_token', params: async (b) => ({ ...delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)), subject_token: [await b.userToken('u', 'read'), await b.userToken('v', 'read write')] }), error: 'invalid_request', says: /"subject_token" is repeated/ },
  { name: 'repeated scope', params: async (b) => ({ ...delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)), scope: ['read', 'write'] }), error: 'invalid_request', says: /"scope" is repeated/ },
  { name: 'actor_token without its type', params: async (b) => { const p: Record<string, string> = delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT)); delete p.actor_token_type; return p }, error: 'invalid_request', says: /actor_token_type is required/ },
  { name: 'unsupported requested_token_type', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { requested_token_type: 'urn:ietf:params:oauth:token-type:saml2' }), error: 'invalid_request', says: /requested_token_type must be/ },
  { name: 'unknown subject_token_type', params: async (b) => delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { subject_token_type: 'urn:x:custom' }), error: 'invalid_request', says: /subject_token_type "urn:x:custom" is not accepted/ },
]

t.test('bad input table', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  for (const c of cases) {
    await t.test(c.name, async (t) => {
      // Revocations from one case must not leak into the next.
      for (const r of b.broker.revocations.all()) await b.broker.revocations.unrevoke(r.kind, r.value)
      const params = await c.params(b)
      const res = await b.exchange(params)
      t.equal(res.status, c.status ?? 400, why(res))
      t.equal(res.body.error, c.error, 'RFC error code')
      t.match(String(res.body.error_description), c.says, 'the description says what was wrong')
      t.notOk('access_token' in res.body, 'no token')
      t.equal(res.headers.get('cache-control'), 'no-store')
      t.equal(res.headers.get('content-type'), 'application/json')
      for (const v of Object.values(params).flat()) {
        if (v.length > 40) t.notOk(res.text.includes(v.slice(-30)), 'the error body echoes no sent token')
      }
    })
  }
  const sent = cases.length
  const refused = b.events.filter((e) => e.type === 'token.exchange' && e.outcome === 'refused')
  t.ok(refused.length >= sent - 2, `refusals are events (${refused.length} for ${sent} cases)`)
  t.ok(refused.every((e) => e.type === 'token.exchange' && e.reason.length > 0), 'each with a reason')
  // The log and the events hold no JWT at all: three base64url segments starting with eyJ.
  t.notMatch(b.logs(), /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\./, 'no JWT in any log line')
  t.notMatch(JSON.stringify(b.events), /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\./, 'no JWT in any event')
})

t.test('malformed and oversized bodies', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const post = (body: string | Buffer, type = 'application/x-www-form-urlencoded', extra: Record<string, string> = {}, path = '/oauth2/token') =>
    fetch(`${b.url}${path}`, { method: 'POST', body: typeof body === 'string' ? body : new Uint8Array(body), headers: { 'content-type': type, ...extra } }).then(async (r) => ({ status: r.status, body: (await r.json()) as Record<string, string> }))

  const big = await post('grant_type=' + GRANT_TYPE + '&subject_token=' + 'a'.repeat(70_000))
  t.equal(big.status, 413)
  t.equal(big.body.error, 'invalid_request')
  t.match(big.body.error_description, /exceeds 65536 bytes/)

  const json = await post(JSON.stringify({ grant_type: GRANT_TYPE }), 'application/json')
  t.equal(json.status, 400)
  t.match(json.body.error_description, /x-www-form-urlencoded/)

  const badUtf8 = await post(Buffer.from([0x67, 0x72, 0x61, 0x6e, 0x74, 0x3d, 0xff, 0xfe]))
  t.equal(badUtf8.status, 400)
  t.match(badUtf8.body.error_description, /UTF-8/)

  const pctBad = await post('grant_type=%FF%FE')
  t.equal(pctBad.status, 400, 'percent-encoded invalid UTF-8 is refused too')
  t.equal(pctBad.body.error_description, 'parameter "grant_type" is not valid percent-encoded UTF-8', 'said as such, not as an unsupported grant type')
  // A malformed escape is not kept as text, nor bytes that are no UTF-8 read as U+FFFD: each was
  // checked as a value nobody sent and refused for another reason (or, unread, not at all).
  const form = async (extra: string) => new URLSearchParams(delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT))).toString() + extra
  for (const [what, extra, says] of [
    ['a malformed escape', '&scope=read%zz', /^parameter "scope" is not valid percent-encoded UTF-8$/],
    ['an overlong UTF-8 "/"', '&scope=%C0%AF', /^parameter "scope" is not valid percent-encoded UTF-8$/],
    ['a lone surrogate', '&scope=read%ED%A0%80', /^parameter "scope" is not valid percent-encoded UTF-8$/],
    ['a malformed escape in a resource', '&resource=https%3A%2F%2Fapi.example.com%zz', /^parameter "resource" is not valid percent-encoded UTF-8$/],
    ['a name that is no UTF-8', '&%FFCANARY=1', /^a parameter name is not valid percent-encoded UTF-8/],
    ['an unknown parameter whose value is no UTF-8', '&CANARY=%FF', /^a parameter is not valid percent-encoded UTF-8/],
  ] as const) {
    const res = await post(await form(extra))
    t.equal(res.status, 400, what)
    t.equal(res.body.error, 'invalid_request', what)
    t.match(res.body.error_description, says, what)
    t.notOk(JSON.stringify(res.body).includes('CANARY'), `${what}: no name echoed`)
  }

  // A bare token posted twice (`curl -d "$TOKEN" -d "$TOKEN"`) is a repeated parameter *name*:
  // refused without quoting it, at the token endpoint and at introspection.
  const canary = 'CANARY-' + 'k'.repeat(40)
  const bare = await post(`${canary}&${canary}`)
  t.equal(bare.status, 400)
  t.match(bare.body.error_description, /a parameter is repeated/)
  t.notOk(JSON.stringify(bare.body).includes('CANARY'), 'the repeated name is not echoed')
  const basic = 'Basic ' + Buffer.from(`api-server:${b.introspectionSecret}`).toString('base64')
  const bareIntro = await post(`${canary}&${canary}`, 'application/x-www-form-urlencoded', { authorization: basic }, '/oauth2/introspect')
  t.equal(bareIntro.status, 400)
  t.notOk(JSON.stringify(bareIntro.body).includes('CANARY'), 'nor at introspection')
  t.notMatch(b.logs(), /CANARY/, 'nor in the log')
  // RFC 6749 §2.3 and §5.2: one way of authenticating the client a request, else invalid_request.
  for (const [what, extra] of [
    ['client_secret in the body too', `&client_id=api-server&client_secret=${b.introspectionSecret}`],
    ['another client_id in the body', '&client_id=other-client'],
  ] as const) {
    const res = await post(`token=x${extra}`, 'application/x-www-form-urlencoded', { authorization: basic }, '/oauth2/introspect')
    t.equal(res.status, 400, what)
    t.equal(res.body.error, 'invalid_request', what)
    t.match(res.body.error_description, /authenticates one way: client_secret_basic/, what)
    t.notOk(JSON.stringify(res.body).includes(b.introspectionSecret), `${what}: the secret is not echoed`)
  }
  t.equal((await post('token=x&client_id=api-server', 'application/x-www-form-urlencoded', { authorization: basic }, '/oauth2/introspect')).status, 200, "Basic's own client_id in the body is the same client")

  // RFC 6749 §3.2: parameters are the body's. The query was not read: a scope sent there to narrow
  // the token was dropped and the broader one issued, and a token sent there was taken for none.
  const queryScope = await post(await form(''), 'application/x-www-form-urlencoded', {}, '/oauth2/token?scope=read')
  t.equal(queryScope.status, 400, 'a parameter in the query is refused, not dropped')
  t.equal(queryScope.body.error, 'invalid_request')
  t.match(queryScope.body.error_description, /not in the URL query/)
  const queryToken = await post('', 'application/x-www-form-urlencoded', { authorization: basic }, `/oauth2/introspect?token=${canary}`)
  t.equal(queryToken.status, 400, 'at introspection too')
  t.match(queryToken.body.error_description, /not in the URL query/)
  t.notOk(JSON.stringify(queryToken.body).includes('CANARY'), 'the query is not echoed')

  const get = await fetch(`${b.url}/oauth2/token`)
  t.equal(get.status, 405)
  t.equal(get.headers.get('allow'), 'POST')
  t.equal(get.headers.get('cache-control'), 'no-store', 'a refusal of the token endpoint like any other')
  const introGet = await fetch(`${b.url}/oauth2/introspect`, { method: 'PUT', headers: { authorization: basic } })
  t.equal(introGet.status, 405)
  t.equal(introGet.headers.get('cache-control'), 'no-store', 'and of introspection')
  // RFC 9110 §9.1: what answers GET answers HEAD (an uptime checker's probe), its head only.
  for (const path of ['/.well-known/jwks.json', '/.well-known/oauth-authorization-server', '/healthz', '/readyz', '/metrics']) {
    const head = await fetch(`${b.url}${path}`, { method: 'HEAD' })
    t.equal(head.status, 200, `HEAD ${path}`)
    t.equal(await head.text(), '', 'no body')
  }
  const postKeys = await fetch(`${b.url}/.well-known/jwks.json`, { method: 'POST' })
  t.equal(postKeys.status, 405)
  t.equal(postKeys.headers.get('allow'), 'GET, HEAD')
  // A request node:http's parser refuses is told what was wrong, as JSON, not with a bare status line.
  const port = Number(new URL(b.url).port)
  for (const [what, head, status, says] of [
    ['Content-Length and Transfer-Encoding', 'Content-Length: 5\r\nTransfer-Encoding: chunked\r\n', 400, /^malformed HTTP request \(HPE_INVALID_TRANSFER_ENCODING\): Transfer-Encoding can't be present with Content-Length$/],
    ['a Content-Length past any number', 'Content-Length: 99999999999999999999\r\n', 400, /^malformed HTTP request \(HPE_INVALID_CONTENT_LENGTH\)/],
    ['headers too large', `X-Pad: ${'a'.repeat(40_000)}\r\n`, 431, /^the request line and headers are over 32768 bytes$/],
  ] as const) {
    const res = await rawRequest(port, `POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n${head}\r\n0\r\n\r\n`, 100)
    t.equal(res.status, status, what)
    t.equal(res.headers['cache-control'], 'no-store', what)
    const body = JSON.parse(res.body || '{}') as Record<string, string>
    t.equal(body.error, 'invalid_request', what)
    t.match(body.error_description, says, what)
  }
  // A path is not echoed in a 404: a client that put a token there would have it in the answer.
  for (const [path, auth] of [[`/oauth2/token/${canary}`, undefined], [`/v1/revocations/token/${canary}`, `Bearer ${b.adminToken}`]] as const) {
    const res = await fetch(`${b.url}${path}`, { method: 'DELETE', headers: auth ? { authorization: auth } : {} })
    const text = await res.text()
    t.equal(res.status, 404, auth ? 'an admin path' : 'an OAuth path')
    t.match(JSON.parse(text).error_description, /at this path \(not repeated: it may hold a token\); the (admin )?endpoints are .*\/v1\/revocations/)
    t.notOk(text.includes('CANARY'), 'the path is not echoed')
    t.equal(res.headers.get('cache-control'), 'no-store')
  }
  // An oversized body ends its connection at introspection too: the rest was being read and thrown away.
  const bigIntro = await fetch(`${b.url}/oauth2/introspect`, { method: 'POST', body: 'token=' + 'a'.repeat(70_000), headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic } })
  t.equal(bigIntro.status, 413)
  t.equal(bigIntro.headers.get('connection'), 'close', 'the connection is not kept for the rest of it')
  // So does a refused client authentication: its body is not read to its end.
  const unauthIntro = await fetch(`${b.url}/oauth2/introspect`, { method: 'POST', body: 'token=x', headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: 'Basic bm86bm8=' } })
  t.equal(unauthIntro.status, 401)
  t.equal(unauthIntro.headers.get('connection'), 'close', 'an unauthenticated request does not keep its connection')

  // A token longer than any JWT we accept is refused before parsing.
  const huge = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), 'eyJ' + 'a'.repeat(20_000) + '.b.c', { actor_token_type: TOKEN_TYPES.jwt }))
  t.equal(huge.status, 400)
  t.match(String(huge.body.error_description), /longer than 16384 bytes/)
})

t.test("a user token's may_act naming the acting agent is honoured", async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read', { may_act: { sub: AGENT } }), await b.attest(AGENT)))
  t.equal(res.status, 200, why(res))
})

t.test('clock skew: up to 30 s is tolerated, beyond is not', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const sa = (extra: Record<string, unknown>) => b.k8s.sign({ aud: b.issuer, sub: 'system:serviceaccount:agents:summarizer', 'kubernetes.io': k8sClaims(), ...extra })
  const justExpired = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await sa({ exp: now() - 20 }), { actor_token_type: TOKEN_TYPES.kubernetes }))
  t.equal(justExpired.status, 200, `attestation expired 20 s ago is within skew (${why(justExpired)})`)
  const longExpired = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await sa({ exp: now() - 40 }), { actor_token_type: TOKEN_TYPES.kubernetes }))
  t.equal(longExpired.body.error_description, 'actor_token: expired', '40 s is beyond it')
  // A user token inside the skew window is valid, but the issued token may not outlive it.
  const userPast = await b.exchange(delegatedRequest(await b.userToken('u', 'read', { exp: now() - 20 }), await b.attest(AGENT)))
  t.equal(userPast.body.error_description, 'subject_token: expired', 'nothing is left of its life to delegate')
  const future = await b.exchange(delegatedRequest(await b.userToken('u', 'read', { nbf: now() + 20 }), await b.attest(AGENT)))
  t.equal(future.status, 200, why(future))
  const issuedAhead = await b.exchange(delegatedRequest(await b.userToken('u', 'read', { iat: now() + 20 }), await b.attest(AGENT)))
  t.equal(issuedAhead.status, 200, `an iat 20 s ahead is within skew (${why(issuedAhead)})`)
})

function k8sClaims() {
  return { namespace: 'agents', serviceaccount: { name: 'summarizer', uid: 'u' }, pod: { name: 'pod-1', uid: 'p' } }
}

const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
/** The same token, its signature's last character with a spare bit set: decoders read the same bytes. */
function spareBitSet(token: string): string {
  if (token.split('.')[2]!.length % 4 === 0) throw new Error('setup: expected a signature with spare bits')
  return token.slice(0, -1) + B64URL[B64URL.indexOf(token.at(-1)!) ^ 1]
}

function stripSignature(token: string): string {
  const [h, p] = token.split('.')
  return `${h}.${p}.`
}

/** A local attestation signed by a key the broker never trusted, optionally claiming a trusted kid. */
async function foreign(audience: string, sub: string, kid = 'attacker-key'): Promise<string> {
  const { privateKey } = await generateKeyPair('ES256')
  return new SignJWT({ jti: crypto.randomUUID() })
    .setProtectedHeader({ alg: 'ES256', kid })
    .setIssuer('latchkey-local')
    .setSubject(sub)
    .setAudience(audience)
    .setIssuedAt()
    .setExpirationTime('60s')
    .sign(privateKey)
}

t.test('a token sent where its type belongs is not echoed in the error, the log or the event', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  // A client that swaps the values: an opaque token (a PAT, 40 characters) and a JWT in *_token_type.
  const opaque = 'ghp_LKCANARY' + 'Zx9'.repeat(9) + 'Q'
  const user = await b.userToken('u', 'read')
  // Each request with its own attestation: a local attestation is single-use.
  for (const [param, params] of [
    ['subject_token_type', async () => delegatedRequest(user, await b.attest(AGENT), { subject_token_type: opaque })],
    ['actor_token_type', async () => delegatedRequest(user, await b.attest(AGENT), { actor_token_type: opaque })],
    ['subject_token_type', async () => ({ grant_type: GRANT_TYPE, subject_token: await b.attest(AGENT), subject_token_type: opaque, audience: API, task_id: 't' })],
    ['subject_token_type', async () => delegatedRequest(user, await b.attest(AGENT), { subject_token_type: user })],
  ] as const) {
    const res = await b.exchange(await params())
    t.equal(res.status, 400, why(res))
    t.equal(res.body.error, 'invalid_request')
    t.equal(res.body.error_description, `${param} is not a token type this broker accepts (a URI such as ${TOKEN_TYPES.jwt}); the value is not repeated, it may be a token`, param)
  }
  t.notMatch(b.logs(), /LKCANARY/, 'the opaque token is in no log line')
  t.notMatch(JSON.stringify(b.events), /LKCANARY/, 'nor in any event')
  t.notMatch(JSON.stringify(b.events), user.slice(0, 60), 'nor the start of the JWT')
  // A well-formed type the broker does not take is still named, so the client can see its mistake.
  const saml = await b.exchange(delegatedRequest(user, await b.attest(AGENT), { subject_token_type: 'urn:ietf:params:oauth:token-type:saml2' }))
  t.equal(saml.body.error_description, 'subject_token_type "urn:ietf:params:oauth:token-type:saml2" is not accepted')
})

t.test('a token sent as a scope is not echoed in the error, the log or the event', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  // `scope` takes any printable characters: a client that swapped scope and subject_token sends a
  // token there. Scopes the registry or the user's token names are still named.
  const opaque = 'ghp_LKCANARY' + 'Zx9'.repeat(9) + 'Q'
  const user = await b.userToken('u', 'read admin')
  for (const scope of [opaque, user, `read ${opaque}`, `admin ${opaque} write`]) {
    const res = await b.exchange(delegatedRequest(user, await b.attest(AGENT), { scope }))
    t.equal(res.status, 400, why(res))
    t.equal(res.body.error, 'invalid_scope')
    t.notMatch(res.text, /LKCANARY/, 'the opaque token is not in the error')
    t.notOk(res.text.includes(user.split('.')[1]!), 'nor the JWT')
    t.match(res.body.error_description, /1 requested scope no agent type is granted \(not repeated: it may be a token\)/)
  }
  const named = await b.exchange(delegatedRequest(user, await b.attest(AGENT), { scope: `admin ${opaque}` }))
  t.equal(named.body.error_description, 'agent type "summarizer" may not receive scope admin and 1 requested scope no agent type is granted (not repeated: it may be a token)')
  t.notMatch(b.logs(), /LKCANARY/, 'the opaque token is in no log line')
  t.notMatch(JSON.stringify(b.events), /LKCANARY/, 'nor in any event')
  t.notOk(b.logs().includes(user.split('.')[1]!), 'nor the JWT')
})

t.test('a token sent as the audience is not recorded in the event or the log', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  const opaque = 'ghp_LKCANARY' + 'Zx9'.repeat(9) + 'Q'
  const user = await b.userToken('u', 'read')
  for (const audience of [opaque, user]) {
    const res = await b.exchange(delegatedRequest(user, await b.attest(AGENT), { audience }))
    t.equal(res.status, 400, why(res))
    t.equal(res.body.error, 'invalid_target')
    t.notMatch(res.text, /LKCANARY/, 'not in the error')
  }
  t.notMatch(b.logs(), /LKCANARY/, 'the opaque token is in no log line')
  t.notMatch(JSON.stringify(b.events), /LKCANARY/, 'nor in any event')
  t.notOk(b.logs().includes(user.split('.')[1]!), 'nor the JWT')
  t.match(b.events.at(-1), { type: 'token.exchange', error: 'invalid_target', audience: null })
  // A known audience is still recorded, granted or refused.
  const mail = await b.exchange(delegatedRequest(user, await b.attest('agent:helper:prod:h'), { audience: MAIL }))
  t.equal(mail.body.error, 'invalid_target')
  t.match(b.events.at(-1), { error: 'invalid_target', audience: MAIL })
})

t.test("a task handle sent as task_id is refused, and recorded nowhere", async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  // A client that put the proxy credential where the task's id goes (the admin API refuses to
  // revoke such a value: a task under it could never be revoked by task).
  const handle = 'lkt_' + 'LKCANARYq9Zx'.repeat(2).slice(0, 22)
  for (const task_id of [handle, `task:${handle}`, `${handle}.1`]) {
    const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { task_id }))
    t.equal(res.status, 400, why(res))
    t.equal(res.body.error, 'invalid_request')
    t.match(res.body.error_description, /task_id must be the task's id, not its handle/)
    t.notOk('access_token' in res.body, 'no token')
    t.notMatch(res.text, /LKCANARY/, 'the handle is not in the error')
  }
  t.notMatch(b.logs(), /LKCANARY/, 'nor in any log line')
  t.notMatch(JSON.stringify(b.events), /LKCANARY/, 'nor in any event')
  t.match(b.events.at(-1), { type: 'token.exchange', outcome: 'refused', task: null })
  // A task's id is taken as ever.
  const ok = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest(AGENT), { task_id: '0b7e4c1e-0d7a-4a43-9b57-3a1f2e6c9d10' }))
  t.equal(ok.status, 200, why(ok))
})
