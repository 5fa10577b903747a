// Task-scoped tokens, cached in memory per (task, audience, scopes), from any TokenIssuer (the
// broker's RFC 8693 exchange, a broker-leased secret, OAuth client credentials):
//  - refreshed in the background at half their remaining life (SPIRE's rotation rule), so a
//    busy task never waits on the broker;
//  - at most one exchange in flight per key: 1,000 concurrent first requests cause one exchange;
//  - fail closed: a token with less than min_remaining_ms left is never injected, and a request
//    that cannot get a valid token is refused with 503 and the reason;
//  - ending or revoking a task drops its tokens, and an exchange in flight for it is discarded
//    when it lands: whoever waits on it gets LK_TASK_ENDED or LK_REVOKED, never the token;
//  - a token whose actor is not sidecar.agent_id (the broker attested another workload) is never
//    cached nor injected: audit, revocation and the API's act.sub must name the same agent.
import { LRUCache } from 'lru-cache'
import type { Credential, CredentialBinding, CredentialSource, Identity, TaskRef } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { ExchangeFailed, issuedTokenProblem, MAX_EXPIRES_IN_S, type ExchangeOutcome, type IssuedToken } from './exchange-outcome.js'
import { HeldValues } from './held.js'

/** Where a CachedTokenSource gets tokens. One interface; each provider implements it. */
export interface TokenIssuer {
  /** Whether a token is bound to a task (the broker's are; client credentials are the sidecar's own). */
  readonly needsTask: boolean
  /** `agentId` is sidecar.agent_id: an issuer that can read its token's actor refuses any other (ActorMismatch). */
  issue(task: TaskRef | null, binding: CredentialBinding, durationS: number, agentId: string): Promise<IssuedToken>
  close(): Promise<void>
}

/**
 * The broker issued a token whose current actor (act.sub) is not the configured agent: the
 * evidence attests another workload. Refused: the API would see one agent, this sidecar's audit
 * and revocation state another. The reason names both IDs (they are not secrets), never the token.
 */
export class ActorMismatch extends ExchangeFailed {
  constructor(
    readonly configured: string,
    readonly attested: string | null,
  ) {
    super(
      'invalid_response',
      attested === null
        ? `the broker issued a token with no act.sub, so not for sidecar.agent_id ${configured}; refused`
        : `the broker attested agent ${attested}, not sidecar.agent_id ${configured}; its token is refused (check sidecar.agent_id and the workload's attestation)`,
    )
  }
}

/** A stand-in task for issuers whose tokens belong to the sidecar, not a task. */
const NO_TASK: TaskRef = { id: '(sidecar)', expiresAt: Number.MAX_SAFE_INTEGER, userToken: null, ended: false }

interface Entry {
  credential: Credential | null
  /** Epoch ms after which the credential is never used. */
  usableUntil: number
  refreshAt: number
  inflight: Promise<Credential> | null
  /** After a failed exchange with no usable token: its error, repeated until `until`, so a burst does not hammer a sick issuer. */
  failure: { error: LatchkeyError; until: number } | null
}

/** An exchange in flight for a task; `voided` is set when the task ends or is revoked meanwhile. */
interface Ticket {
  voided: LatchkeyError | null
}

/**
 * Why a task's tokens are dropped: what a request waiting on its exchange is told. Revoked as a
 * task, or through a delegation its token was derived from (control/state.ts names it the same).
 */
export type TaskDrop = 'ended' | 'revoked' | 'revoked-delegation'

function taskDropError(why: TaskDrop): LatchkeyError {
  if (why === 'ended') return new LatchkeyError('LK_TASK_ENDED', 'the task ended while its token was being fetched')
  return new LatchkeyError('LK_REVOKED', 'revoked', why === 'revoked' ? 'revocation:task' : 'revocation:delegation')
}

/** Epoch ms as ISO 8601, clamped to what a Date can hold: describing a task never throws. */
export function isoTime(ms: number): string {
  const MAX = 8.64e15
  return new Date(Number.isNaN(ms) ? 0 : Math.max(-MAX, Math.min(MAX, ms))).toISOString()
}

