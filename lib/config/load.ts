import { byteSize, FileTooLarge, MAX_CONFIG_BYTES, readFailure, readFileBounded } from '../bounded-read.js'
import type { ErrorObject, ValidateFunction } from 'ajv'
import type { YAMLError } from 'yaml'
import { describeYamlProblem, parseYamlDocument, yamlData } from '../yaml-document.js'
import ipaddr from 'ipaddr.js'
import { parseCidr, processIp } from '../ip-address.js'
import { ADDRESS_CLASSES, PORT_PATTERN, type Config } from './schema.js'
import { isHopByHop } from '../../proxy/forward/headers.js'
import { hostNameProblem } from '../../proxy/listen/target.js'
import { globWildcards, MAX_GLOB_WILDCARDS } from '../../proxy/policy/paths.js'
import { audienceOf, HEADER_SENDABLE } from '../../proxy/credentials/bindings.js'
// The schema compiled ahead of time (scripts/config-validator.mjs; CI checks it is current):
// compiling it here cost every process ~20 MB of RSS and start-up time.
import { validate as generatedValidate } from './validate.generated.js'

export interface ConfigProblem {
  /** JSON-pointer-like dotted path, e.g. `policy.rules[2].hosts[0]`. */
  path: string
  message: string
}

export class ConfigError extends Error {
  readonly code = 'LK_CONFIG_INVALID'
  constructor(
    readonly source: string,
    readonly problems: ConfigProblem[],
  ) {
    super(`${source}: invalid configuration:\n` + problems.map((p) => `  ${p.path || '(root)'}: ${p.message}`).join('\n'))
  }
}

const validate = generatedValidate as unknown as ValidateFunction<Config>

/** Environment overrides: LATCHKEY__SIDECAR__LISTEN__PORT=16001 sets sidecar.listen.port (LATCHKEY__COLLECTOR__GRPC__PORT, in a collector's config, collector.grpc.port). */
export const ENV_PREFIX = 'LATCHKEY__'

export function loadConfigFile(file: string, env: NodeJS.ProcessEnv = process.env): Config {
  return parseConfig(readConfigText(file), file, env)
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true })

/**
 * The 1-based line holding the first bytes that are not UTF-8, or null when all are. Read leniently,
 * such bytes become U+FFFD: a Latin-1 `/café/**` deny rule would load and never match anything.
 */
export function firstNonUtf8Line(bytes: Uint8Array): number | null {
  try {
    STRICT_UTF8.decode(bytes)
    return null
  } catch {
    let line = 1
    let start = 0
    for (let i = 0; i <= bytes.length; i++) {
      if (i === bytes.length || bytes[i] === 0x0a) {
        try {
          STRICT_UTF8.decode(bytes.subarray(start, i))
        } catch {
          return line
        }
        line++
        start = i + 1
      }
    }
    return 1
  }
}

/** A config file's text; unreadable or not UTF-8 is a ConfigError naming the file (and the line). */
export function readConfigText(file: string): string {
  return configText(readConfigBytes(file), file)
}

/** A config file's bytes, read once; unreadable or over MAX_CONFIG_BYTES is a ConfigError naming the file. */
export function readConfigBytes(file: string): Buffer {
  try {
    return readFileBounded(file, MAX_CONFIG_BYTES)
  } catch (err) {
    if (err instanceof FileTooLarge) throw new ConfigError(file, [{ path: '', message: `larger than ${byteSize(MAX_CONFIG_BYTES)}, the most a config file may be` }])
    throw new ConfigError(file, [{ path: '', message: `cannot read file: ${readFailure(err)}` }])
  }
}

/** A config file's bytes as text; not UTF-8 is a ConfigError naming the file and the line. */
export function configText(bytes: Buffer, file: string): string {
  const bad = firstNonUtf8Line(bytes)
  if (bad !== null) throw new ConfigError(file, [{ path: `line ${bad}`, message: 'not valid UTF-8 (save the file as UTF-8)' }])
  return bytes.toString('utf8')
}

/** The LATCHKEY__… variables a parsed config (the sidecar's, the collector's) took values from, with the setting each answers for. */
const overridesOf = new WeakMap<object, ReadonlyMap<string, string>>()

