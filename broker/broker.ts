// Assembles the broker from its config: registry (watched), keys, attestors, user IdP, revocation
// store, events, HTTP server. Everything is read and compiled here, once; the exchange path
// does no file or database I/O but two bounded ones: a local attestation's jti recorded in the
// store, and a signing key's file rewritten when a token outlives the bound it records (once
// every few minutes).
import type { AddressInfo } from 'node:net'
import type { BrokerConfig } from '../lib/config/schema.js'
import { createLogger, type Logger } from '../lib/log.js'
import { RegistryError, RegistryHolder, type Registry } from './registry.js'
import { KeyRing } from './keys.js'
import { keySetFrom, MAX_SKEW_S } from './jwt.js'
import { KubernetesVerifier } from './attest/kubernetes.js'
import { SpiffeVerifier } from './attest/spiffe.js'
import { LocalVerifier } from './attest/local.js'
import type { AttestationVerifier } from './attest/attestor.js'
import { UserTokenVerifier } from './users.js'
import { RevocationList } from './revocations/list.js'
import { SqliteRevocationStore } from './revocations/sqlite.js'
import { PostgresRevocationStore } from './revocations/postgres.js'
import type { RevocationStore } from './revocations/store.js'
import { BrokerEvents } from './events.js'
import { TokenExchange } from './exchange.js'
import { Introspection } from './introspect.js'
import { createBrokerServer } from './http/server.js'
import type { ControlServer } from './control/server.js'
import type { PolicyBundleHolder } from './control/policy.js'
import type { RevocationBus } from './control/nats.js'
import { listenError } from '../lib/listen-error.js'
import { readServerTls } from '../lib/tls-files.js'
import { postgresWhere, storeCause, storeStartupError } from '../lib/store-schema.js'

/** How often expired jti and task revocations are looked for (and once at start). */
const PRUNE_EVERY_MS = 10 * 60_000

export interface RunningBroker {
  url: string
  issuer: string
  keys: KeyRing
  revocations: RevocationList
  registry: RegistryHolder
  events: BrokerEvents
  /** The control stream's gRPC address (host:port) when broker.control is configured. */
  controlAddress?: string
  control?: ControlServer
  policy?: PolicyBundleHolder
  bus?: RevocationBus
  close(): Promise<void>
}

export interface BrokerOptions {
  env?: NodeJS.ProcessEnv
  logger?: Logger
  now?: () => number
}

export function openRevocationStore(c: BrokerConfig): RevocationStore {
  if (c.store.postgres) return new PostgresRevocationStore(c.store.postgres.url, c.store.postgres.schema)
  return new SqliteRevocationStore(c.store.sqlite?.path ?? '.latchkey/broker.db')
}

