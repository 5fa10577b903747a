// RFC 8693 token exchange: who is asking (the actor's attestation), for whom (the user's token,
// a delegating agent's token, or nobody), for what (one audience, scopes), for how long (the
// task). Every refusal is an OAuthError with the RFC's code; every outcome is an event.
//
//   subject_token = attestation, no actor_token      → sub = the agent itself
//   subject_token = user token,  actor_token = attestation   → sub = user, act.sub = agent
//   subject_token = broker token (aud = broker, from agent A), actor_token = attestation of B
//                                                     → sub = A's subject, act = {sub: B, act: {sub: A}}
import { createHash, randomUUID } from 'node:crypto'
import { decodeJwt, type JWTPayload } from 'jose'
import type { Form } from './http/form.js'
import { OAuthError } from './oauth-error.js'
import { AttestationFailed, AttestationUnavailable, TOKEN_TYPES, type Attestation, type AttestationVerifier } from './attest/attestor.js'
import { verifyFailure, verifyJwt, TokenInvalid, MAX_TOKEN_BYTES } from './jwt.js'
import type { Registry, AgentTypeSpec } from './registry.js'
import type { KeyRing } from './keys.js'
import type { RevocationList } from './revocations/list.js'
import type { UserTokenVerifier } from './users.js'
import type { BrokerEvents, ExchangeEvent } from './events.js'
import { MAX_ACT_DEPTH, readActChain, type Ancestor } from './act.js'
import { namesAnAgent } from './agent-name.js'
import { subjectAncestry } from '../lib/delegation.js'
import { readDelegationGrants, writeDelegationGrants, type DelegationGrants } from './delegation-grants.js'

export { TOKEN_EXCHANGE_GRANT as GRANT_TYPE } from '../lib/oauth.js'
import { TOKEN_EXCHANGE_GRANT as GRANT_TYPE } from '../lib/oauth.js'
import { TASK_HANDLE } from '../lib/task-handle.js'
/** RFC 9068's media type for JWT access tokens. */
export const ACCESS_TOKEN_TYP = 'at+jwt'
const SCOPE_TOKEN = /^[\x21\x23-\x5B\x5D-\x7E]+$/
/** A task ID as task_id carries it (a sidecar's are UUIDs); a task revocation is one too. */
export const TASK_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/
const ACCEPTED_SUBJECT_TYPES = new Set<string>([TOKEN_TYPES.jwt, TOKEN_TYPES.accessToken, 'urn:ietf:params:oauth:token-type:id_token'])

export interface ExchangeDeps {
  issuer: string
  registry: () => Registry
  attestors: readonly AttestationVerifier[]
  users: UserTokenVerifier | undefined
  keys: KeyRing
  revocations: RevocationList
  events: BrokerEvents
  floorS: number
  defaultDurationS: number
  now: () => number
  /** Secrets lent for a task instead of a JWT, by audience (read once at start). */
  leasedSecrets: ReadonlyMap<string, string>
}

export interface TokenResponse {
  access_token: string
  issued_token_type: string
  token_type: 'Bearer' | 'N_A'
  expires_in: number
  scope: string
  /** For a leased secret: the lease's ID, audited in place of a jti. */
  lease_id?: string
}

/** A delegation chain: the subject, and the agents that acted, outermost (first delegator) first. */
interface Subject {
  sub: string
  /** The user's or delegator's scopes; undefined when the subject is the agent itself. */
  scopes: string[] | undefined
  /** For a delegation: its scopes audience by audience, which bound it (scopes is their union). */
  grants?: DelegationGrants
  exp: number | undefined
  delegators: string[]
  isUser: boolean
  /** The delegation tokens this subject rests on, oldest first (carried as `delegated_from`). */
  ancestry: Ancestor[]
  /** The user token's may_act (RFC 8693 §4.4): the one agent the user lets act for them. */
  mayAct?: string
}

/** A short, non-reversible token fingerprint for events. */
export function tokenHash(token: string): string {
  return createHash('sha256').update(token).digest('base64url').slice(0, 22)
}

export class TokenExchange {
  constructor(private readonly d: ExchangeDeps) {}

