// The resolve stage: the sidecar resolves names itself, judges every address, and hands the
// forward stage the one address to dial. Never dials. Fail closed: if any address a name
// resolves to is denied, the call is denied (a mixed answer is what DNS rebinding looks like).
//
// Lookups are getaddrinfo on libuv's thread pool, which runs at most half its threads' worth of
// them at once (2 of the default 4) and cannot cancel one once started: a DNS server that never
// answers holds a thread for glibc's whole retry schedule (10 s and more). So a lookup waits here,
// not in libuv: at most `maxRunning` are handed to getaddrinfo, a caller waits `timeoutMs` at
// most (a name still queued then is dropped, never looked up), no more than `maxLookups` names
// are in flight at once, and a failed answer is kept `negativeCacheMs`.
import { lookup as dnsLookup } from 'node:dns/promises'
import { isIP } from 'node:net'
import { LRUCache } from 'lru-cache'
import type { Resolution, Resolver, ResolvedAddress, Target } from '../context.js'
import { LatchkeyError } from '../errors.js'
import type { NetworkPolicy } from './network-policy.js'

export type LookupFn = (host: string) => Promise<{ address: string; family: number }[]>

const defaultLookup: LookupFn = (host) => dnsLookup(host, { all: true, verbatim: true })

/**
 * How many getaddrinfo calls libuv runs at once: (threads + 1) / 2 of its pool, the threads read
 * from UV_THREADPOOL_SIZE as libuv reads it (default 4, 0 or junk is 1, at most 1024). It is read
 * once, when the pool starts, which under ESM is before any of our code runs: only the
 * environment the process was started with can raise it.
 */
export function lookupThreads(env: NodeJS.ProcessEnv = process.env): number {
  const raw = env.UV_THREADPOOL_SIZE
  let n = raw === undefined ? 4 : parseInt(raw, 10) || 1
  n = Math.min(Math.max(n, 1), 1024)
  return Math.floor((n + 1) / 2)
}

export interface DnsResolverOptions {
  /** How long a positive answer is reused; 0 disables the cache (failures are then not kept either). */
  cacheMs: number
  /** How long a call waits for an answer (sidecar.timeouts.dns_ms); past it 504 LK_DNS_TIMEOUT. */
  timeoutMs?: number
  /** How long a failed answer, a timeout included, is reused (network.dns_negative_cache_ms); never longer than cacheMs. */
  negativeCacheMs?: number
  /** Names being looked up at once, queued ones included (network.dns_max_lookups); past it 503 LK_DNS_BUSY. */
  maxLookups?: number
  /** Lookups handed to getaddrinfo at once; default lookupThreads(). */
  maxRunning?: number
  /** Replaceable only so tests can cause DNS faults they cannot otherwise cause. */
  lookup?: LookupFn
  now?: () => number
  maxEntries?: number
}

type Answer = { address: string; family: 4 | 6 }[]
type Failure = { code: 'LK_DNS_FAILED' | 'LK_DNS_TIMEOUT'; reason: string; expires: number }

/** A lookup under way in getaddrinfo; `since` on the monotonic clock. */
type Running = { done: Promise<Answer>; since: number }
/** A name waiting for a lookup thread. */
type Waiting = { start: () => void; drop: (err: LatchkeyError) => void }

export class DnsResolver implements Resolver {
  private readonly cache: LRUCache<string, { answer: Answer; expires: number }> | null
  private readonly failed: LRUCache<string, Failure> | null
  /** Callers' view of each name being looked up: one deadline, shared by every call that joins it. */
  private readonly inFlight = new Map<string, Promise<Answer>>()
  /** getaddrinfo calls not yet returned, timed-out ones included: each still holds a thread. */
  private readonly running = new Map<string, Running>()
  /** Names waiting for a thread, oldest first. */
  private readonly waiting = new Map<string, Waiting>()
  private readonly lookup: LookupFn
  private readonly now: () => number
  private readonly timeoutMs: number
  private readonly negativeMs: number
  private readonly maxLookups: number
  private readonly maxRunning: number

  constructor(
    private readonly network: NetworkPolicy,
    private readonly opts: DnsResolverOptions,
  ) {
    this.cache = opts.cacheMs > 0 ? new LRUCache({ max: opts.maxEntries ?? 10_000 }) : null
    this.negativeMs = Math.min(opts.negativeCacheMs ?? 5_000, opts.cacheMs)
    this.failed = this.negativeMs > 0 ? new LRUCache({ max: 1_000 }) : null
    this.lookup = opts.lookup ?? defaultLookup
    this.now = opts.now ?? Date.now
    this.timeoutMs = opts.timeoutMs ?? 5_000
    this.maxLookups = opts.maxLookups ?? 64
    this.maxRunning = Math.max(1, opts.maxRunning ?? lookupThreads())
  }

  resolve(target: Target): Resolution | Promise<Resolution> {
    if (target.hostIsIp) return this.judge(target, [{ address: target.host, family: isIP(target.host) === 6 ? 6 : 4 }])
    const answer = this.answer(target.host)
    return answer instanceof Promise ? answer.then((a) => this.judge(target, a)) : this.judge(target, answer)
  }

  private judge(target: Target, answer: Answer): Resolution {
    let first: ResolvedAddress | null = null
    for (const a of answer) {
      const verdict = this.network.check(a.address, target.port)
      if (!verdict.allowed) {
        const reason = target.hostIsIp ? verdict.reason : `${target.host} resolves to ${a.address}, ${verdict.what}`
        return { denied: { action: 'deny', rule: verdict.rule, reason, enforced: true } }
      }
      first ??= { address: a.address, family: a.family, cls: verdict.cls, answer }
    }
    return { address: first! }
  }