export async function startBroker(c: BrokerConfig, opts: BrokerOptions = {}): Promise<RunningBroker> {
  const env = opts.env ?? process.env
  const now = opts.now ?? Date.now
  const log = opts.logger ?? createLogger('info', 'latchkey-broker')
  const audience = c.audience ?? c.issuer
  const events = new BrokerEvents(log, c.events.jsonl?.path)

  // The store first: one that cannot be opened, or holds a table of the wrong shape, stops the
  // start in one line naming the setting and the cause, before anything else runs.
  const setting = c.store.postgres ? 'broker.store.postgres' : 'broker.store.sqlite'
  const where = c.store.postgres ? postgresWhere(c.store.postgres.url) : (c.store.sqlite?.path ?? '.latchkey/broker.db')
  let revocations: RevocationList
  try {
    revocations = new RevocationList(openRevocationStore(c))
  } catch (err) {
    await events.close()
    throw storeStartupError(setting, where, err)
  }
  try {
    await revocations.load()
  } catch (err) {
    await revocations.store.close().catch(() => {})
    await events.close()
    throw storeStartupError(setting, where, err)
  }

  // A key file it cannot use stops the start in one line (KeyDirError), the store closed behind it.
  let keys: KeyRing
  try {
    keys = await KeyRing.open({ dir: c.keys.dir, alg: c.keys.alg, rotateAfterS: c.keys.rotate_after_s, now })
  } catch (err) {
    await revocations.store.close().catch(() => {})
    await events.close()
    throw err
  }

  // A registry it cannot load stops the start in one line naming the setting, the file and each
  // problem (a reload keeps the previous registry instead), the store closed behind it.
  let registry: RegistryHolder
  try {
    registry = new RegistryHolder(c.registry_file, (r) => {
      const ts = new Date(now()).toISOString()
      if (!r.ok) events.emit({ type: 'policy.rejected', ts, reason: r.error.message })
      else for (const w of r.widened) events.emit({ type: 'policy.widened', ts, agent_type: w.agent_type, audience: w.audience, added: w.added })
    })
  } catch (err) {
    await revocations.store.close().catch(() => {})
    await events.close()
    if (!(err instanceof RegistryError)) throw err
    throw Object.assign(new Error(`broker.registry_file ${err.source}: ${err.problems.join('; ')}`), { code: 'LK_STARTUP' })
  }
  registry.watch()
  keys.start((err) => log.error({ dir: c.keys.dir, reason: (err as NodeJS.ErrnoException).code ?? (err as Error).message }, 'signing key rotation failed: the active key signs on until it succeeds (retried every minute)'))

  const attestors: AttestationVerifier[] = []
  const a = c.attestors
  // A key file missing or not a JWK set stops the start in one line naming the setting (JwksFileError).
  let users: UserTokenVerifier | undefined
  try {
    if (a.kubernetes) attestors.push(new KubernetesVerifier(keySetFrom(a.kubernetes, 'broker.attestors.kubernetes.jwks_file'), a.kubernetes.issuer, a.kubernetes.audience ?? audience, a.kubernetes.max_token_age_s))
    if (a.spiffe) attestors.push(new SpiffeVerifier(keySetFrom(a.spiffe, 'broker.attestors.spiffe.jwks_file'), a.spiffe.trust_domain, a.spiffe.audience ?? audience, a.spiffe.max_lifetime_s))
    if (a.local) attestors.push(new LocalVerifier(keySetFrom({ jwks_file: a.local.keys_file }, 'broker.attestors.local.keys_file'), audience, revocations.store))
    users = c.users ? new UserTokenVerifier(keySetFrom(c.users, 'broker.users.jwks_file'), c.users.issuer, c.users.audience, c.users.scope_claim) : undefined
  } catch (err) {
    registry.close()
    keys.stop()
    await revocations.store.close().catch(() => {})
    await events.close()
    throw err
  }

  revocations.onChange((change) => {
    const ts = new Date(now()).toISOString()
    // A change made on another replica was recorded there; here it is only applied.
    if (change.remote) return
    if (change.op === 'revoke') events.emit({ type: 'revocation', ts, op: 'revoke', kind: change.revocation.kind, value: change.revocation.value, reason: change.revocation.reason })
    else events.emit({ type: 'revocation', ts, op: 'unrevoke', kind: change.kind, value: change.value, reason: change.expired ? 'expired' : null })
  })
  // jti and task revocations outlive every token they could match only so long (RevocationList.prune).
  // So are the jtis of single-use local attestations, once no broker would take them (their exp
  // + skew, recorded) and another replica's clock, up to the skew behind, would not either.
  const prune = () =>
    Promise.all([
      revocations.prune(now()).then(
        (n) => void (n > 0 && log.info({ pruned: n }, 'expired jti/task revocations forgotten')),
        (err: unknown) => log.warn({ reason: storeCause(err) }, 'revocation pruning failed: store unavailable'),
      ),
      revocations.store.pruneUsed(now() - MAX_SKEW_S * 1000).catch((err: unknown) => log.warn({ reason: storeCause(err) }, 'single-use jti pruning failed: store unavailable')),
    ])
  await prune()
  const pruning = setInterval(() => void prune(), PRUNE_EVERY_MS)
  pruning.unref()

  for (const [aud, variable] of Object.entries(c.leased_secrets)) {
    if (!env[variable]) throw new Error(`broker.leased_secrets["${aud}"]: environment variable ${variable} is not set`)
  }
  const exchange = new TokenExchange({
    issuer: c.issuer,
    registry: () => registry.current,
    attestors,
    users,
    keys,
    revocations,
    events,
    floorS: c.tokens.floor_s,
    defaultDurationS: c.tokens.default_duration_s,
    now,
    leasedSecrets: new Map(Object.entries(c.leased_secrets).flatMap(([aud, variable]) => (env[variable] ? [[aud, env[variable]!] as [string, string]] : []))),
  })
  const introspectionClients = new Map<string, string>()
  for (const [id, variable] of Object.entries(c.introspection_clients)) {
    const secret = env[variable]
    if (secret) introspectionClients.set(id, secret)
  }
  let closing = false
  const listenTls = c.listen.tls ? readServerTls('broker.listen.tls', c.listen.tls) : null
  const { server } = createBrokerServer({
    issuer: c.issuer,
    exchange,
    introspection: new Introspection(keys, c.issuer, revocations, now),
    keys,
    revocations,
    maxBodyBytes: c.tokens.max_body_bytes,
    adminToken: env[c.admin_token_env] || undefined,
    introspectionClients,
    ready: () => !closing,
    tls: listenTls,
    log,
    agentReach: (value) => ({ registered: registryHas(registry.current, value), connected: ctl ? ctl.server.connectedFor(value) : null }),
  })
  server.keepAliveTimeout = 5_000
  // Set before the server listens: agentReach reads it only when answering.
  const ctl = c.control ? await startControl(c, env, log, revocations, events, now) : undefined
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(c.listen.port, c.listen.host, () => resolve())
    })
  } catch (err) {
    await ctl?.close()
    throw listenError('broker.listen', c.listen.host, c.listen.port, err)
  }
  const addr = server.address() as AddressInfo
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address
  const scheme = c.listen.tls ? 'https' : 'http'
  log.info({ url: `${scheme}://${host}:${addr.port}`, issuer: c.issuer, attestors: attestors.map((x) => x.kind) }, 'broker listening')
  return {
    url: `${scheme}://${host}:${addr.port}`,
    issuer: c.issuer,
    keys,
    revocations,
    registry,
    events,
    controlAddress: ctl?.address,
    control: ctl?.server,
    policy: ctl?.policy,
    bus: ctl?.bus,
    close: async () => {
      closing = true
      clearInterval(pruning)
      await ctl?.close()
      registry.close()
      keys.stop()
      await new Promise<void>((resolve) => {
        server.close(() => resolve())
        server.closeIdleConnections()
      })
      await revocations.store.close()
      await events.close()
    },
  }
}

