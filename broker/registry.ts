// The agent registry: which agent types exist, how an attested workload maps to an instance ID,
// and what each type may ever be given. One YAML file (version: 1), validated whole; a reload
// that fails validation keeps the previous registry, and a reload that widens any type's scopes
// is reported so it can reach the audit trail.
import { watch, type FSWatcher } from 'node:fs'
import { byteSize, FileTooLarge, MAX_CONFIG_BYTES, readFailure, readFileBounded } from '../lib/bounded-read.js'
import { basename, dirname } from 'node:path'
import type { ErrorObject, ValidateFunction } from 'ajv'
import { validate as generatedValidate } from './registry-validate.generated.js'
import { describeYamlProblem, parseYamlDocument, yamlData } from '../lib/yaml-document.js'

export type UserRule = 'required' | 'optional' | 'none'

export interface AgentTypeSpec {
  /** `env` part of every instance ID of this type: agent:<type>:<env>:<instance>. */
  env: string
  /**
   * How attested evidence maps to this type: one attestor at most (instance names from two would
   * share one ID space); a type with no match can never be attested.
   */
  match: {
    kubernetes?: { namespace: string; service_account: string }
    /** SPIFFE ID path prefix (after the trust domain); the instance is the remainder's last segment. */
    spiffe?: { path_prefix: string }
    /** The local attestor: any key in the broker's local keys file may speak for this type. */
    local?: boolean
  }
  /** Downstream audience → the scopes this type may ever receive there. */
  audiences: Record<string, string[]>
  max_lifetime_s: number
  users: UserRule
  /** Agent types this type may task (hand its delegation to). Empty: none, no nested `act`. */
  may_task: string[]
}

export interface Registry {
  version: 1
  agents: Record<string, AgentTypeSpec>
}

export { MAX_LIFETIME_S, MAX_NAME } from './registry-schema.js'

// Compiled ahead of time (scripts/config-validator.mjs), as the sidecar's config: compiling it
// with Ajv at start took a tenth of a second of every broker and check-config start.
const validate = generatedValidate as unknown as ValidateFunction<Registry>

export class RegistryError extends Error {
  readonly code = 'LK_REGISTRY_INVALID'
  constructor(
    readonly source: string,
    readonly problems: string[],
  ) {
    super(`${source}: invalid agent registry:\n` + problems.map((p) => `  ${p}`).join('\n'))
  }
}

function describe(e: ErrorObject): string {
  const path = e.instancePath.split('/').slice(1).join('.') || '(root)'
  if (e.keyword === 'additionalProperties') return `${path}: unknown key "${String(e.params.additionalProperty)}"`
  return `${path}: ${e.message ?? 'invalid'}`
}

export function parseRegistry(text: string, source = '<registry>'): Registry {
  const doc = parseYamlDocument(text)
  if (doc.errors.length > 0) throw new RegistryError(source, doc.errors.map((e) => describeYamlProblem(e, text)).map(({ line, message }) => `${line === null ? '' : `line ${line}: `}${message}`))
  let raw: unknown
  try {
    raw = yamlData(doc) ?? {}
  } catch (err) {
    throw new RegistryError(source, [(err as Error).message])
  }
  if (!validate(raw)) throw new RegistryError(source, (validate.errors ?? []).map(describe))
  const registry = raw as unknown as Registry
  // Maps keyed by names that come from requests (an agent type, an audience) have no prototype:
  // `constructor` or `__proto__` must find nothing, not Object.prototype's members.
  registry.agents = withoutPrototype(registry.agents)
  for (const spec of Object.values(registry.agents)) spec.audiences = withoutPrototype(spec.audiences)
  const problems: string[] = []
  for (const [type, spec] of Object.entries(registry.agents)) {
    for (const t of spec.may_task) if (!registry.agents[t]) problems.push(`agents.${type}.may_task: unknown agent type "${t}"`)
    for (const aud of Object.keys(spec.audiences)) if (aud.length === 0) problems.push(`agents.${type}.audiences: empty audience`)
  }
  // Each attestor names instances from its own namespace (pod names, SPIFFE segments, the local
  // key's sub) with no attestor in the ID: one type matched by two would give a pod named w1 and
  // the SPIFFE ID …/w1 one instance ID (one revocation, one audit identity, one user's consent).
  for (const [type, spec] of Object.entries(registry.agents)) {
    const named = ATTESTORS.filter((k) => (k === 'local' ? spec.match.local === true : spec.match[k] !== undefined))
    if (named.length > 1) problems.push(`agents.${type}.match: ${sharedIdSpace(type, spec, named)}`)
  }
  // Attestors take the first type whose match fits: two types matching one workload would make its
  // type (what it may get) depend on the order of the file's keys, and a reload could switch it.
  const accounts = new Map<string, string>()
  const prefixes: [string, string][] = []
  for (const [type, spec] of Object.entries(registry.agents)) {
    const k = spec.match.kubernetes
    if (k) {
      const key = `${k.namespace}/${k.service_account}`
      const other = accounts.get(key)
      if (other) problems.push(`agents.${type}.match.kubernetes: service account ${key} is also matched by agent type "${other}"`)
      else accounts.set(key, type)
    }
    const p = spec.match.spiffe?.path_prefix
    if (p) {
      const prefix = p.endsWith('/') ? p : p + '/'
      const other = prefixes.find(([q]) => q.startsWith(prefix) || prefix.startsWith(q))
      if (other) problems.push(`agents.${type}.match.spiffe.path_prefix: ${p} overlaps the path_prefix of agent type "${other[1]}"`)
      else prefixes.push([prefix, type])
    }
  }
  if (problems.length > 0) throw new RegistryError(source, problems)
  return registry
}

