// The policy in force, swapped whole between requests. A request reads `stages.decider` once, at
// its decide stage, so it is judged by exactly one policy; a swap is one assignment. Bundles from
// the control stream, a policy file or SIGHUP all come through `offer`: validated and compiled
// first, and on any problem rejected whole, the policy in force kept and the reason recorded.
import { Counter, type Registry } from 'prom-client'
import type { Logger } from '../../lib/log.js'
import type { Stages } from '../pipeline.js'
import type { Decider } from '../context.js'
import type { Config } from '../../lib/config/schema.js'
import { BundleError, compileBundle, policyWidenings } from './bundle.js'

export class PolicySwitch {
  /** The last bundle refused, and why; cleared when a bundle is accepted. */
  rejected: { source: string; version: string | null; reason: string } | null = null
  private readonly bundles: Counter
  /** Runs after each swap, with the policy now in force (the sidecar cuts the relays it refuses). */
  onSwap: ((decider: Decider) => void) | null = null

  constructor(
    private readonly stages: Stages,
    public version: string,
    private readonly maxBytes: number,
    private readonly log: Logger,
    metrics: Registry,
    /** The policy in force, as written: a swap is compared with it, so one that lets more through says so. */
    private current: Config['policy'],
  ) {
    this.bundles = new Counter({ name: 'latchkey_policy_bundles_total', help: 'Policy bundles offered, by source and outcome (applied, rejected)', labelNames: ['source', 'outcome'], registers: [metrics] })
  }

  /** Validates and swaps; returns the reason when rejected. */
  offer(text: string, source: 'control' | 'file', label: string, version?: string): { ok: true; version: string } | { ok: false; reason: string } {
    try {
      const b = compileBundle(text, label, this.maxBytes, version)
      if (b.version === this.version) return { ok: true, version: b.version }
      this.stages.decider = b.compiled
      const previous = this.version
      this.version = b.version
      this.rejected = null
      this.bundles.inc({ source, outcome: 'applied' })
      // A swap that lets more through (default→allow, enforce→report, an allow added, a deny gone) is a warning, naming each;
      // not the broker's first bundle replacing the config's start-up policy, which every start does.
      const widened = previous === 'config' && source === 'control' ? [] : policyWidenings(this.current, b.policy)
      this.current = b.policy
      const fields = { source, version: b.version, previous, mode: b.policy.mode, default: b.policy.default, rules: b.policy.rules.length }
      if (widened.length > 0) this.log.warn({ ...fields, widened }, 'policy swapped: it lets more through')
      else this.log.info(fields, 'policy swapped')
      this.onSwap?.(b.compiled)
      return { ok: true, version: b.version }
    } catch (err) {
      const reason = err instanceof BundleError ? err.message : `${label}: ${(err as Error).message}`
      this.rejected = { source, version: version?.slice(0, 80) ?? null, reason }
      this.bundles.inc({ source, outcome: 'rejected' })
      this.log.error({ source, version: version?.slice(0, 80) ?? null, reason }, 'policy bundle rejected; the policy in force is kept')
      return { ok: false, reason }
    }
  }
}