/** What the environment set in `config` (as `NAME (setting)`), for start-up lines and check-config: nothing it changed goes unsaid. */
export function envOverrides(config: object): string[] {
  return [...(overridesOf.get(config)?.keys() ?? [])].map((name) => {
    const setting = name.slice(ENV_PREFIX.length).toLowerCase().split('__').map((k, i) => (/^[0-9]+$/.test(k) ? `[${k}]` : i === 0 ? k : `.${k}`)).join('')
    return `${name} (${setting})`
  })
}

export function parseConfig(text: string, source = '<config>', env: NodeJS.ProcessEnv = {}): Config {
  let doc
  try {
    doc = parseYamlDocument(text)
  } catch (err) {
    // The parser recurses per nesting level: thousands of levels exhaust the stack.
    if (err instanceof RangeError) throw new ConfigError(source, [{ path: '', message: 'the YAML nests too deeply' }])
    throw err
  }
  if (doc.errors.length > 0) {
    if (doc.errors.some((e) => e.message.includes('Maximum call stack size exceeded'))) {
      throw new ConfigError(source, [{ path: '', message: 'the YAML nests too deeply' }])
    }
    // One line per distinct problem, the first few: a broken bracket is reported once, not per level.
    const seen = new Set<string>()
    const problems = doc.errors.map((e) => describeYamlError(e, text)).filter((p) => !seen.has(p.path + p.message) && seen.add(p.path + p.message))
    throw new ConfigError(source, problems.slice(0, 5))
  }
  let raw: unknown
  try {
    raw = yamlData(doc) ?? {}
  } catch (err) {
    // yaml refuses excessive alias expansion (an alias bomb) by throwing.
    throw new ConfigError(source, [{ path: '', message: (err as Error).message }])
  }
  return validateWithOverrides(raw, env, source, (data) => {
    // Read before validation fills in the defaults: whether the file (or the environment) wrote one.
    const inlinePolicy = typeof data === 'object' && data !== null && 'policy' in data
    const config = validateConfig(data, source)
    // Both: the policy file's rules are the ones in force, and edits to `policy` did nothing, silently.
    if (inlinePolicy && config.sidecar.policy_file) {
      throw new ConfigError(source, [{ path: 'policy', message: 'set beside sidecar.policy_file, whose rules replace it: remove one of them' }])
    }
    return config
  })
}

/**
 * `raw` (a config file's data) with the environment's LATCHKEY__… overrides applied, then judged
 * by `validate`: a problem in an overridden value is the environment's, not the file's, and is
 * said with the variable's name. What was set is kept for envOverrides. The one path for the
 * sidecar's (and broker's) config and the collector's.
 */
export function validateWithOverrides<T extends object>(raw: unknown, env: NodeJS.ProcessEnv, source: string, validate: (raw: unknown) => T): T {
  const overrides = applyEnvOverrides(raw, env, source)
  try {
    const config = validate(raw)
    if (overrides.size > 0) overridesOf.set(config, overrides)
    return config
  } catch (err) {
    // A problem in an overridden value is the environment's, not the file's: say which variable.
    if (!(err instanceof ConfigError) || overrides.size === 0) throw err
    throw new ConfigError(
      source,
      err.problems.map((p) => {
        const name = [...overrides].find(([, path]) => p.path === path || p.path.startsWith(path + '.') || p.path.startsWith(path + '['))?.[0]
        return name ? { path: p.path, message: `${p.message} (set by ${name})` } : p
      }),
    )
  }
}

export function validateConfig(raw: unknown, source = '<config>'): Config {
  // A key that is not a valid name fails twice (its pattern, then propertyNames): said once, by the key.
  // A discriminator's own complaint (a type no branch has, or none) repeats what the enum or
  // required error beside it says about `type`.
  if (!validate(raw)) throw new ConfigError(source, schemaProblems(validate.errors))
  const config = raw as unknown as Config
  const problems = semanticProblems(config)
  if (problems.length > 0) throw new ConfigError(source, problems)
  return config
}