/** How long a failed exchange's answer is reused before the next attempt. */
export const FAILURE_HOLD_MS = 500

export interface BrokerSourceOptions {
  minRemainingMs: number
  now?: () => number
  onExchange?: (outcome: 'granted' | ExchangeOutcome) => void
  onRefreshFailed?: (reason: string) => void
  /** When it returns a reason, no new token is fetched (cached ones still serve): the control stream is stale. */
  mintRefusal?: () => string | null
  /** The broker attested another agent than sidecar.agent_id: called once per (configured, attested) pair, to log at error level. */
  onActorMismatch?: (configured: string, attested: string | null, reason: string) => void
}

/**
 * An issued token the binding's injector cannot send (a line break, text beyond ASCII in a
 * header, padding, nothing) refused as an invalid answer, before it is cached: once cached, every
 * call failed in undici, a retryable 502, for the token's whole life. The reason never quotes it.
 */
function sendableBy(binding: CredentialBinding): (issued: IssuedToken) => IssuedToken {
  return (issued) => {
    const problem = issuedTokenProblem(issued.token, (v) => binding.cannotCarry(v))
    if (problem === null) return issued
    const who = binding.source === 'client_credentials' ? 'the authorization server' : 'the broker'
    throw new ExchangeFailed('invalid_response', `${who} issued ${binding.source === 'broker_secret' ? 'a leased secret' : 'a token'} that cannot be sent: it ${problem} (not repeated)`)
  }
}

/** Tokens cached at once (one per task, audience and scopes). */
const MAX_CACHED = 10_000

/**
 * A binding's part of the cache key (audience first: describe() reads it there): what its token
 * is asked for with, so two bindings share a token only when the issuer would answer them alike.
 * Its tokens, across tasks, are what held() answers. The source is part of it (a broker JWT and a
 * leased secret for one audience are different credentials), and for client credentials the
 * binding itself: each has its own registration (token_url, client_id, resource).
 */
const bindingKeys = new WeakMap<CredentialBinding, string>()
function bindingKey(binding: CredentialBinding): string {
  let k = bindingKeys.get(binding)
  if (k === undefined) {
    const issuedFor = binding.source === 'client_credentials' ? `client_credentials:${binding.id}` : binding.source
    bindingKeys.set(binding, (k = binding.tokenAudience + '\n' + binding.scopes.join(' ') + '\n' + issuedFor))
  }
  return k
}

export class CachedTokenSource implements CredentialSource {
  private readonly cache = new LRUCache<string, Entry>({ max: MAX_CACHED })
  private readonly keysByTask = new Map<string, Set<string>>()
  /** Exchanges in flight, by task: a task's end or revocation voids them. */
  private readonly inflightByTask = new Map<string, Set<Ticket>>()
  private readonly now: () => number
  /** Exchanges started, for the benchmark and tests. */
  exchanges = 0
  /** Bumped by dropAll: an exchange started before a revocation is discarded when it lands. */
  private generation = 0
  /** Actor mismatches already reported, so a sidecar retrying every FAILURE_HOLD_MS logs one line, not thousands. */
  private readonly mismatchesReported = new Set<string>()
  /** Tokens issued and not yet expired, by binding key (held). */
  private readonly issued: HeldValues

  constructor(
    private readonly client: TokenIssuer,
    private readonly opts: BrokerSourceOptions,
  ) {
    this.now = opts.now ?? Date.now
    // Twice the cache: a refresh at half life leaves the token it replaces valid as long again.
    this.issued = new HeldValues(2 * MAX_CACHED, this.now)
  }

  /**
   * Every token issued for the binding's audience and scopes and not yet expired, across tasks,
   * those a refresh superseded and those of tasks since ended or revoked (the upstream may still
   * accept them): a response to any call with one is checked for all of them.
   */
  held(binding: CredentialBinding): readonly Credential[] {
    return this.issued.get(bindingKey(binding))
  }