  async exchange(form: Form): Promise<TokenResponse> {
    const event: ExchangeEvent = {
      type: 'token.exchange',
      ts: '',
      outcome: 'refused',
      error: null,
      reason: '',
      agent: null,
      agent_type: null,
      attestor: null,
      delegated_by: [],
      user: null,
      task: null,
      audience: null,
      scopes: [],
      jti: null,
      exp: null,
    }
    try {
      const res = await this.run(form, event)
      event.outcome = 'granted'
      if (event.reason === '') event.reason = 'granted'
      return res
    } catch (err) {
      const e = err instanceof OAuthError ? err : new OAuthError('invalid_request', 'the request could not be processed', 400, String(err))
      event.error = e.error
      event.reason = e.reason
      throw e
    } finally {
      event.ts = new Date(this.d.now()).toISOString()
      this.d.events.emit(event)
    }
  }

  private async run(form: Form, ev: ExchangeEvent): Promise<TokenResponse> {
    const grantType = form.one('grant_type')
    if (grantType === undefined) throw new OAuthError('invalid_request', 'missing grant_type')
    if (grantType !== GRANT_TYPE) throw new OAuthError('unsupported_grant_type', `only ${GRANT_TYPE} is supported`)

    const subjectToken = required(form, 'subject_token')
    const subjectType = required(form, 'subject_token_type')
    const actorToken = form.one('actor_token')
    const actorType = form.one('actor_token_type')
    if (actorToken !== undefined && actorType === undefined) throw new OAuthError('invalid_request', 'actor_token_type is required with actor_token')
    if (actorToken === undefined && actorType !== undefined) throw new OAuthError('invalid_request', 'actor_token_type given without actor_token')
    if (actorToken === '') throw new OAuthError('invalid_request', 'actor_token is empty')

    const requestedType = form.one('requested_token_type')
    if (requestedType !== undefined && requestedType !== TOKEN_TYPES.accessToken && requestedType !== TOKEN_TYPES.jwt && requestedType !== TOKEN_TYPES.leasedSecret) {
      throw new OAuthError('invalid_request', `requested_token_type must be ${TOKEN_TYPES.accessToken}, ${TOKEN_TYPES.jwt} or ${TOKEN_TYPES.leasedSecret}`)
    }
    const lease = requestedType === TOKEN_TYPES.leasedSecret

    const targets = [...form.all('audience'), ...form.all('resource')]
    if (targets.length !== 1) throw new OAuthError('invalid_target', `exactly one audience or resource is required, got ${targets.length}`)
    const audience = targets[0]!
    if (audience.length === 0 || audience.length > 512) throw new OAuthError('invalid_target', 'audience must be 1 to 512 characters')
    if (form.all('resource').length === 1 && !isAbsoluteUri(audience)) throw new OAuthError('invalid_target', 'resource must be an absolute URI')

    const scopeParam = form.one('scope')
    let requested: string[] | undefined
    if (scopeParam !== undefined) {
      requested = scopeParam.split(' ').filter(Boolean)
      if (requested.length === 0 || requested.some((s) => !SCOPE_TOKEN.test(s))) throw new OAuthError('invalid_scope', 'scope must be space-separated scope tokens')
    }

    const task = required(form, 'task_id')
    if (!TASK_ID.test(task)) throw new OAuthError('invalid_request', 'task_id must be 1-128 characters of A-Z a-z 0-9 . _ : -')
    // A sidecar's task handle is its proxy credential, never a task ID: taken, it would be in the
    // event, the log and the token's task_id claim every API receives, and its task could never be
    // revoked (the admin API refuses a task value holding a handle, for the same reason).
    if (TASK_HANDLE.test(task)) throw new OAuthError('invalid_request', "task_id must be the task's id, not its handle (lkt_…, a proxy credential; not repeated)")
    ev.task = task
    const durationParam = form.one('task_duration')
    let duration = this.d.defaultDurationS
    if (durationParam !== undefined) {
      if (!/^[1-9][0-9]{0,5}$/.test(durationParam)) throw new OAuthError('invalid_request', 'task_duration must be a whole number of seconds')
      duration = Number(durationParam)
    }

    const registry = this.d.registry()
    // Recorded only when it names a known audience: a client that swapped audience and
    // subject_token sent a token here, and the event goes to the log.
    if (audience === this.d.issuer || Object.values(registry.agents).some((s) => Object.hasOwn(s.audiences, audience))) ev.audience = audience
    // Who is acting: the actor's attestation, or the subject's when the agent acts for itself.
    const attestation = await this.attest(actorToken ?? subjectToken, actorType ?? subjectType, actorToken ? 'actor_token' : 'subject_token', registry)
    ev.agent = attestation.instanceId
    ev.agent_type = attestation.agentType
    ev.attestor = attestation.kind
    const spec = registry.agents[attestation.agentType]!

    const subject: Subject = actorToken
      ? await this.subject(subjectToken, subjectType, attestation, registry)
      : { sub: attestation.instanceId, scopes: undefined, exp: undefined, delegators: [], isUser: false, ancestry: [] }
    ev.delegated_by = subject.delegators
    ev.user = subject.isUser ? subject.sub : null

    const chain = [...subject.delegators, attestation.instanceId]
    const revoked = this.d.revocations.check(chain, task, undefined)
    if (revoked) {
      throw new OAuthError('invalid_request', `${revoked.kind} ${revoked.value} is revoked`, 400, `revoked: ${revoked.kind} ${revoked.value}`)
    }

    if (subject.isUser && spec.users === 'none') throw new OAuthError('invalid_request', `agent type "${attestation.agentType}" may not act for users`)
    if (!subject.isUser && spec.users === 'required') {
      throw new OAuthError('invalid_request', `agent type "${attestation.agentType}" requires a user subject_token`)
    }

    // A token for the broker itself is a delegation token: only agents that may task others get one.
    const delegation = audience === this.d.issuer
    // A delegation token lets another agent act for the user, which a user token naming its one
    // actor (may_act) forbids: the agent it names acts for the user itself, or nobody does. A
    // delegation token carries no may_act: issued, it let the agent tasked with it act for the
    // user, whom the user never named.
    if (delegation && subject.mayAct !== undefined) {
      throw new OAuthError('invalid_request', 'subject_token: its may_act lets only the agent it names act for the user; it may not be delegated to others')
    }
    const allowed = delegation ? (spec.may_task.length > 0 ? [...new Set(Object.values(spec.audiences).flat())] : undefined) : spec.audiences[audience]
    if (!allowed) throw new OAuthError('invalid_target', `agent type "${attestation.agentType}" may not receive tokens for this audience`)
    if (!delegation && subject.grants && !subject.grants.has(audience)) {
      throw new OAuthError('invalid_target', 'the delegation in subject_token does not cover this audience')
    }
    // A delegation is bounded audience by audience (delegation-grants.ts); its ceiling is their union.
    const delegated = delegation ? delegationCeiling(spec, subject) : undefined
    const held = heldAt(subject, audience)
    const ceiling = delegated ? [...new Set([...delegated.values()].flat())] : held === undefined ? allowed : allowed.filter((s) => held.includes(s))
    // A lent secret carries no scopes (what it can do is the audience's business), but it is lent
    // only where a JWT would be granted: the same ceiling, the same refusals.
    let granted: string[]
    if (requested) {
      const notAllowed = requested.filter((s) => !allowed.includes(s))
      if (notAllowed.length > 0) throw new OAuthError('invalid_scope', `agent type "${attestation.agentType}" may not receive ${nameScopes(notAllowed, registry, subject.scopes)}`)
      const notHeld = requested.filter((s) => !ceiling.includes(s))
      if (notHeld.length > 0) throw new OAuthError('invalid_scope', `the subject_token does not grant scope ${notHeld.join(' ')}`)
      granted = [...new Set(requested)]
    } else if (lease && allowed.length === 0) {
      // The registry names no scopes for this audience: there is nothing to consent to.
      granted = []
    } else {
      granted = ceiling
      if (granted.length === 0) throw new OAuthError('invalid_scope', 'the subject_token grants none of the scopes this agent may receive for this audience')
    }

    // A task may outlast the type's token lifetime: its tokens do not (max_lifetime_s: "no token
    // of this type lives longer, whatever the task says"); the sidecar fetches the next one at
    // half-life. Refusing such a task made a sidecar's default hour-long task fail for its first
    // three quarters, then work once less than max_lifetime_s of it was left.
    const nowS = Math.floor(this.d.now() / 1000)
    let lifetime = Math.min(Math.max(Math.ceil(duration * 1.2), this.d.floorS), spec.max_lifetime_s)
    // Never outlive the delegation it rests on. Its exp may be fractional (RFC 7519 NumericDate):
    // taken down to the whole second, so exp and expires_in stay whole numbers, which RFC 6749
    // clients read as integers (Go's x/oauth2 refuses 100.5), and a subject with under a second
    // left is refused rather than lent a token living a fraction of one.
    if (subject.exp !== undefined) lifetime = Math.min(lifetime, Math.floor(subject.exp) - nowS)
    if (lifetime <= 0) throw new OAuthError('invalid_request', 'subject_token: expired')

    const jti = randomUUID()
    if (lease) {
      const secret = delegation ? undefined : this.d.leasedSecrets.get(audience)
      if (secret === undefined) throw new OAuthError('invalid_target', 'the broker holds no secret to lend for this audience')
      ev.jti = jti
      ev.exp = nowS + lifetime
      ev.reason = 'leased'
      // RFC 8693 §2.2.1: token_type N_A when what is issued is not an access token.
      return { access_token: secret, issued_token_type: TOKEN_TYPES.leasedSecret, token_type: 'N_A', expires_in: lifetime, scope: '', lease_id: jti }
    }
    // What is delegated: each audience's ceiling, narrowed to the scopes asked for. An audience left
    // with none of its registry's scopes is not delegated at all.
    let details: ReturnType<typeof writeDelegationGrants> | undefined
    if (delegated) {
      const narrowed = new Map<string, string[]>()
      for (const [aud, scopes] of delegated) {
        const kept = requested ? scopes.filter((s) => granted.includes(s)) : scopes
        if (kept.length > 0 || (!requested && spec.audiences[aud]!.length === 0)) narrowed.set(aud, kept)
      }
      details = writeDelegationGrants(narrowed)
    }
    const act: Record<string, unknown> = { sub: attestation.instanceId }
    {
      // Innermost `act` is the first delegator (RFC 8693 §4.1: nested act = prior actors).
      let cur = act
      for (let i = subject.delegators.length - 1; i >= 0; i--) {
        const next = { sub: subject.delegators[i]! }
        cur.act = next
        cur = next
      }
    }
    const claims: JWTPayload = {
      iss: this.d.issuer,
      sub: subject.sub,
      aud: audience,
      act,
      client_id: attestation.instanceId,
      scope: granted.join(' '),
      task_id: task,
      ...(subject.ancestry.length > 0 ? { delegated_from: subject.ancestry } : {}),
      ...(details ? { authorization_details: details } : {}),
      iat: nowS,
      exp: nowS + lifetime,
      jti,
    }
    let token: string
    try {
      token = await this.d.keys.sign(claims, ACCESS_TOKEN_TYP)
    } catch (err) {
      // The key ring could not record how long its key must stay (its directory unwritable): the
      // broker's side, not the client's, so 503 and the sidecar retries.
      throw new OAuthError('temporarily_unavailable', 'the token could not be signed; try again later', 503, `signing failed: ${err instanceof Error ? err.message : String(err)}`)
    }
    ev.scopes = granted
    ev.jti = jti
    ev.exp = nowS + lifetime
    return {
      access_token: token,
      issued_token_type: requestedType ?? TOKEN_TYPES.accessToken,
      token_type: 'Bearer',
      expires_in: lifetime,
      scope: granted.join(' '),
    }
  }