/**
 * Applies LATCHKEY__… overrides; returns each variable applied with the config path it answers for:
 * the path it set or, where it created keys on the way there, the first key it created.
 */
function applyEnvOverrides(raw: unknown, env: NodeJS.ProcessEnv, source: string): Map<string, string> {
  const applied = new Map<string, string>()
  if (typeof raw !== 'object' || raw === null) return applied
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined) continue
    const keys = name.slice(ENV_PREFIX.length).toLowerCase().split('__')
    if (keys.some((k) => k === '' || k === '__proto__' || k === 'constructor' || k === 'prototype')) {
      throw new ConfigError(source, [{ path: name, message: 'malformed environment override name' }])
    }
    let node = raw as Record<string, unknown>
    // The path as problems name it: `credentials[0].audience`.
    let path = ''
    let created: string | undefined
    for (const [i, key] of keys.entries()) {
      path += Array.isArray(node) ? `[${key}]` : `${path ? '.' : ''}${key}`
      // Into a list only by an index it has: `x` would be ignored, and `length` would cut it.
      if (Array.isArray(node) && !(/^(0|[1-9][0-9]*)$/.test(key) && Number(key) < node.length)) {
        const list = keys.slice(0, i).join('.')
        throw new ConfigError(source, [{ path: name, message: `${list} is a list of ${node.length}: "${key}" is not one of its indexes (override the whole list with ${ENV_PREFIX}${keys.slice(0, i).join('__').toUpperCase()})` }])
      }
      if (i === keys.length - 1) break
      const next = node[key]
      // The first key the override creates: a problem there (a misspelt key, unknown) is the override's.
      if (next === undefined) {
        node[key] = {}
        created ??= path
      } else if (typeof next !== 'object' || next === null) {
        throw new ConfigError(source, [{ path: name, message: `cannot override inside non-object ${key}` }])
      }
      node = node[key] as Record<string, unknown>
    }
    try {
      // Read as a file is (parseYamlDocument): parse() took `!env KEY` as `KEY`, an unknown tag being only a warning.
      const doc = parseYamlDocument(value)
      if (doc.errors.length > 0) throw new Error()
      node[keys[keys.length - 1]!] = yamlData(doc)
    } catch {
      // The value itself is not repeated: an override can carry a secret.
      throw new ConfigError(source, [{ path: name, message: 'not a valid YAML value' }])
    }
    applied.set(name, created ?? path)
  }
  return applied
}

/** yaml's errors in words about the file, quoting none of its values (yaml-document.ts describeYamlError). */
function describeYamlError(e: YAMLError, text: string): ConfigProblem {
  const { line, message } = describeYamlProblem(e, text)
  return { path: line === null ? '' : `line ${line}`, message }
}

/**
 * ajv's errors as problems, one per mistake: a key that is not a valid name fails twice (its
 * pattern, then propertyNames), said once, by the key; a discriminator's own complaint (a type
 * no branch has, or none) repeats what the enum or required error beside it says. For every
 * config judged by a schema compiled with discriminators (the sidecar's, the collector's).
 */
export function schemaProblems(errors: ErrorObject[] | null | undefined): ConfigProblem[] {
  return (errors ?? []).filter((e) => e.keyword !== 'propertyNames' && e.keyword !== 'discriminator').map(describeAjvError)
}

