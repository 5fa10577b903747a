// The collector's own config file (YAML, `version: 1`), separate from the sidecar's: a collector
// is its own deployment. Validated with ajv like the sidecar's; every problem names its path.
import { accessSync, closeSync, constants, openSync, readSync, statSync } from 'node:fs'
import { dirname } from 'node:path'
import type { ErrorObject, ValidateFunction } from 'ajv'
import { validate as generatedValidate } from './config-validate.generated.js'
import { checkServerTls } from '../lib/tls-files.js'
import { PreflightFindings } from '../lib/config/preflight-findings.js'
import { describeYamlProblem, parseYamlDocument, yamlData } from '../lib/yaml-document.js'
import { ConfigError, isLoopbackHost, plaintextProblem, readConfigText, schemaProblems, validateWithOverrides, type ConfigProblem } from '../lib/config/load.js'

export interface SidecarCredential {
  /** With mTLS, the CN of the sidecar's client certificate. */
  id: string
  /** hex SHA-256 of the sidecar's shared token: the collector never holds the token itself. Required without mTLS. */
  token_sha256?: string
  /**
   * The agent instances this sidecar may report calls for: exact IDs, or a prefix ending in `*`
   * (agent:summarizer:prod:*). Unset: any. A batch naming another agent is refused whole.
   */
  agents?: string[]
}

export interface GrpcTls {
  cert_file: string
  key_file: string
  /** CA that signs sidecars' client certificates: with it, every stream must present one. */
  client_ca_file: string
}

export type StoreConfig =
  | { kind: 'sqlite'; path: string }
  | { kind: 'postgres'; url: string; schema: string; pool_size: number; writer_role?: string; migrate: boolean }

export interface NatsConfig {
  servers: string[]
  stream: string
  /** Events go to `<subject_prefix>.<agent type>`. */
  subject_prefix: string
}

export interface CollectorConfig {
  version: 1
  collector: {
    /** max_clock_skew_ms: how far past the collector's clock an event's time may be. */
    /** tls: required off loopback unless insecure_plaintext (sidecars' tokens, and the trail itself, would cross in clear text). */
    grpc: { host: string; port: number; max_batch_bytes: number; max_clock_skew_ms: number; tls: GrpcTls | null; insecure_plaintext: boolean }
    /** The query API. With reader_tokens_sha256, every request needs one of those tokens as a bearer. */
    http: { host: string; port: number; reader_tokens_sha256?: string[] } | null
    store: StoreConfig
    sidecars: SidecarCredential[]
    nats: NatsConfig | null
  }
  log: { level: string }
}

// Compiled ahead of time (scripts/config-validator.mjs), as the sidecar's: compiling it with Ajv
// took a tenth of a second of every `latchkey collector` and `audit -c` start.
const validate = generatedValidate as unknown as ValidateFunction<CollectorConfig>

/** In words as the sidecar's config's are (schemaProblems); a token where its hash belongs is said so. */
function describeErrors(errors: ErrorObject[] | null | undefined): ConfigProblem[] {
  return schemaProblems(errors).map((p) =>
    /token_sha256|tokens_sha256\[\d+\]$/.test(p.path) && p.message.startsWith('must match pattern') ? { path: p.path, message: 'must be the hex SHA-256 of the token (64 lowercase hex digits), never the token' } : p,
  )
}

export function validateCollectorConfig(raw: unknown, source = '<collector config>'): CollectorConfig {
  if (raw && typeof raw === 'object' && (raw as { collector?: { http?: unknown } }).collector && !('http' in (raw as { collector: object }).collector)) {
    ;(raw as { collector: { http: unknown } }).collector.http = {}
  }
  // The store is judged by the branch its kind names (a discriminator): one line per mistake.
  if (!validate(raw)) throw new ConfigError(source, describeErrors(validate.errors))
  const c = raw as unknown as CollectorConfig
  // ajv does not apply defaults inside oneOf branches: the store's are filled here.
  const st = c.collector.store as { kind: string; path?: string; schema?: string; pool_size?: number }
  if (st.kind === 'sqlite') st.path ??= 'latchkey-audit.db'
  else {
    st.schema ??= 'latchkey'
    st.pool_size ??= 4
    ;(st as { migrate?: boolean }).migrate ??= true
  }
  const ids = new Set<string>()
  const problems: ConfigProblem[] = []
  c.collector.sidecars.forEach((s, i) => {
    if (ids.has(s.id)) problems.push({ path: `collector.sidecars[${i}].id`, message: `duplicate sidecar id "${s.id}"` })
    if (!s.token_sha256 && !c.collector.grpc.tls) {
      problems.push({ path: `collector.sidecars[${i}].token_sha256`, message: 'required unless collector.grpc.tls authenticates sidecars by client certificate' })
    }
    ids.add(s.id)
  })
  // The ingest carries sidecars' tokens and every call's record: off loopback, over TLS (as the
  // sidecars' own audit.collector requires), unless said by name.
  const grpc = c.collector.grpc
  const plaintext = plaintextProblem('collector.grpc', grpc.host, grpc.tls, grpc.insecure_plaintext, "sidecars' tokens and every call's record cross in clear text, and sidecars cannot tell this collector from an impostor")
  if (plaintext) problems.push(plaintext)
  // The query API answers every agent's trail: open to the network, it needs reader tokens.
  const http = c.collector.http
  if (http && !isLoopbackHost(http.host) && !http.reader_tokens_sha256?.length) {
    problems.push({ path: 'collector.http.host', message: `${JSON.stringify(http.host)} is not a loopback address: set collector.http.reader_tokens_sha256, or anyone who reaches the port reads every agent's audit trail` })
  }
  // What the PostgreSQL driver reads the URL with: one that does not parse is refused here, not at
  // the first connection. The value is not repeated: it can carry a password.
  if (c.collector.store.kind === 'postgres') {
    try {
      new URL(c.collector.store.url)
    } catch {
      problems.push({ path: 'collector.store.url', message: 'not a URL (postgres://user@host:port/database expected)' })
    }
  }
  if (problems.length) throw new ConfigError(source, problems)
  return c
}