const ATTESTORS = ['kubernetes', 'local', 'spiffe'] as const

/** Why a type may not name several attestors, with the collision spelled out for this type. */
function sharedIdSpace(type: string, spec: AgentTypeSpec, named: readonly (typeof ATTESTORS)[number][]): string {
  const id = `agent:${type}:${spec.env}:w1`
  const p = spec.match.spiffe?.path_prefix ?? ''
  const prefix = p.endsWith('/') ? p.slice(0, -1) : p
  const holders = named.map((k) => (k === 'kubernetes' ? 'a pod named w1' : k === 'spiffe' ? `the SPIFFE ID …${prefix}/w1` : `a local attestation of ${id}`))
  const list = (xs: string[]) => `${xs.slice(0, -1).join(', ')} and ${xs.at(-1)!}`
  return (
    `names ${list([...named])}: instance names from ${named.length === 2 ? 'two' : 'three'} attestors share one ID space ` +
    `(${list(holders)} would be one agent, ${id}): give each attestor its own agent type`
  )
}

function withoutPrototype<T>(record: Record<string, T>): Record<string, T> {
  return Object.assign(Object.create(null) as Record<string, T>, record)
}

export function loadRegistryFile(file: string): Registry {
  let text: string
  try {
    text = readRegistryText(file)
  } catch (err) {
    if (err instanceof RegistryError) throw err
    throw new RegistryError(file, [`cannot read file: ${readFailure(err)}`])
  }
  return parseRegistry(text, file)
}

/** The registry file's text, at most MAX_CONFIG_BYTES (as check-config reads it); over is a RegistryError, unreadable the fs error. */
export function readRegistryText(file: string): string {
  try {
    return readFileBounded(file, MAX_CONFIG_BYTES).toString('utf8')
  } catch (err) {
    if (err instanceof FileTooLarge) throw new RegistryError(file, [`larger than ${byteSize(MAX_CONFIG_BYTES)}, the most a config file may be`])
    throw err
  }
}

export interface ScopeWidening {
  agent_type: string
  audience: string
  added: string[]
}

/** What `next` grants that `prev` did not: new types, new audiences, new scopes, new may_task. */
export function widenings(prev: Registry, next: Registry): ScopeWidening[] {
  const out: ScopeWidening[] = []
  for (const [type, spec] of Object.entries(next.agents)) {
    const before = prev.agents[type]
    for (const [aud, scopes] of Object.entries(spec.audiences)) {
      const had = new Set(before?.audiences[aud] ?? [])
      const added = scopes.filter((s) => !had.has(s))
      if (added.length > 0 || (before && !(aud in before.audiences))) out.push({ agent_type: type, audience: aud, added })
    }
    const hadTask = new Set(before?.may_task ?? [])
    const addedTask = spec.may_task.filter((t) => !hadTask.has(t))
    if (addedTask.length > 0) out.push({ agent_type: type, audience: '(may_task)', added: addedTask })
    if (before && spec.max_lifetime_s > before.max_lifetime_s) {
      out.push({ agent_type: type, audience: '(max_lifetime_s)', added: [`${before.max_lifetime_s}→${spec.max_lifetime_s}`] })
    }
  }
  return out
}

/**
 * Holds the current registry and reloads it when the file changes (atomic rename and ConfigMap
 * symlink swaps included: the directory is watched, not the inode).
 */
export class RegistryHolder {
  current: Registry
  private watcher: FSWatcher | undefined
  private timer: NodeJS.Timeout | undefined

  constructor(
    readonly file: string,
    private readonly onReload: (result: { ok: true; widened: ScopeWidening[] } | { ok: false; error: RegistryError }) => void,
  ) {
    this.current = loadRegistryFile(file)
  }

  reload(): void {
    let next: Registry
    try {
      next = loadRegistryFile(this.file)
    } catch (err) {
      this.onReload({ ok: false, error: err as RegistryError })
      return
    }
    const widened = widenings(this.current, next)
    this.current = next
    this.onReload({ ok: true, widened })
  }

  watch(): void {
    const base = basename(this.file)
    this.watcher = watch(dirname(this.file), { persistent: false }, (_event, changed) => {
      if (changed !== null && changed !== base && !String(changed).startsWith('..')) return
      // Editors and kubelet write in several steps: settle before reading.
      clearTimeout(this.timer)
      this.timer = setTimeout(() => this.reload(), 50)
    })
  }

  close(): void {
    clearTimeout(this.timer)
    this.watcher?.close()
  }
}