async function startControl(c: BrokerConfig, env: NodeJS.ProcessEnv, log: Logger, revocations: RevocationList, events: BrokerEvents, now: () => number) {
  const cc = c.control!
  const { ControlServer } = await import('./control/server.js')
  const { PolicyBundleHolder } = await import('./control/policy.js')
  const tls = cc.tls ? readServerTls('broker.control.tls', cc.tls) : null
  const policy = cc.policy_file
    ? policyHolder(() => new PolicyBundleHolder(cc.policy_file!, cc.max_bundle_bytes, (r) => {
        const ts = new Date(now()).toISOString()
        if (!r.ok) {
          events.emit({ type: 'policy.rejected', ts, reason: r.reason })
          return
        }
        if (r.widened.length > 0) events.emit({ type: 'policy.widened', ts, agent_type: '*', audience: '(sidecar policy)', added: r.widened })
        server.broadcastPolicy({ version: r.bundle.version, document: r.document })
      }))
    : undefined
  policy?.watch()
  const server: ControlServer = new ControlServer({
    host: cc.host,
    port: cc.port,
    tls,
    token: env[cc.token_env] || undefined,
    heartbeatMs: cc.heartbeat_ms,
    revocations,
    policy: () => (policy?.current ? { version: policy.current.bundle.version, document: policy.current.document } : undefined),
    log,
  })
  if (!env[cc.token_env]) log.warn({ env: cc.token_env }, 'broker.control: no control token in the environment; every sidecar stream will be refused')
  const port = await server.start()
  const bus = cc.nats ? await (await import('./control/nats.js')).RevocationBus.open({ servers: cc.nats.servers, stream: cc.nats.stream, subject: cc.nats.subject }, revocations, log) : undefined
  const resync = setInterval(() => {
    revocations.resync().catch((err: unknown) => log.warn({ reason: storeCause(err) }, 'revocation resync failed: store unavailable'))
  }, cc.resync_ms)
  resync.unref()
  const host = cc.host.includes(':') ? `[${cc.host}]` : cc.host
  log.info({ address: `${host}:${port}`, policy: policy?.current?.bundle.version ?? null, nats: !!bus }, 'broker control stream listening')
  return {
    address: `${host}:${port}`,
    server,
    policy,
    bus,
    close: async () => {
      clearInterval(resync)
      policy?.close()
      await bus?.close()
      await server.close()
    },
  }
}

/**
 * Whether any type of the registry can have an instance the agent value (an ID or a pattern with
 * `*` segments) names: its type and env segments, agent:<type>:<env>:<instance>.
 */
export function registryHas(registry: Registry, value: string): boolean {
  const [, type, env] = value.split(':')
  return Object.entries(registry.agents).some(([name, spec]) => (type === '*' || type === name) && (env === '*' || env === spec.env))
}

/** broker.control.policy_file's first read: a file it cannot read or compile stops the start in one line naming the setting. */
function policyHolder(open: () => PolicyBundleHolder): PolicyBundleHolder {
  try {
    return open()
  } catch (err) {
    if ((err as { code?: unknown }).code !== 'LK_POLICY_BUNDLE_INVALID') throw err
    throw Object.assign(new Error(`broker.control.policy_file ${(err as Error).message}`), { code: 'LK_STARTUP' })
  }
}