/**
 * What a collector's start-up reads besides its config, as check-config reports it: `errors`, a
 * file's content is wrong (a certificate that is not PEM, a store file that is not a database);
 * `onThisMachine`, a file missing or unreadable here.
 */
export function collectorPreflight(c: CollectorConfig): PreflightFindings {
  const found = new PreflightFindings()
  const tls = c.collector.grpc.tls
  if (tls) {
    const r = checkServerTls('collector.grpc.tls', tls)
    if ('problems' in r) for (const p of r.problems) found.add(p.path, p.message, p.unreadable)
  }
  const store = c.collector.store
  if (store.kind === 'sqlite') {
    const problem = sqliteFileProblem(store.path)
    if (problem) found.add('collector.store.path', problem.message, problem.unreadable)
  }
  return found
}

/** An existing SQLite store file that is not a database (opened read-only: nothing is created or changed), or a missing directory. */
function sqliteFileProblem(path: string): { message: string; unreadable: boolean } | null {
  let st
  try {
    st = statSync(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code !== 'ENOENT') return { message: `${path}: cannot be read (${code ?? 'error'})`, unreadable: true }
    try {
      if (!statSync(dirname(path)).isDirectory()) return { message: `${path}: ${dirname(path)} is not a directory`, unreadable: true }
      accessSync(dirname(path), constants.W_OK)
      return null
    } catch (err) {
      const c = (err as NodeJS.ErrnoException).code
      return { message: `${path}: its directory ${dirname(path)} ${c === 'ENOENT' ? 'does not exist' : `cannot be written (${c ?? 'error'})`}`, unreadable: true }
    }
  }
  if (st.isDirectory()) return { message: `${path}: is a directory`, unreadable: true }
  if (st.size === 0) return null
  // SQLite's own header: 16 bytes, "SQLite format 3\0". Anything else, SQLite refuses ("file is not a database").
  let fd: number | undefined
  try {
    fd = openSync(path, 'r')
    const header = Buffer.alloc(16)
    const n = readSync(fd, header, 0, 16, 0)
    if (n < 16 || header.toString('latin1') !== 'SQLite format 3\0') return { message: `${path}: not a SQLite database`, unreadable: false }
    return null
  } catch (err) {
    return { message: `${path}: cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`, unreadable: true }
  } finally {
    if (fd !== undefined) closeSync(fd)
  }
}

/** The collector's config file, with LATCHKEY__COLLECTOR__… overrides from `env` applied as the sidecar's are. */
export function loadCollectorConfig(file: string, env: NodeJS.ProcessEnv = process.env): CollectorConfig {
  return parseCollectorConfig(readConfigText(file), file, env)
}

export function parseCollectorConfig(text: string, file = '<collector config>', env: NodeJS.ProcessEnv = {}): CollectorConfig {
  let raw: unknown
  let doc
  try {
    doc = parseYamlDocument(text)
  } catch (err) {
    // The parser recurses per nesting level: thousands of levels exhaust the stack.
    if (err instanceof RangeError) throw new ConfigError(file, [{ path: '', message: 'the YAML nests too deeply' }])
    throw err
  }
  const e = doc.errors[0]
  if (e) {
    const { line, message } = describeYamlProblem(e, text)
    throw new ConfigError(file, [{ path: line === null ? '' : `line ${line}`, message }])
  }
  try {
    raw = yamlData(doc)
  } catch (err) {
    throw new ConfigError(file, [{ path: '', message: (err as Error).message }])
  }
  return validateWithOverrides(raw ?? {}, env, file, (r) => validateCollectorConfig(r, file))
}