  private async attest(token: string, type: string, param: string, registry: Registry): Promise<Attestation> {
    const verifier = this.pickAttestor(token, type, param)
    try {
      return await verifier.verify(token, registry)
    } catch (err) {
      if (err instanceof AttestationFailed) {
        if (err.unregistered) throw new OAuthError('unauthorized_client', `${param}: ${err.message}`)
        throw new OAuthError('invalid_request', `${param}: ${err.message}`)
      }
      // As for a key set that cannot be fetched: the broker's side, so 503 and the sidecar retries.
      if (err instanceof AttestationUnavailable) throw new OAuthError('temporarily_unavailable', `${param}: could not be checked; try again later`, 503, `${param}: ${err.message}`)
      throw verifyFailure(param, err)
    }
  }

  private pickAttestor(token: string, type: string, param: string): AttestationVerifier {
    const explicit = this.d.attestors.find((a) => a.tokenType === type)
    if (explicit) return explicit
    if (type !== TOKEN_TYPES.jwt) throw new OAuthError('invalid_request', `${param}_type ${quoteType(type, `${param}_type`)} is not a workload attestation type this broker accepts`)
    const payload = peek(token, param)
    const found = this.d.attestors.find((a) => a.claims(payload))
    if (!found) throw new OAuthError('invalid_request', `${param}: not issued by a trusted workload attestor`)
    return found
  }