/** One ajv error in words: the path as problems name it, the key for an unknown or missing one. */
export function describeAjvError(e: ErrorObject): ConfigProblem {
  const path = pointerToPath(e.instancePath)
  if (e.propertyName !== undefined) {
    const key = /^[A-Za-z0-9_.-]+$/.test(e.propertyName) ? e.propertyName : JSON.stringify(e.propertyName.slice(0, 64))
    return { path: path ? `${path}.${key}` : key, message: `not a valid name: ${e.message ?? e.keyword}` }
  }
  switch (e.keyword) {
    case 'additionalProperties': {
      const key = (e.params as { additionalProperty: string }).additionalProperty
      // YAML 1.2 has no merge keys: `<<: *base` is an ordinary key here.
      return { path: path ? `${path}.${key}` : key, message: key === '<<' ? 'unknown key (YAML merge keys are not supported: repeat the keys)' : 'unknown key' }
    }
    case 'required':
      return { path, message: `missing required key "${(e.params as { missingProperty: string }).missingProperty}"` }
    case 'enum':
      return { path, message: `must be one of ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}` }
    case 'const':
      return { path, message: `must be ${JSON.stringify((e.params as { allowedValue: unknown }).allowedValue)}` }
    case 'pattern': {
      // A port's pattern is unreadable as a pattern: said in words.
      const pattern = (e.params as { pattern: string }).pattern
      if (pattern.includes(PORT_PATTERN)) return { path, message: `must be ${pattern.startsWith('^grpc://') ? 'grpc://host:port' : 'host:port'} with a port from 1 to 65535` }
      return { path, message: e.message ?? e.keyword }
    }
    default:
      return { path, message: e.message ?? e.keyword }
  }
}