  get(binding: CredentialBinding, identity: Identity): Credential | Promise<Credential> {
    const task = this.client.needsTask ? identity.task : NO_TASK
    if (!task || task.ended) {
      throw new LatchkeyError('LK_PROXY_AUTH', `credential ${binding.id} is task-scoped: name an open task in the proxy URL (POST /v1/tasks)`)
    }
    const key = task.id + '\n' + bindingKey(binding)
    const now = this.now()
    const e = this.cache.get(key)
    const refusal = this.opts.mintRefusal?.() ?? null
    if (e && e.credential && now < e.usableUntil) {
      if (now >= e.refreshAt && !e.inflight && !refusal) this.start(key, e, task, binding, identity.agentId).catch(() => {})
      return e.credential
    }
    if (e?.inflight) return e.inflight
    if (e?.failure && now < e.failure.until) throw e.failure.error
    if (refusal) throw new LatchkeyError('LK_CREDENTIAL_UNAVAILABLE', `no new token for ${binding.tokenAudience}: ${refusal}`)
    const entry: Entry = e ?? { credential: null, usableUntil: 0, refreshAt: 0, inflight: null, failure: null }
    if (!e) {
      this.cache.set(key, entry)
      let keys = this.keysByTask.get(task.id)
      if (!keys) this.keysByTask.set(task.id, (keys = new Set()))
      keys.add(key)
    }
    return this.start(key, entry, task, binding, identity.agentId)
  }

  private start(key: string, entry: Entry, task: TaskRef, binding: CredentialBinding, agentId: string): Promise<Credential> {
    this.exchanges++
    // A lifetime counts from here, before the evidence is fetched and the request sent: the
    // issuer's clock started it no earlier, and a slow answer must not lengthen it.
    const started = this.now()
    const durationS = Math.ceil((task.expiresAt - started) / 1000)
    const generation = this.generation
    const ticket: Ticket = { voided: null }
    let tickets = this.inflightByTask.get(task.id)
    if (!tickets) this.inflightByTask.set(task.id, (tickets = new Set()))
    tickets.add(ticket)
    const landed = () => {
      const set = this.inflightByTask.get(task.id)
      if (!set) return
      set.delete(ticket)
      if (set.size === 0) this.inflightByTask.delete(task.id)
    }
    const p = this.client.issue(task === NO_TASK ? null : task, binding, durationS, agentId).then(sendableBy(binding)).then(
      (issued) => {
        landed()
        entry.inflight = null
        entry.failure = null
        this.opts.onExchange?.('granted')
        if (generation !== this.generation) throw new LatchkeyError('LK_REVOKED', 'revoked', 'revocation:agent')
        if (ticket.voided) throw ticket.voided
        if (task.ended) throw taskDropError('ended')
        const got = this.now()
        // Issuers clamp already; this bounds any issuer (a lifetime past a day, or NaN, is never trusted).
        const lifeMs = Math.min(issued.expiresInMs, MAX_EXPIRES_IN_S * 1000) || 0
        const credential: Credential = { value: issued.token, id: issued.jti, expiresAt: started + lifeMs, scopes: issued.scopes }
        if (started + lifeMs - this.opts.minRemainingMs <= got) {
          // Too short to use: a failed exchange like any other. A refresh keeps the token it was to
          // replace (it replaced it, and the task got 503s with most of a valid token's life left),
          // and a first exchange's failure is held, not asked again by every call.
          const error = new LatchkeyError('LK_CREDENTIAL_UNAVAILABLE', `the broker issued a token for ${binding.tokenAudience} that expires within ${this.opts.minRemainingMs} ms`)
          if (entry.credential && got < entry.usableUntil) {
            entry.refreshAt = got + 1000
            this.opts.onRefreshFailed?.(error.message)
          } else entry.failure = { error, until: got + FAILURE_HOLD_MS }
          throw error
        }
        entry.credential = credential
        entry.usableUntil = started + lifeMs - this.opts.minRemainingMs
        entry.refreshAt = started + lifeMs / 2
        this.issued.add(bindingKey(binding), credential)
        return credential
      },
      (err: unknown) => {
        landed()
        entry.inflight = null
        const outcome = err instanceof ExchangeFailed ? err.outcome : 'unreachable'
        const reason = err instanceof ExchangeFailed ? err.message : 'token exchange failed'
        this.opts.onExchange?.(outcome)
        if (err instanceof ActorMismatch) {
          const pair = `${err.configured}\n${err.attested ?? ''}`
          if (!this.mismatchesReported.has(pair) && this.mismatchesReported.size < 64) {
            this.mismatchesReported.add(pair)
            this.opts.onActorMismatch?.(err.configured, err.attested, reason)
          }
        }
        // The entry was dropped meanwhile: say why, rather than what the broker answered.
        if (generation !== this.generation) throw new LatchkeyError('LK_REVOKED', 'revoked', 'revocation:agent')
        if (ticket.voided) throw ticket.voided
        // Refused (a 4xx: a task longer than the agent may have, a user token that does not verify)
        // is not worth retrying, and says so; unreachable, or a 5xx, is.
        const refused = err instanceof ExchangeFailed && err.outcome === 'refused'
        const error = new LatchkeyError(refused ? 'LK_CREDENTIAL_REFUSED' : 'LK_CREDENTIAL_UNAVAILABLE', `no token for ${binding.tokenAudience}: ${reason}`)
        if (err instanceof ActorMismatch) {
          // The workload now attests as another agent: what is cached is not served either.
          entry.credential = null
          entry.usableUntil = 0
          entry.failure = { error, until: this.now() + FAILURE_HOLD_MS }
        } else if (entry.credential && this.now() < entry.usableUntil) {
          // A refresh failed but the current token is still good: retry in a second, keep serving.
          entry.refreshAt = this.now() + 1000
          this.opts.onRefreshFailed?.(reason)
        } else entry.failure = { error, until: this.now() + FAILURE_HOLD_MS }
        throw error
      },
    )
    entry.inflight = p
    return p
  }