  private async subject(token: string, type: string, actor: Attestation, registry: Registry): Promise<Subject> {
    if (!ACCEPTED_SUBJECT_TYPES.has(type)) throw new OAuthError('invalid_request', `subject_token_type ${quoteType(type, 'subject_token_type')} is not accepted`)
    const payload = peek(token, 'subject_token')
    if (payload.iss === this.d.issuer) return this.delegation(token, actor, registry)
    if (!this.d.users) throw new OAuthError('invalid_request', 'subject_token: this broker accepts no user tokens (broker.users is not configured)')
    if (payload.iss !== this.d.users.issuer) throw new OAuthError('invalid_request', 'subject_token: issuer is not the configured user identity provider')
    let user
    try {
      user = await this.d.users.verify(token, this.d.now())
    } catch (err) {
      throw verifyFailure('subject_token', err)
    }
    // agent:… is the namespace of instance IDs: a user so named would pass, in the issued token
    // and the trail, for an agent acting on its own behalf.
    if (namesAnAgent(user.sub)) throw new OAuthError('invalid_request', 'subject_token: its sub is an agent instance ID (agent:…), not a user')
    // Invisible characters in an identifier only serve to make two read as one (`\u200bagent:…`).
    if (INVISIBLE.test(user.sub)) throw new OAuthError('invalid_request', 'subject_token: its sub holds an invisible, format or control character')
    // Half a surrogate pair is no character: UTF-8 cannot carry it, and a resource server's decoder
    // (Go's encoding/json, for one) reads each as U+FFFD, so "alice\ud800", "alice\udc00" and
    // "alice\ufffd", three users here, are one user there.
    if (/\p{Cs}/u.test(user.sub)) throw new OAuthError('invalid_request', 'subject_token: its sub holds half a surrogate pair (\\ud800-\\udfff alone), which is no character')
    // The user named who may act for them (RFC 8693 §4.4): any other agent is refused.
    if (user.mayAct !== null && user.mayAct !== actor.instanceId) {
      throw new OAuthError('invalid_request', `subject_token: its may_act names another actor than ${actor.instanceId}`)
    }
    return { sub: user.sub, scopes: user.scopes, exp: user.exp, delegators: [], isUser: true, ancestry: [], ...(user.mayAct !== null ? { mayAct: user.mayAct } : {}) }
  }