function pointerToPath(pointer: string): string {
  return pointer
    .split('/')
    .slice(1)
    .map((seg) => seg.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((acc, seg) => (/^\d+$/.test(seg) ? `${acc}[${seg}]` : acc ? `${acc}.${seg}` : seg), '')
}

/**
 * A link that carries a credential, configured at `path` to `host`: TLS off loopback, unless
 * `insecure_plaintext` says otherwise by name (and not both). `what` is the setting named when
 * TLS is missing: `tls`, or `url` for an http:// URL. The one rule for the sidecar's, the
 * broker's and the collector's configs.
 */
export function plaintextProblem(path: string, host: string, tls: object | null, insecure: boolean, why: string, what = 'tls'): ConfigProblem | null {
  if (tls && insecure) return { path: `${path}.insecure_plaintext`, message: 'contradicts tls: remove one' }
  if (!tls && !insecure && host !== '' && !isLoopbackHost(host)) {
    return { path: `${path}.${what}`, message: `${what === 'tls' ? 'required' : 'must be TLS'} off loopback (${host.slice(0, 100)}): without it ${why}; set insecure_plaintext: true to accept that` }
  }
  return null
}

/** localhost, or an address in 127.0.0.0/8 or ::1 however written (::ffff:127.0.0.1, 0:0:…:1). */
export function isLoopbackHost(host: string): boolean {
  if (host === 'localhost') return true
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
  if (!ipaddr.isValid(h) || ambiguousIPv4(h)) return false
  return processIp(h).range() === 'loopback'
}

/** 0.0.0.0 or ::, however written: a listener there takes the port on every address. */
function isUnspecified(host: string): boolean {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
  return ipaddr.isValid(h) && !ambiguousIPv4(h) && processIp(h).range() === 'unspecified'
}

/**
 * 010 is 8 to one parser and 10 to another, 127.1 is 127.0.0.1: an IPv4 address in the config is
 * written the one way nobody reads differently.
 */
function ambiguousIPv4(address: string): boolean {
  return NUMERIC_HOST.test(address) && !ipaddr.IPv4.isValidFourPartDecimal(address)
}
/** End-to-end headers that route or frame the request, which the upstream or the sidecar's HTTP stack reads first. */
const ROUTING_OR_FRAMING: Record<string, string> = {
  host: 'the upstream routes by it, and front ends log it',
  'content-length': 'it frames the body',
  expect: 'it asks for an interim response',
}

/** Why a credential cannot ride in the header `name`, or null when it can: those above, and those removed with the hop (forward/headers.ts). */
function notACredentialHeader(name: string): string | null {
  const lower = name.toLowerCase()
  return ROUTING_OR_FRAMING[lower] ?? (isHopByHop(lower) ? 'hop-by-hop: removed before the request goes on' : null)
}

/**
 * What is wrong with a header injector's `format`, or null. The credential is written once, in
 * place of `{token}`: a second one cut the header short there (`{token}-{token}` sent `SECRET-`).
 * The rest is held to the secret's rule (printable ASCII, no space at either end): a line break,
 * a NUL or text beyond Latin-1 passed the check and start-up, then every call failed in undici, a
 * retryable 502. The format is not quoted: it may hold those characters.
 */
function headerFormatProblem(format: string): string | null {
  const placeholders = format.split('{token}').length - 1
  if (placeholders !== 1) return `must hold {token} exactly once: it holds it ${placeholders} times, and the credential is written only where the first is (the header would be cut short at the second)`
  if (!HEADER_SENDABLE.test(format.replace('{token}', 'x'))) {
    return /^[\x20-\x7e]*$/.test(format)
      ? 'starts or ends with a space, which a header cannot carry (a server trims it): remove it'
      : 'holds characters outside printable ASCII (a line break, NUL, tab or text beyond ASCII): a header carries printable ASCII, as the secret must be'
  }
  return null
}

/** What a URL parser reads as IPv4: one to four parts, each decimal, octal or 0x hex. */
const NUMERIC_HOST = /^(?:0x[0-9a-f]*|\d+)(?:\.(?:0x[0-9a-f]*|\d+)){0,3}\.?$/i
const AMBIGUOUS = 'write an IPv4 address as four decimal parts without leading zeros (010 is 8 to some parsers, 10 to others)'

function semanticProblems(c: Config): ConfigProblem[] {
  const problems: ConfigProblem[] = []
  const checkCidr = (path: string, value: string) => {
    try {
      parseCidr(value)
    } catch {
      problems.push({ path, message: `not a CIDR range: ${JSON.stringify(value.slice(0, 100))}` })
      return
    }
    if (ambiguousIPv4(value.slice(0, value.indexOf('/')))) problems.push({ path, message: AMBIGUOUS })
  }
  const checkOrigin = (path: string, value: string): URL | undefined => {
    let url: URL
    try {
      url = new URL(value)
    } catch {
      // The value is not repeated: a mistyped URL can still carry a credential.
      problems.push({ path, message: 'not a URL (scheme://host[:port] expected)' })
      return undefined
    }
    if (url.username || url.password) problems.push({ path, message: 'must not carry userinfo' })
    // Compared exactly with each request's origin: a pattern would match no request, and a
    // credential bound to one would silently never be injected.
    if (url.hostname.includes('*')) problems.push({ path, message: 'must name one host: a wildcard (*) matches nothing here, origins are compared exactly' })
    else {
      const problem = hostNameProblem(url.hostname)
      if (problem) problems.push({ path, message: `its host ${problem}` })
    }
    if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
      problems.push({ path, message: 'must be an origin (scheme://host[:port]) with no path, query or fragment' })
    }
    return url
  }

  // Both ports: the admin port opens tasks and serves metrics, the proxy port spends credentials.
  for (const [path, host] of [['sidecar.listen.host', c.sidecar.listen.host], ['sidecar.admin.host', c.sidecar.admin.host]] as const) {
    // `127.1` is loopback, written a way parsers read differently: said so, not "must be loopback".
    if (ambiguousIPv4(host)) problems.push({ path, message: AMBIGUOUS })
    else if (!c.sidecar.allow_remote_clients && !isLoopbackHost(host)) {
      problems.push({ path, message: 'must be a loopback address (set sidecar.allow_remote_clients to override)' })
    }
  }

  // One port for both listeners: the second cannot listen, and the sidecar does not start.
  const { listen, admin } = c.sidecar
  if (listen.port !== 0 && listen.port === admin.port && (listen.host === admin.host || isUnspecified(listen.host) || isUnspecified(admin.host))) {
    problems.push({ path: 'sidecar.admin.port', message: `the same as sidecar.listen.port (${listen.port}): each listener needs its own port` })
  }

  // The control stream carries the control token one way and policy and revocations the other:
  // off loopback, the sidecar must be able to tell the broker from whoever answers at its address.
  const sc = c.sidecar.control
  if (sc) {
    // A URL that does not parse: the schema's pattern has already said what is wrong with it.
    const url = urlOf(sc.url)
    noUserinfo('sidecar.control.url', url, 'the broker takes the control token (token_secret)')
    const host = url?.hostname ?? ''
    checkPlaintext('sidecar.control', host, sc.tls, sc.insecure_plaintext, 'the broker, whose control token this sidecar sends and whose policy and revocations it applies, cannot be told from an impostor at that address')
    if (sc.tls && (sc.tls.cert_file === undefined) !== (sc.tls.key_file === undefined)) problems.push({ path: 'sidecar.control.tls', message: 'cert_file and key_file go together' })
  }
  const bc = c.broker?.control
  if (bc) checkPlaintext('broker.control', bc.host, bc.tls, bc.insecure_plaintext, 'sidecars cannot tell this broker from an impostor at that address, nor keep the control token from the network')
  // The token exchange carries workload evidence and user tokens, and answers with tokens.
  const sb = c.sidecar.broker
  if (sb) {
    const url = urlOf(sb.url)
    // Its password also went, as text, into the evidence's default audience (the URL whole).
    noUserinfo('sidecar.broker.url', url, 'the broker takes workload evidence (sidecar.attestation)')
    if (url?.protocol === 'http:') checkPlaintext('sidecar.broker', url.hostname, null, sb.insecure_plaintext, 'the workload evidence and user tokens this sidecar sends, and the tokens it gets back, cross in clear text to whoever answers (use https://)', 'url')
    else if (url?.protocol === 'https:' && sb.insecure_plaintext) problems.push({ path: 'sidecar.broker.insecure_plaintext', message: 'contradicts an https:// url: remove one' })
  }
  if (c.broker) checkPlaintext('broker.listen', c.broker.listen.host, c.broker.listen.tls, c.broker.listen.insecure_plaintext, 'workload evidence, user tokens and the tokens minted from them cross the network in clear text')
  const ac = c.audit.collector
  if (ac) {
    const host = ac.address.slice(0, ac.address.lastIndexOf(':'))
    // Not quoted, nor the address in the lines below: `user:password@host:port` carries a password.
    if (host.includes('@')) problems.push({ path: 'audit.collector.address', message: 'must be host:port, without userinfo (user:password@): a gRPC address has none, and the collector takes token_secret or tls' })
    // `::1:15100` reads as loopback here but is no address to gRPC, which would read it whole.
    else if (host.includes(':') && !(host.startsWith('[') && host.endsWith(']'))) problems.push({ path: 'audit.collector.address', message: `an IPv6 address is written in brackets: [${host.slice(0, 100)}]:${ac.address.slice(ac.address.lastIndexOf(':') + 1)}` })
    else checkPlaintext('audit.collector', host, ac.tls, ac.insecure_plaintext, 'the collector, which holds the audit trail, cannot be told from an impostor, and its token crosses in clear text')
    // Here, not only where the sidecar starts: check-config called these valid, and the sidecar refused them.
    if (!ac.token_secret && !ac.tls) problems.push({ path: 'audit.collector', message: 'needs token_secret, tls, or both, to authenticate to the collector' })
    if (ac.spool_max_bytes < 2 * ac.segment_bytes) {
      problems.push({ path: 'audit.collector.spool_max_bytes', message: `must be at least twice segment_bytes (${ac.segment_bytes}): acked segments are deleted only once a newer one exists` })
    }
  }
  // RFC 6749 §3.2: a token endpoint is reached over TLS. Keys fetched in clear text could be
  // replaced on the way: whoever did so could sign tokens that are then accepted.
  c.credentials.forEach((b, i) => {
    const url = b.oauth ? urlOf(b.oauth.token_url) : null
    noUserinfo(`credentials[${i}].oauth.token_url`, url, 'the token endpoint takes oauth.client_id and oauth.client_secret')
    if (url?.protocol === 'http:' && !isLoopbackHost(url.hostname)) problems.push({ path: `credentials[${i}].oauth.token_url`, message: 'must be https:// off loopback (RFC 6749 §3.2): the client secret and the tokens would cross in clear text' })
  })
  for (const [path, src] of [
    ['broker.users', c.broker?.users],
    ['broker.attestors.kubernetes', c.broker?.attestors.kubernetes],
    ['broker.attestors.spiffe', c.broker?.attestors.spiffe],
  ] as const) {
    const url = src?.jwks_url ? urlOf(src.jwks_url) : null
    if (url?.protocol === 'http:' && !isLoopbackHost(url.hostname)) problems.push({ path: `${path}.jwks_url`, message: 'must be https:// off loopback: keys fetched in clear text could be replaced on the way, and tokens signed with the replacement accepted (or use jwks_file)' })
  }

  /** A URL's userinfo, which the client it is given to drops: the operator who wrote a password there believes it is sent. The URL is not quoted. */
  function noUserinfo(path: string, url: URL | null, instead: string): void {
    if (url && (url.username || url.password)) problems.push({ path, message: `must not carry userinfo (user:password@): it is not sent as a credential, and ${instead}` })
  }

  function checkPlaintext(path: string, host: string, tls: object | null, insecure: boolean, why: string, what = 'tls'): void {
    const problem = plaintextProblem(path, host, tls, insecure, why, what)
    if (problem) problems.push(problem)
  }

  function urlOf(value: string): URL | null {
    try {
      return new URL(value)
    } catch {
      return null
    }
  }

  if (c.tasks.required && c.tasks.default.enabled) {
    problems.push({ path: 'tasks.required', message: 'contradicts tasks.default.enabled: a default task names every call' })
  }

  const ruleIds = new Set<string>()
  c.policy.rules.forEach((r, i) => {
    if (ruleIds.has(r.id)) problems.push({ path: `policy.rules[${i}].id`, message: `duplicate rule id "${r.id}"` })
    ruleIds.add(r.id)
    r.cidrs?.forEach((cidr, j) => checkCidr(`policy.rules[${i}].cidrs[${j}]`, cidr))
    r.paths?.forEach((p, j) => {
      const wildcards = globWildcards(p)
      if (wildcards > MAX_GLOB_WILDCARDS) {
        problems.push({ path: `policy.rules[${i}].paths[${j}]`, message: `has ${wildcards} wildcards (*, ** and ?), more than ${MAX_GLOB_WILDCARDS}: each makes every request's path slower to judge` })
      }
    })
    r.hosts?.forEach((h, j) => {
      if (h.includes('*') && !/^\*\.[^*]+$/.test(h)) {
        problems.push({ path: `policy.rules[${i}].hosts[${j}]`, message: 'wildcards are only allowed as a leading "*." label' })
      }
      // An IPv6 address is taken bare (`::1`) or bracketed (`[::1]`).
      if (!ipaddr.IPv6.isValid(h) && /[/:@?#\s]/.test(h.replace(/^\[.*\]$/, ''))) {
        problems.push({ path: `policy.rules[${i}].hosts[${j}]`, message: 'must be a host name or address, without scheme, port or path' })
      } else if (ambiguousIPv4(h)) {
        problems.push({ path: `policy.rules[${i}].hosts[${j}]`, message: AMBIGUOUS })
      } else if (!ipaddr.IPv6.isValid(h)) {
        const problem = hostNameProblem(h.startsWith('*.') ? h.slice(2) : h)
        if (problem) problems.push({ path: `policy.rules[${i}].hosts[${j}]`, message: `${JSON.stringify(h.slice(0, 100))} ${problem}: no request names it, and the rule would match nothing or another host` })
      }
    })
  })

  c.network.deny.forEach((entry, i) => {
    if (!(ADDRESS_CLASSES as readonly string[]).includes(entry)) {
      if (entry.includes('/')) checkCidr(`network.deny[${i}]`, entry)
      else problems.push({ path: `network.deny[${i}]`, message: `neither an address class (${ADDRESS_CLASSES.join(', ')}) nor a CIDR` })
    }
  })
  c.network.allow.forEach((a, i) => checkCidr(`network.allow[${i}].cidr`, a.cidr))

  for (const [name, upstream] of Object.entries(c.routes)) checkOrigin(`routes.${name}`, upstream)

  const bindingIds = new Set<string>()
  const audiences = new Map<string, string>()
  c.credentials.forEach((b, i) => {
    if (bindingIds.has(b.id)) problems.push({ path: `credentials[${i}].id`, message: `duplicate credential id "${b.id}"` })
    bindingIds.add(b.id)
    const url = checkOrigin(`credentials[${i}].audience`, b.audience)
    if (url) {
      // Compared as requests are: `http://API.EXAMPLE.:80` is `http://api.example:80`, one origin, one credential.
      const audience = audienceOf(url)
      if (audiences.has(audience)) {
        problems.push({ path: `credentials[${i}].audience`, message: `audience ${audience} already bound by credential "${audiences.get(audience)}"` })
      }
      audiences.set(audience, b.id)
    }
  })
  c.credentials.forEach((b, i) => {
    const inject = b.inject
    if (inject.type === 'header') {
      const why = notACredentialHeader(inject.name)
      if (why) problems.push({ path: `credentials[${i}].inject.name`, message: `${inject.name} routes, frames or is dropped with the request's hop (${why}): a credential cannot be injected there` })
      const format = inject.format === undefined ? null : headerFormatProblem(inject.format)
      if (format) problems.push({ path: `credentials[${i}].inject.format`, message: format })
    }
    if (b.source !== 'client_credentials' && b.oauth !== undefined) problems.push({ path: `credentials[${i}].oauth`, message: 'applies only to source: client_credentials' })
    if (b.source === 'static') {
      if (!b.secret) problems.push({ path: `credentials[${i}].secret`, message: 'required when source is static' })
      if (b.token_audience !== undefined || b.scopes !== undefined) problems.push({ path: `credentials[${i}]`, message: 'token_audience and scopes apply only to broker and client_credentials sources' })
    } else if (b.source === 'client_credentials') {
      if (!b.oauth) problems.push({ path: `credentials[${i}].oauth`, message: 'required when source is client_credentials (token_url, client_id, client_secret)' })
      if (b.secret !== undefined) problems.push({ path: `credentials[${i}].secret`, message: 'the client secret goes in oauth.client_secret' })
    } else {
      if (b.secret !== undefined) problems.push({ path: `credentials[${i}].secret`, message: 'a broker credential has no static secret' })
      if (!c.sidecar.broker) problems.push({ path: 'sidecar.broker', message: `required: credential "${b.id}" comes from the broker` })
      const a = c.sidecar.attestation
      if (!a.kubernetes && !a.spiffe && !a.local) problems.push({ path: 'sidecar.attestation', message: `required: credential "${b.id}" needs workload evidence for the broker (kubernetes, spiffe or local)` })
    }
  })
  // A broker credential says this itself, above. Without one the sidecar still makes its broker client, from that evidence: check-config called it valid, and the sidecar did not start.
  const a = c.sidecar.attestation
  if (c.sidecar.broker && !a.kubernetes && !a.spiffe && !a.local && c.credentials.every((b) => b.source === 'static' || b.source === 'client_credentials')) {
    problems.push({ path: 'sidecar.attestation', message: 'required when sidecar.broker is set: the broker is asked with workload evidence (kubernetes, spiffe or local)' })
  }
  if (c.tasks.default.duration_s > c.tasks.max_duration_s) problems.push({ path: 'tasks.default.duration_s', message: 'exceeds tasks.max_duration_s' })

  if (c.broker) {
    const b = c.broker
    const sources: [string, { jwks_file?: string | undefined; jwks_url?: string | undefined } | undefined][] = [
      ['broker.users', b.users],
      ['broker.attestors.kubernetes', b.attestors.kubernetes],
      ['broker.attestors.spiffe', b.attestors.spiffe],
    ]
    for (const [path, src] of sources) {
      if (src && (src.jwks_file === undefined) === (src.jwks_url === undefined)) problems.push({ path, message: 'needs exactly one of jwks_file or jwks_url' })
    }
    if (!b.attestors.kubernetes && !b.attestors.spiffe && !b.attestors.local) {
      problems.push({ path: 'broker.attestors', message: 'configure at least one attestor (kubernetes, spiffe or local): without one no workload can be attested' })
    }
    const url = checkOrigin('broker.issuer', b.issuer)
    if (url && b.issuer.endsWith('/')) problems.push({ path: 'broker.issuer', message: 'must not end with "/"' })
  }
  return problems
}
