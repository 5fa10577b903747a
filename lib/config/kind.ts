// `latchkey check-config` takes any of the project's files: which one a file is decides which
// schema judges it.
import { parse as parseYaml } from 'yaml'

/**
 * What a file is, by its top-level keys: a collector's config (`collector`, no `sidecar`) and the
 * broker's agent registry (`agents`, no `sidecar`) are validated by their own schemas. From the
 * text already read: the file is read once (a pipe, /dev/stdin or <(…) can be read only once).
 */
export function configKind(text: string): 'collector' | 'registry' | 'config' {
  try {
    // logLevel error: parse() prints each warning (an unknown tag) with the line it is about, a password in it maybe.
    const doc = parseYaml(text, { logLevel: 'error' }) as unknown
    if (typeof doc !== 'object' || doc === null || 'sidecar' in doc) return 'config'
    return 'collector' in doc ? 'collector' : 'agents' in doc ? 'registry' : 'config'
  } catch {
    return 'config' // not YAML: the sidecar loader says why
  }
}

/** The top-level keys that configure a sidecar: a file with none of them (a broker's alone) is not judged as one. */
const SIDECAR_KEYS = ['sidecar', 'policy', 'network', 'routes', 'credentials', 'secrets', 'audit', 'tasks']

/** Whether the file configures a sidecar, by its top-level keys (a broker-only file does not). */
export function configuresSidecar(text: string): boolean {
  try {
    const doc = parseYaml(text, { logLevel: 'error' }) as unknown
    return typeof doc !== 'object' || doc === null || SIDECAR_KEYS.some((k) => k in doc)
  } catch {
    return true
  }
}
