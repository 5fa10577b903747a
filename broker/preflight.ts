// What a broker's start-up reads besides its config, checked the same way by `check-config` so a
// config it calls valid is one the broker starts with: the agent registry, the JWK set files, the
// TLS files and the control stream's policy file. Nothing is listened on or connected to.
import { accessSync, constants } from 'node:fs'
import type { BrokerConfig } from '../lib/config/schema.js'
import { PreflightFindings } from '../lib/config/preflight-findings.js'
import { checkServerTls } from '../lib/tls-files.js'
import { parseRegistry, readRegistryText, RegistryError } from './registry.js'
import { jwksFileProblem } from './jwt.js'

/**
 * `errors`: what a file holds is wrong (a registry that does not validate, a JWK set that is not
 * one, a certificate that is not PEM). `onThisMachine`: a file is missing or unreadable here,
 * which the machine the config is meant for may have (a mounted secret): said, not held against it.
 */
export async function brokerPreflight(b: BrokerConfig): Promise<PreflightFindings> {
  const found = new PreflightFindings()

  let registry: string | null = null
  try {
    registry = readRegistryText(b.registry_file)
  } catch (err) {
    if (err instanceof RegistryError) found.add('broker.registry_file', `${err.source}: ${err.problems.join('; ')}`, false)
    else found.cannotRead('broker.registry_file', b.registry_file, err)
  }
  if (registry !== null) {
    try {
      parseRegistry(registry, b.registry_file)
    } catch (err) {
      if (!(err instanceof RegistryError)) throw err
      found.add('broker.registry_file', `${err.source}: ${err.problems.join('; ')}`, false)
    }
  }

  const jwks: [string, string | undefined][] = [
    ['broker.attestors.local.keys_file', b.attestors.local?.keys_file],
    ['broker.attestors.kubernetes.jwks_file', b.attestors.kubernetes?.jwks_file],
    ['broker.attestors.spiffe.jwks_file', b.attestors.spiffe?.jwks_file],
    ['broker.users.jwks_file', b.users?.jwks_file],
  ]
  for (const [setting, file] of jwks) {
    if (file === undefined) continue
    const problem = jwksFileProblem(file, setting)
    if (problem) found.add(setting, problem.message.slice(setting.length + 1), problem.unreadable)
  }

  for (const [prefix, tls] of [
    ['broker.listen.tls', b.listen.tls],
    ['broker.control.tls', b.control?.tls],
  ] as const) {
    if (!tls) continue
    const r = checkServerTls(prefix, tls)
    if ('problems' in r) for (const p of r.problems) found.add(p.path, p.message, p.unreadable)
  }

  const policyFile = b.control?.policy_file
  if (b.control && policyFile) {
    let readable = true
    try {
      // Readable: what it holds (and how much) is the holder's to judge, reading no more than its limit.
      accessSync(policyFile, constants.R_OK)
    } catch (err) {
      readable = false
      found.cannotRead('broker.control.policy_file', policyFile, err)
    }
    if (readable) {
      const { PolicyBundleHolder } = await import('./control/policy.js')
      try {
        new PolicyBundleHolder(policyFile, b.control.max_bundle_bytes, () => {})
      } catch (err) {
        if ((err as { code?: unknown }).code !== 'LK_POLICY_BUNDLE_INVALID') throw err
        found.add('broker.control.policy_file', (err as Error).message, false)
      }
    }
  }
  return found
}
