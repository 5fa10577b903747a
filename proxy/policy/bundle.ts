// Policy bundles: a sidecar's `policy` section as a document of its own, pushed by the broker over
// the control stream or read from a local policy file. One rule for both: validate the whole
// bundle (the config schema and its semantic checks, then compilation) and only then swap it in;
// a bundle with any problem is rejected whole and the policy in force is kept.
import { createHash } from 'node:crypto'
import { parseYamlDocument, yamlData, yamlErrorMessage } from '../../lib/yaml-document.js'
import type { Config, RuleConfig } from '../../lib/config/schema.js'
import { ConfigError, validateConfig } from '../../lib/config/load.js'
import { Policy } from './policy.js'

export const DEFAULT_MAX_BUNDLE_BYTES = 262_144

export class BundleError extends Error {
  readonly code = 'LK_POLICY_BUNDLE_INVALID'
}

export interface CompiledBundle {
  version: string
  policy: Config['policy']
  compiled: Policy
}

/** A bundle's version when the source gives none: the SHA-256 of its text, shortened. */
export function bundleVersion(text: string): string {
  return 'sha256:' + createHash('sha256').update(text).digest('hex').slice(0, 16)
}

/**
 * Parses (YAML, of which JSON is a subset), validates and compiles a policy bundle. Throws a
 * BundleError naming every problem; never returns a partly valid policy.
 */
export function compileBundle(text: string, source: string, maxBytes = DEFAULT_MAX_BUNDLE_BYTES, version?: string): CompiledBundle {
  const size = Buffer.byteLength(text)
  if (size > maxBytes) throw new BundleError(`${source}: policy bundle is ${size} bytes, over the limit of ${maxBytes}`)
  // Said where (`… at line 3, column 1`), and in words that quote nothing of the bundle.
  const doc = parseYamlDocument(text)
  const e = doc.errors[0]
  if (e) throw new BundleError(`${source}: policy bundle is not valid YAML/JSON: ${yamlErrorMessage(e)}${e.linePos ? ` at line ${e.linePos[0].line}, column ${e.linePos[0].col}` : ''}`)
  let raw: unknown
  try {
    raw = yamlData(doc)
  } catch (err) {
    throw new BundleError(`${source}: policy bundle is not valid YAML/JSON: ${(err as Error).message}`)
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new BundleError(`${source}: policy bundle must be a mapping {mode, default, rules}`)
  let config: Config
  try {
    config = validateConfig({ version: 1, policy: raw }, source)
  } catch (err) {
    if (err instanceof ConfigError) throw new BundleError(`${source}: invalid policy bundle: ` + err.problems.map((p) => `${p.path}: ${p.message}`).join('; '))
    throw err
  }
  let compiled: Policy
  try {
    compiled = new Policy(config.policy)
  } catch (err) {
    throw new BundleError(`${source}: policy bundle does not compile: ${(err as Error).message}`)
  }
  return { version: version ?? bundleVersion(text), policy: config.policy, compiled }
}

function ruleKey(r: RuleConfig): string {
  return JSON.stringify([r.hosts, r.cidrs, r.ports, r.methods, r.paths, r.schemes, r.mode])
}

/**
 * What `next` lets through that `prev` did not, conservatively: new or changed allow rules, deny
 * rules removed or weakened, the default turned to allow, enforcement turned to report.
 */
export function policyWidenings(prev: Config['policy'], next: Config['policy']): string[] {
  const out: string[] = []
  if (prev.default === 'deny' && next.default === 'allow') out.push('default: deny→allow')
  if (prev.mode === 'enforce' && next.mode === 'report') out.push('mode: enforce→report')
  const before = new Map(prev.rules.map((r) => [r.id, r]))
  const after = new Map(next.rules.map((r) => [r.id, r]))
  for (const r of next.rules) {
    const old = before.get(r.id)
    if (r.action === 'allow' && (!old || old.action !== 'allow' || ruleKey(old) !== ruleKey(r))) out.push(`allow rule ${r.id}`)
    if (r.action === 'deny' && old?.action === 'deny' && ruleKey(old) !== ruleKey(r)) out.push(`deny rule ${r.id} changed`)
  }
  for (const r of prev.rules) if (r.action === 'deny' && after.get(r.id)?.action !== 'deny') out.push(`deny rule ${r.id} removed`)
  return out
}
