// The resolve stage: the sidecar resolves names itself, judges every address, and hands the
// forward stage the one address to dial. Never dials. Fail closed: if any address a name
// resolves to is denied, the call is denied (a mixed answer is what DNS rebinding looks like).
import { lookup as dnsLookup } from 'node:dns/promises'
import { isIP } from 'node:net'
import { LRUCache } from 'lru-cache'
import type { Resolution, Resolver, ResolvedAddress, Target } from '../context.js'
import { LatchkeyError } from '../errors.js'
import type { NetworkPolicy } from './network-policy.js'

export type LookupFn = (host: string) => Promise<{ address: string; family: number }[]>

const defaultLookup: LookupFn = (host) => dnsLookup(host, { all: true, verbatim: true })

export interface DnsResolverOptions {
  /** How long a positive answer is reused; 0 disables the cache. */
  cacheMs: number
  /** Replaceable only so tests can cause DNS faults they cannot otherwise cause. */
  lookup?: LookupFn
  now?: () => number
  maxEntries?: number
}

type Answer = { address: string; family: 4 | 6 }[]

export class DnsResolver implements Resolver {
  private readonly cache: LRUCache<string, { answer: Answer; expires: number }> | null
  private readonly inFlight = new Map<string, Promise<Answer>>()
  private readonly lookup: LookupFn
  private readonly now: () => number

  constructor(
    private readonly network: NetworkPolicy,
    private readonly opts: DnsResolverOptions,
  ) {
    this.cache = opts.cacheMs > 0 ? new LRUCache({ max: opts.maxEntries ?? 10_000 }) : null
    this.lookup = opts.lookup ?? defaultLookup
    this.now = opts.now ?? Date.now
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
      first ??= { address: a.address, family: a.family, cls: verdict.cls }
    }
    return { address: first! }
  }

  private answer(host: string): Promise<Answer> | Answer {
    // `localhost` and `*.localhost` are loopback by definition (RFC 6761), whatever a resolver says.
    if (host === 'localhost' || host.endsWith('.localhost')) return [{ address: '127.0.0.1', family: 4 }]
    const hit = this.cache?.get(host)
    if (hit && hit.expires > this.now()) return hit.answer
    let pending = this.inFlight.get(host)
    if (!pending) {
      pending = this.lookupOnce(host).finally(() => this.inFlight.delete(host))
      this.inFlight.set(host, pending)
    }
    return pending
  }

  private async lookupOnce(host: string): Promise<Answer> {
    let raw: { address: string; family: number }[]
    try {
      raw = await this.lookup(host)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      const why = code === 'ENOTFOUND' || code === 'ENODATA' ? 'name not found' : code === 'ETIMEOUT' || code === 'ETIMEDOUT' ? 'DNS lookup timed out' : `DNS lookup failed (${code ?? 'error'})`
      throw new LatchkeyError('LK_DNS_FAILED', `${host}: ${why}`)
    }
    if (raw.length === 0) throw new LatchkeyError('LK_DNS_FAILED', `${host}: name has no addresses`)
    const answer: Answer = raw.map((r) => ({ address: r.address, family: r.family === 6 ? 6 : 4 }))
    this.cache?.set(host, { answer, expires: this.now() + this.opts.cacheMs })
    return answer
  }
}
