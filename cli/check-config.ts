// `latchkey check-config <file>`: what it prints and the code it exits with, as a function of the
// file and the environment. The command (cli/latchkey.ts) prints the result and exits with its
// code; the tests judge most files by calling this in-process (a CLI start is ~0.25 s of CPU).
import { existsSync } from 'node:fs'
import { dirname, isAbsolute, resolve } from 'node:path'
import type { Config } from '../lib/config/schema.js'
import { describeFailure } from './describe-failure.js'

export interface CheckConfigResult {
  /** The exit code: 0 when valid (warnings and notes may be on stderr), 1 with each problem named. */
  code: number
  /** What goes to standard output: the one "valid" line. */
  stdout: string
  /** What goes to standard error: notes, warnings, or the problems. */
  stderr: string
}

/**
 * Validates a config file (sidecar, broker or collector) or the broker's agent registry, with the
 * environment's overrides (LATCHKEY__…) and secrets (LATCHKEY_SECRET_…) taken from `env`.
 */
export async function checkConfig(file: string, env: NodeJS.ProcessEnv): Promise<CheckConfigResult> {
  const out: string[] = []
  const err: string[] = []
  const result = (code: number): CheckConfigResult => ({ code, stdout: lines(out), stderr: lines(err) })
  try {
    const { readConfigBytes, configText, parseConfig, envOverrides, ConfigError } = await import('../lib/config/load.js')
    const bytes = readConfigBytes(file)
    const kind = (await import('../lib/config/kind.js')).configKind(bytes.toString('utf8'))
    if (kind === 'registry') {
      // Decoded as the broker decodes it.
      const { parseRegistry } = await import('../broker/registry.js')
      out.push(`${file}: valid agent registry (version 1, ${Object.keys(parseRegistry(bytes.toString('utf8'), file).agents).length} agent types)`)
      return result(0)
    }
    const text = configText(bytes, file)
    if (kind === 'collector') {
      const { parseCollectorConfig, collectorPreflight } = await import('../collector/config.js')
      const c = parseCollectorConfig(text, file, env)
      const { errors, onThisMachine } = collectorPreflight(c)
      if (errors.length > 0) throw new ConfigError(file, errors)
      for (const p of onThisMachine) err.push(`warning: ${p.path}: ${p.message} (the collector would not start on this machine)`)
      const overridden = envOverrides(c)
      if (overridden.length > 0) err.push(`note: set by the environment, not the file: ${overridden.join(', ')}`)
      out.push(`${file}: valid collector config (version 1, ${c.collector.sidecars.length} sidecars, ${c.collector.store.kind} store)`)
      return result(0)
    }
    const config = parseConfig(text, file, env)
    // What start-up reads besides the config: a policy file that does not compile makes the
    // config invalid; a file or directory missing here is said (the process would not start here).
    const { errors, onThisMachine, rules } = await (await import('../proxy/preflight.js')).preflight(config, env)
    const broker = config.broker ? await (await import('../broker/preflight.js')).brokerPreflight(registryAsFound(config.broker, file, err)) : { errors: [], onThisMachine: [] }
    if (errors.length + broker.errors.length > 0) throw new ConfigError(file, [...errors, ...broker.errors])
    for (const p of onThisMachine) err.push(`warning: ${p.path}: ${p.message} (the sidecar would not start on this machine)`)
    for (const p of broker.onThisMachine) err.push(`warning: ${p.path}: ${p.message} (the broker would not start on this machine)`)
    const overridden = envOverrides(config)
    if (overridden.length > 0) err.push(`note: set by the environment, not the file: ${overridden.join(', ')}`)
    // A broker's file alone is said as one: "0 rules, 0 credentials, 0 routes" read as a sidecar's with nothing in it.
    if (kind === 'broker' && config.broker) {
      out.push(`${file}: valid broker config (version ${config.version}, issuer ${config.broker.issuer}, ${config.broker.control ? 'control stream on' : 'no control stream'})`)
      return result(0)
    }
    out.push(`${file}: valid (version ${config.version}, ${rules ?? config.policy.rules.length} rules${rules === undefined ? '' : ' (sidecar.policy_file)'}, ${config.credentials.length} credentials, ${Object.keys(config.routes).length} routes)`)
    return result(0)
  } catch (e) {
    // ConfigError (LK_CONFIG_INVALID) and the registry's errors carry messages meant for people.
    err.push(describeFailure(e))
    return result(1)
  }
}

/** Lines as console.log/console.error would have written them. */
function lines(of: string[]): string {
  return of.map((l) => `${l}\n`).join('')
}

/**
 * The broker section with its registry file where a process would find it. `latchkey broker`
 * reads a relative one from the working directory, and `latchkey up` from beside its config: one
 * that is only beside the config is checked there, and said so (in `notes`), not reported missing.
 */
function registryAsFound(broker: NonNullable<Config['broker']>, configFile: string, notes: string[]): NonNullable<Config['broker']> {
  const file = broker.registry_file
  if (isAbsolute(file) || existsSync(file)) return broker
  const beside = resolve(dirname(configFile), file)
  if (!existsSync(beside)) return broker
  notes.push(`note: broker.registry_file ${file}: not in this directory, where \`latchkey broker\` would read it; checked beside the config (${beside}), where \`latchkey up\` reads it`)
  return { ...broker, registry_file: beside }
}