  /**
   * Drops every token of a task (it ended, expired or was revoked), and voids its exchanges in
   * flight: a request waiting on one gets LK_TASK_ENDED or LK_REVOKED when it lands, never the token.
   */
  dropTask(taskId: string, why: TaskDrop = 'ended'): void {
    const tickets = this.inflightByTask.get(taskId)
    if (tickets) {
      const error = taskDropError(why)
      for (const t of tickets) t.voided ??= error
    }
    const keys = this.keysByTask.get(taskId)
    if (!keys) return
    for (const k of keys) this.cache.delete(k)
    this.keysByTask.delete(taskId)
  }

  /** Drops every token (the sidecar's agent was revoked). Returns how many were held. */
  dropAll(): number {
    const n = this.cache.size
    this.generation++
    this.cache.clear()
    this.keysByTask.clear()
    this.inflightByTask.clear()
    return n
  }

  /** Drops the token with this jti, wherever it is cached. Returns whether one was. */
  dropJti(jti: string): boolean {
    for (const [k, e] of this.cache.entries()) {
      if (e.credential?.id !== jti) continue
      this.cache.delete(k)
      this.keysByTask.get(k.split('\n')[0]!)?.delete(k)
      return true
    }
    return false
  }

  /** Tokens held now, across tasks (metrics, the drill). */
  get size(): number {
    return this.cache.size
  }

  /** What a task holds, for GET /v1/tasks/<handle>: audiences and expiries, never values. */
  describe(taskId: string): { audience: string; scopes: string[]; expires_at: string; jti: string }[] {
    const out = []
    for (const k of this.keysByTask.get(taskId) ?? []) {
      const e = this.cache.get(k)
      if (e?.credential && e.credential.expiresAt !== null) {
        out.push({ audience: k.split('\n')[1]!, scopes: e.credential.scopes, expires_at: isoTime(e.credential.expiresAt), jti: e.credential.id })
      }
    }
    return out
  }

  close(): Promise<void> {
    this.cache.clear()
    this.keysByTask.clear()
    this.issued.clear()
    return this.client.close()
  }
}

/** The broker's task-scoped tokens: the cache over a BrokerClient. */
export { CachedTokenSource as BrokerTokenSource }