  /** A broker-issued delegation token (aud = this broker) from an agent that may task the actor's type. */
  private async delegation(token: string, actor: Attestation, registry: Registry): Promise<Subject> {
    let p: JWTPayload
    try {
      p = await verifyJwt(token, this.d.keys.verifier, { issuer: this.d.issuer, audience: this.d.issuer, requiredClaims: ['sub', 'jti', 'act'] })
    } catch (err) {
      throw verifyFailure('subject_token', err)
    }
    const read = readActChain(p.act)
    if (!read.ok) throw new OAuthError('invalid_request', `subject_token: ${read.problem}`)
    // Oldest (first delegator) first.
    const chain = read.agents.reverse()
    if (chain.length === 0) throw new OAuthError('invalid_request', 'subject_token: act claim is malformed')
    // Refused, never cut: the token issued here carries the whole chain plus the actor.
    if (chain.length + 1 > MAX_ACT_DEPTH) {
      throw new OAuthError('invalid_request', `subject_token: delegating again would make a chain of ${chain.length + 1} agents; at most ${MAX_ACT_DEPTH} are allowed`)
    }
    const delegator = chain[chain.length - 1]!
    const delegatorType = /^agent:([a-z0-9-]+):/.exec(delegator)?.[1]
    const spec: AgentTypeSpec | undefined = delegatorType ? registry.agents[delegatorType] : undefined
    if (!spec || !spec.may_task.includes(actor.agentType)) {
      throw new OAuthError('unauthorized_client', `agent type "${delegatorType ?? '?'}" may not task agent type "${actor.agentType}"`)
    }
    // This delegation's task and jti, and those of every delegation it was itself exchanged from.
    const ancestry = subjectAncestry(p)
    if (!ancestry) throw new OAuthError('invalid_request', 'subject_token: delegated_from claim is malformed')
    for (const a of ancestry) {
      const revoked = this.d.revocations.check([], a.task_id, a.jti)
      if (revoked) throw new OAuthError('invalid_request', `subject_token: ${revoked.kind} ${revoked.value} is revoked`, 400, `revoked: ${revoked.kind} ${revoked.value}`)
    }
    const grants = readDelegationGrants(p.authorization_details)
    if (!grants) throw new OAuthError('invalid_request', 'subject_token: authorization_details claim is missing or malformed')
    const scopes = [...new Set([...grants.values()].flat())]
    // The chain acts for p.sub: a user, or the first delegator itself when that agent started the
    // chain for itself. However deep the chain, an agent subject is never a user.
    const isUser = p.sub !== chain[0] && !namesAnAgent(p.sub!)
    return { sub: p.sub!, scopes, grants, exp: p.exp, delegators: chain, isUser, ancestry }
  }
}

