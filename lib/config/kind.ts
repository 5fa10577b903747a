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
