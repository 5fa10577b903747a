// `latchkey check-config` takes any of the project's files: which one a file is decides which
// schema judges it.
import { parse as parseYaml } from 'yaml'

/** The top-level keys that configure a sidecar: a file with `broker` and none of them is a broker's alone. */
const SIDECAR_KEYS = ['sidecar', 'policy', 'network', 'routes', 'credentials', 'secrets', 'audit', 'tasks']

/**
 * What a file is, by its top-level keys: a collector's config (`collector`, no `sidecar`) and the
 * broker's agent registry (`agents`, no `sidecar`) are validated by their own schemas; a broker's
 * config alone (`broker`, nothing of a sidecar) by the config's, and said as a broker's. From the
 * text already read: the file is read once (a pipe, /dev/stdin or <(…) can be read only once).
 */
export function configKind(text: string): 'collector' | 'registry' | 'broker' | 'config' {
  try {
    // logLevel error: parse() prints each warning (an unknown tag) with the line it is about, a password in it maybe.
    const doc = parseYaml(text, { logLevel: 'error' }) as unknown
    if (typeof doc !== 'object' || doc === null || 'sidecar' in doc) return 'config'
    if ('collector' in doc) return 'collector'
    if ('agents' in doc) return 'registry'
    return 'broker' in doc && !SIDECAR_KEYS.some((k) => k in doc) ? 'broker' : 'config'
  } catch {
    return 'config' // not YAML: the sidecar loader says why
  }
}
