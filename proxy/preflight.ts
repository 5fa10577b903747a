// What a sidecar's start-up reads besides its config: checked the same way by `check-config`,
// so a config it calls valid is one the sidecar starts with.
import { accessSync, constants, statSync } from 'node:fs'
import { dirname } from 'node:path'
import type { Config } from '../lib/config/schema.js'
import type { ConfigProblem } from '../lib/config/load.js'
import { PreflightFindings } from '../lib/config/preflight-findings.js'
import { compileBundle, DEFAULT_MAX_BUNDLE_BYTES, type CompiledBundle } from './policy/bundle.js'
import { readPolicyText } from './policy/file.js'
import { CaFileProblem, readCaFile, trustWith } from './tls-trust.js'
import { StaticSecretSource } from './credentials/static-source.js'
import { HEADER_SENDABLE } from './credentials/bindings.js'

export class StartupError extends Error {
  readonly code = 'LK_STARTUP'
}

/**
 * sidecar.policy_file, read and compiled: the bundle (undefined when none is configured), or why
 * not, `unreadable` when the file is missing or unreadable here rather than wrong.
 */
function readPolicyFile(config: Config): { bundle: CompiledBundle | undefined } | { unreadable: boolean; message: string } {
  const sc = config.sidecar
  if (!sc.policy_file) return { bundle: undefined }
  const maxBytes = sc.control?.max_bundle_bytes ?? DEFAULT_MAX_BUNDLE_BYTES
  const read = readPolicyText(sc.policy_file, maxBytes)
  if (!read.ok) return { unreadable: read.unreadable, message: read.reason }
  try {
    return { bundle: compileBundle(read.text, sc.policy_file, maxBytes) }
  } catch (err) {
    return { unreadable: false, message: (err as Error).message }
  }
}

/** sidecar.policy_file, read and compiled; undefined when none is configured. Throws StartupError naming the file and the problem. */
export function loadPolicyFile(config: Config): CompiledBundle | undefined {
  const read = readPolicyFile(config)
  if ('bundle' in read) return read.bundle
  throw new StartupError(read.unreadable ? `sidecar.policy_file ${read.message}` : read.message)
}

/** The CA files the sidecar reads, by setting. */
function caFiles(config: Config): [setting: string, path: string][] {
  const files: [string, string][] = []
  if (config.sidecar.upstream_ca_file) files.push(['sidecar.upstream_ca_file', config.sidecar.upstream_ca_file])
  const tls = config.audit.collector?.tls
  if (tls) files.push(['audit.collector.tls.ca_file', tls.ca_file])
  const control = config.sidecar.control?.tls
  if (control) files.push(['sidecar.control.tls.ca_file', control.ca_file])
  return files
}

/**
 * sidecar.upstream_ca_file as the trust list for the sidecar's own TLS clients (upstreams, the
 * broker, token_url): Node's default CAs plus the file's. Undefined when none is configured (Node's
 * defaults). Throws StartupError naming the setting, the file and the problem.
 */
export function loadUpstreamTrust(config: Config): string[] | undefined {
  const file = config.sidecar.upstream_ca_file
  if (!file) return undefined
  try {
    return trustWith(file)
  } catch (err) {
    throw new StartupError(`sidecar.upstream_ca_file ${(err as Error).message}`)
  }
}

/** A CA file's certificates (checked as readCaFile does), or StartupError naming `setting` and the file. */
export function loadCaFile(setting: string, path: string): string[] {
  try {
    return readCaFile(path)
  } catch (err) {
    throw new StartupError(`${setting} ${(err as Error).message}`)
  }
}

/** Why audit.jsonl.path cannot be appended to (a directory, no such directory, not writable), or null: `<path>: <problem>`. */
export function auditFileProblem(path: string): string | null {
  let isFile: boolean | null = null
  try {
    const st = statSync(path)
    if (st.isDirectory()) return `${path}: is a directory`
    // Opening a FIFO for writing waits for a reader: the sidecar would hang at start.
    if (st.isFIFO() || st.isSocket()) return `${path}: is not a file (a FIFO or socket)`
    isFile = true
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return `${path}: cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`
  }
  try {
    accessSync(isFile ? path : dirname(path), constants.W_OK)
    return null
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error'
    return isFile ? `${path}: cannot be written (${code})` : `${path}: its directory ${dirname(path)} ${code === 'ENOENT' ? 'does not exist' : `cannot be written (${code})`}`
  }
}

/**
 * What start-up would meet in what the config points at, as check-config reports it. `errors`:
 * the config's own content is wrong (a policy file that does not compile). `onThisMachine`: a
 * file or directory it names is missing or unwritable here; the machine it is meant for may
 * have it (a container's volume), so it is said, not held against the config. Secrets are looked
 * up in `env` (LATCHKEY_SECRET_…), as the sidecar looks them up in its environment.
 */