/** Control, format (zero-width, bidi, soft hyphen, word joiner) and default-ignorable characters, and the Braille blank (drawn as a space). */
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Default_Ignorable_Code_Point}\u2800]/u

/** What the subject holds at `aud`: its delegation's entry there, else the user's scopes; undefined for the agent itself. */
function heldAt(subject: Subject, aud: string): readonly string[] | undefined {
  return subject.grants ? subject.grants.get(aud) : subject.scopes
}

/**
 * A delegation's ceiling at each audience the delegating type may receive tokens for: its
 * registry scopes there, bounded by what the subject holds there. Under a delegation, an audience
 * it does not cover is left out: the chain never reaches further than its delegator did.
 */
function delegationCeiling(spec: AgentTypeSpec, subject: Subject): Map<string, string[]> {
  const out = new Map<string, string[]>()
  for (const [aud, scopes] of Object.entries(spec.audiences)) {
    if (subject.grants && !subject.grants.has(aud)) continue
    const held = heldAt(subject, aud)
    const kept = held === undefined ? scopes : scopes.filter((s) => held.includes(s))
    // An audience whose registry names no scopes has nothing to consent to (a lent secret).
    if (kept.length > 0 || scopes.length === 0) out.set(aud, kept)
  }
  return out
}

/**
 * Requested scopes as a refusal names them: those the registry or the subject_token knows, by
 * name; any other only counted. `scope` takes any printable characters, so a client that put a
 * token there (a swapped parameter) must not find it repeated in the error, the event or the log.
 */
function nameScopes(scopes: string[], registry: Registry, granted: string[] | undefined): string {
  const known = new Set([...Object.values(registry.agents).flatMap((s) => Object.values(s.audiences).flat()), ...(granted ?? [])])
  const named = scopes.filter((s) => known.has(s))
  const unknown = scopes.length - named.length
  const parts = named.length > 0 ? [`scope ${named.join(' ')}`] : []
  if (unknown > 0) parts.push(`${unknown} requested scope${unknown === 1 ? '' : 's'} no agent type is granted (not repeated: it may be a token)`)
  return parts.join(' and ')
}

function required(form: Form, name: string): string {
  const v = form.one(name)
  if (v === undefined || v === '') throw new OAuthError('invalid_request', `missing ${name}`)
  return v
}

/** Reads claims without trusting them, only to route the token to the verifier that will. */
function peek(token: string, param: string): JWTPayload {
  if (token.length > MAX_TOKEN_BYTES) throw new OAuthError('invalid_request', `${param}: is longer than ${MAX_TOKEN_BYTES} bytes`)
  try {
    return decodeJwt(token)
  } catch {
    throw new OAuthError('invalid_request', `${param}: not a valid signed JWT`)
  }
}

function isAbsoluteUri(s: string): boolean {
  return /^[A-Za-z][A-Za-z0-9+.-]*:[^\s]*$/.test(s) && !s.includes('#')
}

/** What a token type URI looks like (RFC 8693 §3: urn:ietf:params:oauth:token-type:…, or ours). */
const TOKEN_TYPE_URN = /^urn:[A-Za-z0-9._:-]{1,100}$/

/**
 * A *_token_type value, quoted in a refusal only when it reads as a type: a client that swapped
 * the values sent its token here, and the description (and the event's reason) must not repeat it.
 */
function quoteType(type: string, param: string): string {
  if (TOKEN_TYPE_URN.test(type)) return JSON.stringify(type)
  throw new OAuthError('invalid_request', `${param} is not a token type this broker accepts (a URI such as ${TOKEN_TYPES.jwt}); the value is not repeated, it may be a token`)
}

export { TokenInvalid }