  /** Throws (synchronously) a failure still cached, or a refusal to start another lookup. */
  private answer(host: string): Promise<Answer> | Answer {
    // `localhost` and `*.localhost` are loopback by definition (RFC 6761), whatever a resolver says.
    if (host === 'localhost' || host.endsWith('.localhost')) return [{ address: '127.0.0.1', family: 4 }]
    const hit = this.cache?.get(host)
    if (hit && hit.expires > this.now()) return hit.answer
    const failure = this.failed?.get(host)
    if (failure && failure.expires > this.now()) throw new LatchkeyError(failure.code, failure.reason)
    let pending = this.inFlight.get(host)
    if (!pending) {
      pending = this.withDeadline(host, this.running.get(host)?.done ?? this.start(host)).finally(() => this.inFlight.delete(host))
      this.inFlight.set(host, pending)
    }
    return pending
  }

  /** A new lookup: run now if a thread is free, else queued; refused at once past the bounds. */
  private start(host: string): Promise<Answer> {
    const inFlight = this.running.size + this.waiting.size
    if (inFlight >= this.maxLookups) {
      throw new LatchkeyError('LK_DNS_BUSY', `${host}: not looked up: ${inFlight} DNS lookups are already in flight (network.dns_max_lookups); try again shortly`)
    }
    if (this.running.size >= this.maxRunning) {
      // Every thread held by a lookup already past its deadline: none will be free soon (getaddrinfo
      // goes on for its own retries), so a new name would only wait out its deadline in the queue.
      const stuckSince = performance.now() - this.timeoutMs
      let stuck = 0
      for (const r of this.running.values()) if (r.since <= stuckSince) stuck++
      if (stuck >= this.maxRunning) {
        throw new LatchkeyError('LK_DNS_BUSY', `${host}: not looked up: every DNS lookup thread (${this.maxRunning}) is held by a lookup unanswered for over ${this.timeoutMs} ms; try again shortly`)
      }
      return new Promise<Answer>((resolve, reject) => {
        this.waiting.set(host, {
          start: () => this.run(host).then(resolve, reject),
          drop: reject,
        })
      })
    }
    return this.run(host)
  }

  private run(host: string): Promise<Answer> {
    const done = this.lookupOnce(host).finally(() => {
      this.running.delete(host)
      const next = this.waiting.entries().next()
      if (!next.done) {
        this.waiting.delete(next.value[0])
        next.value[1].start()
      }
    })
    this.running.set(host, { done, since: performance.now() })
    return done
  }

  /** The caller's view of a lookup: it ends at the deadline, whatever getaddrinfo does; a name still queued then is never looked up. */
  private withDeadline(host: string, lookup: Promise<Answer>): Promise<Answer> {
    if (!(this.timeoutMs > 0)) return lookup
    return new Promise<Answer>((resolve, reject) => {
      const timer = setTimeout(() => {
        const queued = this.waiting.get(host)
        // A name that waited out its deadline for a thread was never asked: nothing is known of
        // it, so nothing is cached (else other names' dead lookups failed a working one for the
        // whole negative-cache window). One whose lookup ran this long is remembered.
        const reason = queued
          ? `${host}: not looked up within ${this.timeoutMs} ms (sidecar.timeouts.dns_ms): every lookup thread was busy with other names`
          : `${host}: DNS lookup timed out after ${this.timeoutMs} ms (sidecar.timeouts.dns_ms)`
        const err = new LatchkeyError('LK_DNS_TIMEOUT', reason)
        if (queued) {
          this.waiting.delete(host)
          queued.drop(err)
        } else this.remember(host, 'LK_DNS_TIMEOUT', reason)
        reject(err)
      }, this.timeoutMs)
      lookup.then(
        (a) => {
          clearTimeout(timer)
          resolve(a)
        },
        (e: unknown) => {
          clearTimeout(timer)
          reject(e as Error)
        },
      )
    })
  }

  private remember(host: string, code: Failure['code'], reason: string): void {
    this.failed?.set(host, { code, reason, expires: this.now() + this.negativeMs })
  }

  private async lookupOnce(host: string): Promise<Answer> {
    let raw: { address: string; family: number }[]
    try {
      raw = await this.lookup(host)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      const timedOut = code === 'ETIMEOUT' || code === 'ETIMEDOUT'
      const why = code === 'ENOTFOUND' || code === 'ENODATA' ? 'name not found' : timedOut ? 'DNS lookup timed out' : `DNS lookup failed (${code ?? 'error'})`
      const failure = new LatchkeyError(timedOut ? 'LK_DNS_TIMEOUT' : 'LK_DNS_FAILED', `${host}: ${why}`)
      this.remember(host, failure.code as Failure['code'], failure.reason)
      throw failure
    }
    if (raw.length === 0) {
      this.remember(host, 'LK_DNS_FAILED', `${host}: name has no addresses`)
      throw new LatchkeyError('LK_DNS_FAILED', `${host}: name has no addresses`)
    }
    const answer: Answer = raw.map((r) => ({ address: r.address, family: r.family === 6 ? 6 : 4 }))
    // An answer that comes after its callers gave up is still an answer: kept, and the timeout forgotten.
    this.cache?.set(host, { answer, expires: this.now() + this.opts.cacheMs })
    this.failed?.delete(host)
    return answer
  }
}