export async function preflight(config: Config, env: NodeJS.ProcessEnv = process.env): Promise<PreflightFindings> {
  const found = new PreflightFindings()
  const policy = readPolicyFile(config)
  if (!('bundle' in policy)) found.add('sidecar.policy_file', policy.message, policy.unreadable)
  // The rules the sidecar would start with: the policy file's, when one is configured (it replaces the config's).
  else if (policy.bundle) found.rules = policy.bundle.policy.rules.length
  for (const [setting, path] of caFiles(config)) {
    try {
      readCaFile(path)
    } catch (err) {
      if (!(err instanceof CaFileProblem)) throw err
      found.add(setting, err.message, err.unreadable)
    }
  }
  const collectorTls = config.audit.collector?.tls
  const controlTls = config.sidecar.control?.tls
  const keyFiles: [string, string | undefined][] = [
    ['audit.collector.tls.cert_file', collectorTls?.cert_file],
    ['audit.collector.tls.key_file', collectorTls?.key_file],
    ['sidecar.control.tls.cert_file', controlTls?.cert_file],
    ['sidecar.control.tls.key_file', controlTls?.key_file],
  ]
  for (const [setting, path] of keyFiles) {
    if (path === undefined) continue
    try {
      accessSync(path, constants.R_OK)
    } catch (err) {
      found.cannotRead(setting, path, err)
    }
  }
  if (!config.audit.collector) {
    const audit = auditFileProblem(config.audit.jsonl.path)
    if (audit) found.add('audit.jsonl.path', audit, true)
  } else {
    const spool = spoolDirProblem(config.audit.collector.spool_dir)
    if (spool) found.add('audit.collector.spool_dir', spool, true)
  }
  // secrets.file, read and parsed as the sidecar reads it (a duplicate key, a second document, a
  // value that is not a string): its content is never repeated.
  const secretsFile = config.secrets.file
  let readable = true
  if (secretsFile) {
    try {
      accessSync(secretsFile, constants.R_OK)
    } catch (err) {
      readable = false
      found.cannotRead('secrets.file', secretsFile, err)
    }
  }
  if (readable) {
    const named = secretNames(config)
    let secrets: StaticSecretSource | null = null
    try {
      secrets = new StaticSecretSource(config.secrets, named.map((n) => n.name), env)
    } catch (err) {
      found.add('secrets.file', (err as Error).message.replace(/^secrets\.file /, ''), false)
    }
    if (secrets) {
      found.errors.push(...unsendableSecrets(config, secrets))
      // A secret in neither place here: the sidecar would not start (said as start-up says it).
      for (const { path, name } of named) if (!secrets.has(name)) found.onThisMachine.push({ path, message: secrets.missing(name) })
    }
  }
  // The revocations a sidecar with a control stream last knew: a file that is not one stops its start.
  const control = config.sidecar.control
  if (control) {
    // Loaded here only: a sidecar without a control stream never carries it.
    const { defaultStateFile, readStateFile, RevocationFileError } = await import('./control/persist.js')
    const stateFile = control.state_file ?? defaultStateFile(config)
    try {
      readStateFile(stateFile, Date.now())
    } catch (err) {
      if (!(err instanceof RevocationFileError)) throw err
      found.add('sidecar.control.state_file', err.message.replace(/^sidecar\.control\.state_file /, ''), err.unreadable)
    }
  }
  return found
}

/** Every secret name the sidecar looks up in secrets.file (or the environment), with the setting that names it. */
function secretNames(config: Config): { path: string; name: string }[] {
  const names: { path: string; name: string }[] = []
  config.credentials.forEach((c, i) => {
    if (c.source === 'static' && c.secret) names.push({ path: `credentials[${i}].secret`, name: c.secret })
    if (c.source === 'client_credentials' && c.oauth) names.push({ path: `credentials[${i}].oauth.client_secret`, name: c.oauth.client_secret })
  })
  if (config.audit.collector?.token_secret) names.push({ path: 'audit.collector.token_secret', name: config.audit.collector.token_secret })
  if (config.sidecar.control) names.push({ path: 'sidecar.control.token_secret', name: config.sidecar.control.token_secret })
  return names
}

/** Why audit.collector.spool_dir cannot hold the spool here (a file, a directory that cannot be written), or null. */
export function spoolDirProblem(dir: string): string | null {
  // The spool creates the directory (and its parents): the nearest one that exists must take it.
  let at = dir
  for (;;) {
    let st
    try {
      st = statSync(at)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if ((code === 'ENOENT' || code === 'ENOTDIR') && dirname(at) !== at) {
        at = dirname(at)
        continue
      }
      return `${dir}: cannot be read (${code ?? 'error'})`
    }
    if (!st.isDirectory()) return at === dir ? `${dir}: is not a directory` : `${dir}: ${at} is not a directory`
    try {
      accessSync(at, constants.W_OK | constants.X_OK)
      return null
    } catch (err) {
      return `${dir}: ${at === dir ? 'cannot be written' : `its directory ${at} cannot be written`} (${(err as NodeJS.ErrnoException).code ?? 'error'})`
    }
  }
}


/**
 * Static secrets a header cannot carry (undici refuses them: every call would fail instead of the
 * start). A header carries bytes, not text; Basic base64-encodes and query percent-encodes any text.
 */
export function unsendableSecrets(config: Config, secrets: Pick<StaticSecretSource, 'secret'>): ConfigProblem[] {
  const problems: ConfigProblem[] = []
  config.credentials.forEach((c, i) => {
    if (c.source !== 'static' || (c.inject.type !== 'bearer' && c.inject.type !== 'header')) return
    const value = secrets.secret(c.secret!)
    if (value !== undefined && !HEADER_SENDABLE.test(value)) {
      // The usual cause, said so: a secret written with `echo` (a Kubernetes Secret made from one, a file).
      const why = HEADER_SENDABLE.test(value.replace(/\r?\n$/, '')) ? 'it ends with a line break (as `echo` leaves one; `printf %s` does not): remove it' : 'it holds characters outside printable ASCII or starts or ends with a space'
      problems.push({ path: `credentials[${i}].secret`, message: `credential "${c.id}": secret ${c.secret!} cannot be sent in a header: ${why}` })
    }
  })
  return problems
}
