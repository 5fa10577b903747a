// Assembles the sidecar from a validated config: every stage is built once here, at start-up,
// so the request path only uses what is ready. Also owns the orderly shutdown.
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { networkInterfaces } from 'node:os'
import ipaddr from 'ipaddr.js'
import { processIp } from '../lib/ip-address.js'
import type { DestinationStream } from 'pino'
import type { Config } from '../lib/config/schema.js'
import { envOverrides } from '../lib/config/load.js'
import { createLogger, type Logger } from '../lib/log.js'
import { Pipeline } from './pipeline.js'
import { Policy } from './policy/policy.js'
import { CredentialBindings } from './credentials/bindings.js'
import { StaticSecretSource, type SecretsReload } from './credentials/static-source.js'
import { SecretsFileWatcher, signature as secretsSignature } from './credentials/secrets-reload.js'
import { TaskIdentifier } from './identify/proxy-authorization.js'
import { TaskRegistry } from './tasks/registry.js'
import { handleTaskApi } from './tasks/api.js'
import { CredentialSources } from './credentials/sources.js'
import type { WorkloadEvidence } from './attest/evidence.js'
import { CachedTokenSource, type BrokerTokenSource } from './credentials/broker-source.js'
import type { CollectorAuditSink } from './audit/collector-sink.js'
// Providers, evidence and the collector stream are imported when configured (see startSidecar):
// they bring jose and gRPC, memory a sidecar that does not use them should not carry.
import { PeerProcessResolver } from './identify/peer-process.js'
import { PinnedPools } from './forward/pools.js'
import { JsonlAuditSink } from './audit/jsonl-sink.js'
import { SidecarMetrics } from './metrics.js'
import { createListener } from './listen/server.js'
import { goAway } from './listen/websocket-close.js'
import { ownHosts } from './listen/local-caller.js'
import { createAdminServer, MAX_ADMIN_CONNECTIONS } from './admin.js'
import { capEvictingIdle, capProxyConnections, oncePer, openFileLimit } from './listen/cap.js'
import { compileNetworkPolicy } from './resolve/network-policy.js'
import { DnsResolver } from './resolve/resolver.js'
import type { AuditSink, Resolver } from './context.js'
import { PolicySwitch } from './policy/switch.js'
import { DEFAULT_MAX_BUNDLE_BYTES, type CompiledBundle } from './policy/bundle.js'
import { readPolicyText, watchPolicyFile } from './policy/file.js'
import { StartupError, auditFileProblem, loadCaFile, loadPolicyFile, loadUpstreamTrust, unsendableSecrets } from './preflight.js'
import { listenError } from '../lib/listen-error.js'
import type { ControlClient } from './control/client.js'
import type { KnownRevocation } from './control/state.js'
import { readSettingFile } from '../lib/setting-file.js'

export interface SidecarOptions {
  env?: NodeJS.ProcessEnv
  logDestination?: DestinationStream
  /** Replaces the JSON-lines sink (later: the gRPC stream to the collector). */
  audit?: AuditSink
  resolver?: Resolver
  /** A clock for tasks and token lifetimes (tests); Date.now otherwise. */
  now?: () => number
  /** Replaces the configured workload evidence (tests of evidence faults). */
  evidence?: WorkloadEvidence
  /** Reload sidecar.policy_file on SIGHUP (the CLI sets it; several sidecars in one process should not). */
  reloadOnSighup?: boolean
}

export interface RunningSidecar {
  proxyUrl: string
  adminUrl: string
  port: number
  adminPort: number
  log: Logger
  metrics: SidecarMetrics
  audit: AuditSink
  tasks: TaskRegistry
  brokerTokens: BrokerTokenSource | undefined
  /** The control stream client, when sidecar.control is set. */
  control: ControlClient | undefined
  policy: PolicySwitch
  /** Re-reads sidecar.policy_file (what a change or SIGHUP does): validated, then swapped, or rejected whole. */
  reloadPolicy(): { ok: true; version: string } | { ok: false; reason: string }
  /** Re-reads secrets.file (what a change or SIGHUP does): swapped whole, or rejected and the set in force kept. */
  reloadSecrets(): Promise<SecretsReload>
  /**
   * Stop accepting, let in-flight calls finish (up to drain_ms), flush the audit, close.
   * `urgent` (again or at once): no more waiting for calls; what is open is cut, recorded, flushed.
   */
  close(urgent?: boolean): Promise<void>
}

export { StartupError }

/** Resolves once every relay in `streams` has closed (each deletes itself once recorded), or after `ms`. */
async function streamsClosed(streams: ReadonlySet<unknown>, ms: number): Promise<void> {
  const until = Date.now() + ms
  while (streams.size > 0 && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 5))
}

/** Listens, or fails start-up with a line that names the setting and the cause (a port in use). */
async function listening(server: import('node:net').Server, host: string, port: number, setting: string): Promise<void> {
  server.listen(port, host)
  try {
    await once(server, 'listening')
  } catch (err) {
    throw listenError(setting, host, port, err)
  }
}

/** A static secret shorter than this is warned of at start-up (see the scrub). */
const SHORT_SECRET = 16

export async function startSidecar(config: Config, opts: SidecarOptions = {}): Promise<RunningSidecar> {
  const sc = config.sidecar
  const log = createLogger(config.log.level, 'latchkey-sidecar', opts.logDestination)
  const metrics = new SidecarMetrics()

  const bindings = new CredentialBindings(config.credentials)
  const staticBindings = config.credentials.filter((c) => c.source === 'static')
  const clientSecretNames = config.credentials.flatMap((c) => (c.source === 'client_credentials' && c.oauth ? [c.oauth.client_secret] : []))
  // Taken before the file is read: a change while the sidecar starts is read at the first poll.
  const secretsAtStart = config.secrets.file ? await secretsSignature(config.secrets.file) : ''
  // The collector's and the control stream's tokens come from the same source: a reload swaps them
  // with the credentials' secrets, and each new stream sends the token in force.
  const tokenNames = [config.audit.collector?.token_secret, sc.control?.token_secret].filter((n): n is string => !!n)
  const secrets = new StaticSecretSource(config.secrets, [...staticBindings.map((c) => c.secret!), ...clientSecretNames, ...tokenNames], opts.env ?? process.env)
  // Every response on a credential's origin is scrubbed of its secret wherever it appears: a short
  // one (`abc`) is also ordinary text, masked in every body that happens to hold it.
  for (const c of staticBindings) {
    const length = secrets.secret(c.secret!)?.length ?? 0
    if (length > 0 && length < SHORT_SECRET) {
      log.warn({ credential: c.id, secret_name: c.secret, length }, `the secret of credential "${c.id}" is ${length} characters: responses from its origin have those characters masked wherever they occur, as they would the secret; use one of at least ${SHORT_SECRET}`)
    }
  }
  // A client secret too: said as a static one is (empty, or in neither place), before its issuer is made.
  const missing = [
    ...staticBindings.map((c) => [c.id, c.secret!] as const),
    ...config.credentials.flatMap((c) => (c.source === 'client_credentials' && c.oauth ? [[c.id, c.oauth.client_secret] as const] : [])),
  ].filter(([, name]) => !secrets.has(name))
  if (missing.length > 0) throw new StartupError(missing.map(([id, name]) => `credential "${id}": ${secrets.missing(name)}`).join('\n'))
  // A header carries bytes, not text: a secret a header cannot hold would fail every call (undici
  // refuses it) instead of failing here. Basic base64-encodes and query percent-encodes any text.
  const unsendable = unsendableSecrets(config, secrets)
  if (unsendable.length > 0) throw new StartupError(unsendable.map((p) => p.message).join('\n'))

  // The trust for every TLS client of the sidecar's own (upstreams, the broker, token_url).
  const upstreamCa = loadUpstreamTrust(config)

  const cc = config.audit.collector
  if (!cc) {
    const problem = auditFileProblem(config.audit.jsonl.path)
    if (problem) throw new StartupError(`audit.jsonl.path ${problem}`)
  }
  const collectorTokenName = cc?.token_secret
  if (collectorTokenName && !secrets.has(collectorTokenName)) throw new StartupError(`audit.collector: ${secrets.missing(collectorTokenName)}`)
  const readTls = (t: { ca_file: string; cert_file: string; key_file: string }) => ({
    ca: Buffer.from(loadCaFile('audit.collector.tls.ca_file', t.ca_file).join('\n')),
    cert: readSettingFile('audit.collector.tls.cert_file', t.cert_file),
    key: readSettingFile('audit.collector.tls.key_file', t.key_file),
  })
  const CollectorSink = cc ? (await import('./audit/collector-sink.js')).CollectorAuditSink : undefined
  const openCollectorSink = (o: ConstructorParameters<typeof CollectorAuditSink>[0]) => {
    try {
      return new CollectorSink!(o)
    } catch (err) {
      // The spool's own refusals name its directory; a file system's or SQLite's (the lock) do not.
      const e = err as { code?: unknown; message?: string }
      const system = typeof e.code === 'string' && e.code !== 'LK_SPOOL'
      throw new StartupError(system ? `audit.collector.spool_dir ${o.spoolDir}: cannot use it as the audit spool (${e.message ?? e.code})` : `audit.collector: ${(err as Error).message}`)
    }
  }
  const audit: AuditSink =
    opts.audit ??
    (cc
      ? openCollectorSink({
          address: cc.address,
          sidecarId: cc.sidecar_id,
          // Read at each connect; a reload never leaves it missing (one that would is refused).
          token: collectorTokenName ? () => secrets.secret(collectorTokenName)! : null,
          tls: cc.tls ? readTls(cc.tls) : null,
          spoolDir: cc.spool_dir,
          segmentBytes: cc.segment_bytes,
          maxBytes: cc.spool_max_bytes,
          onFull: cc.on_full,
          batchEvents: cc.batch_events,
          backoffMinMs: cc.backoff_min_ms,
          backoffMaxMs: cc.backoff_max_ms,
          closeTimeoutMs: cc.close_timeout_ms,
          onLog: (level, fields, msg) => log[level](fields, msg),
        })
      : null) ??
    new JsonlAuditSink(config.audit.jsonl.path, config.audit.jsonl.flush_ms, (err) => {
      metrics.auditFailures.inc()
      log.error({ code: err.code, path: config.audit.jsonl.path, ...(err.code === 'LK_AUDIT_STALLED' ? { reason: err.message } : {}) }, 'audit sink write failed')
    }, undefined, () => log.info('audit sink writes again: what was kept meanwhile is written'))

  const now = opts.now ?? Date.now
  // jose reads a task token's `sub` and delegation claims (unverified: the broker verifies), only where a broker is configured.
  const readClaims = sc.broker ? (await import('jose')).decodeJwt : undefined
  const tasks = new TaskRegistry(sc.agent_id, {
    readClaims,
    maxDurationS: config.tasks.max_duration_s,
    default: config.tasks.default.enabled ? { durationS: config.tasks.default.duration_s, purpose: config.tasks.default.purpose } : undefined,
    now,
  })
  let brokerTokens: BrokerTokenSource | undefined
  if (sc.broker) {
    const a = sc.attestation
    const brokerAudience = sc.broker.url.replace(/\/$/, '')
    const evidence: WorkloadEvidence | undefined =
      opts.evidence ??
      (a.kubernetes
        ? new (await import('./attest/kubernetes-token.js')).KubernetesTokenFile(a.kubernetes.token_file)
        : a.spiffe
          ? new (await import('./attest/spiffe-workload.js')).SpiffeWorkloadEvidence(a.spiffe.socket, a.spiffe.audience ?? brokerAudience, sc.broker.timeout_ms, { spiffeId: a.spiffe.spiffe_id })
          : a.local
            ? new (await import('./attest/local-key.js')).LocalKeyEvidence(a.local.key_file, sc.agent_id, a.local.audience ?? brokerAudience)
            : undefined)
    const { BrokerClient } = await import('./credentials/broker-client.js')
    if (!evidence) throw new StartupError('sidecar.broker is set but no workload evidence is configured (sidecar.attestation)')
    brokerTokens = new CachedTokenSource(new BrokerClient(sc.broker.url, sc.broker.timeout_ms, evidence, upstreamCa), {
      minRemainingMs: sc.broker.min_remaining_ms,
      now,
      onExchange: (outcome) => metrics.tokenExchanges.inc({ outcome }),
      onRefreshFailed: (reason) => log.warn({ reason }, 'token refresh failed; the current token is still valid'),
      mintRefusal: () => control?.staleReason() ?? null,
      onActorMismatch: (configured, attested, reason) =>
        log.error({ agent_id: configured, attested_agent: attested, reason }, 'the broker attested another agent than sidecar.agent_id: its tokens are refused'),
    })
    tasks.onEnd((t) => brokerTokens!.dropTask(t.id))
  }
  metrics.taskCount = () => tasks.size
  tasks.start()
  let clientCredentials: CachedTokenSource | undefined
  if (clientSecretNames.length > 0) {
    const { ClientCredentialsIssuer } = await import('./credentials/client-credentials.js')
    let issuer: InstanceType<typeof ClientCredentialsIssuer>
    try {
      issuer = new ClientCredentialsIssuer(config.credentials, (name) => secrets.secret(name), sc.broker?.timeout_ms ?? 3000, upstreamCa)
    } catch (err) {
      throw new StartupError(`${(err as Error).message} (neither in env ${config.secrets.env_prefix}<NAME> nor in secrets.file)`)
    }
    clientCredentials = new CachedTokenSource(issuer, {
      minRemainingMs: sc.broker?.min_remaining_ms ?? 5000,
      now,
      onExchange: (outcome) => metrics.tokenExchanges.inc({ outcome: `client_credentials:${outcome}` }),
      onRefreshFailed: (reason) => log.warn({ reason }, 'client-credentials refresh failed; the current token is still valid'),
      mintRefusal: () => control?.staleReason() ?? null,
    })
  }
  const callers =
    sc.callers.identify || sc.callers.allowed_uids.length > 0 || sc.callers.allowed_executables.length > 0
      ? new PeerProcessResolver({ allowedUids: sc.callers.allowed_uids, allowedExecutables: sc.callers.allowed_executables })
      : undefined
  const credentialSources = new CredentialSources(secrets, brokerTokens, clientCredentials)
  if (CollectorSink && audit instanceof CollectorSink) (await import('./audit/collector-metrics.js')).registerCollectorSinkMetrics(metrics.registry, audit)
  else if (audit instanceof JsonlAuditSink) metrics.watchJsonlSink(audit)

  const initialPolicy: CompiledBundle | undefined = loadPolicyFile(config)
  const controlTokenName = sc.control?.token_secret
  if (controlTokenName && !secrets.has(controlTokenName)) throw new StartupError(`sidecar.control: ${secrets.missing(controlTokenName)}`)
  const routes = new Map(Object.entries(config.routes).map(([name, origin]) => [name, new URL(origin)]))
  const networkPolicy = compileNetworkPolicy(config.network)
  // Upstream sockets share max_connections' budget: with the agents' own, two descriptors a
  // connection, as the start-up check below assumes. A dial past it, none idle, is a 503.
  const upstreamLimitLogDue = oncePer(10_000)
  const pools = new PinnedPools(sc.timeouts, sc.max_pools, upstreamCa, {
    max: sc.max_connections,
    onRefused: (max) => {
      if (upstreamLimitLogDue()) log.warn({ max_connections: max }, `upstream connections at their limit of ${max} (sidecar.max_connections), none idle: new dials are refused with 503 LK_UPSTREAM_LIMIT`)
    },
  })
  metrics.upstreamCount = () => ({ pooled: pools.pooled, relayed: pools.relayed })
  const pipeline = new Pipeline({
    identifier: new TaskIdentifier(sc.agent_id, tasks, config.tasks.required),
    callers,
    decider: initialPolicy?.compiled ?? new Policy(config.policy),
    resolver: opts.resolver ?? new DnsResolver(networkPolicy, {
        cacheMs: config.network.dns_cache_ms,
        negativeCacheMs: config.network.dns_negative_cache_ms,
        timeoutMs: sc.timeouts.dns_ms,
        maxLookups: config.network.dns_max_lookups,
      }),
    bindings,
    credentials: credentialSources,
    pools,
    routes,
    audit,
    log,
    metrics,
    namedHosts: sc.allow_remote_clients,
    bodyGapMs: sc.timeouts.body_ms,
    headersMs: sc.timeouts.headers_ms,
  })
  // A task's egress ends with the task: streams, tunnels and WebSockets it opened are cut when it
  // is ended or expires, not left running on a credential that was scoped to it. (Not at shutdown:
  // the drain has already ended those.)
  let stopping = false
  tasks.onEnd((t, why) => {
    if (stopping) return
    const cut = pipeline.cut((id) => id.taskId === t.id, 'LK_TASK_ENDED', 'the task ended')
    const pools = pipeline.stages.pools.closeTask(t.id)
    // One the broker refused as it opened was never announced: no "ended" for it either.
    if (!t.pending) log.info({ task: t.id, why, connections_cut: cut, pools_closed: pools }, 'task ended')
  })
  // The task's ID is what calls are audited under; these lines say what it was (never its handle).
  tasks.onOpen((t) => log.info({ task: t.id, purpose: t.purpose, user: t.userSub, expires_at: new Date(t.expiresAt).toISOString() }, 'task opened'))

  const policy = new PolicySwitch(pipeline.stages, initialPolicy?.version ?? 'config', sc.control?.max_bundle_bytes ?? DEFAULT_MAX_BUNDLE_BYTES, log, metrics.registry, initialPolicy?.policy ?? config.policy)
  policy.onSwap = (decider) => {
    const cut = pipeline.cutDenied(decider)
    if (cut > 0) log.warn({ version: policy.version, connections_cut: cut }, 'open tunnels and WebSockets the new policy denies were cut')
  }
  const reloadPolicy = (): { ok: true; version: string } | { ok: false; reason: string } => {
    if (!sc.policy_file) return { ok: false, reason: 'no sidecar.policy_file is configured' }
    const read = readPolicyText(sc.policy_file, sc.control?.max_bundle_bytes ?? DEFAULT_MAX_BUNDLE_BYTES)
    if (!read.ok) {
      policy.rejected = { source: 'file', version: null, reason: read.reason }
      log.error({ reason: read.reason }, 'policy file reload failed; the policy in force is kept')
      return { ok: false, reason: read.reason }
    }
    return policy.offer(read.text, 'file', sc.policy_file)
  }
  // secrets.file read again when its stat changes (a Kubernetes Secret's `..data` swap) and on
  // SIGHUP: swapped whole, or refused with one line (start-up's reason, quoting nothing of the file).
  const onSecretsReload = (r: SecretsReload, why: 'changed' | 'sighup') => {
    metrics.secretsReloads.inc({ outcome: r.outcome })
    if (r.outcome === 'rejected') log.warn({ secrets_file: config.secrets.file, trigger: why, reason: r.reason }, 'secrets.file reload rejected; the secrets in force are kept')
    else if (r.outcome === 'changed') log.info({ secrets_file: config.secrets.file, trigger: why, secrets_changed: r.changed }, 'secrets.file reloaded: changed secrets are sent from the next call')
  }
  // Started once the sidecar listens (a start-up that fails leaves no timer behind).
  let secretsWatcher: SecretsFileWatcher | undefined = undefined
  const reloadSecrets = async (): Promise<SecretsReload> => {
    if (secretsWatcher) return secretsWatcher.reloadNow()
    return { outcome: 'rejected', reason: 'no secrets.file is configured' }
  }
  const policyWatcher = sc.policy_file && sc.policy_watch ? watchPolicyFile(sc.policy_file, () => void reloadPolicy()) : undefined
  // SIGHUP: the policy file read again, and the audit file opened anew (after a log rotation).
  const onSighup = () => {
    audit.reopen?.()
    // Said either way: an operator who sent it learns it arrived, and what the policy file gave.
    const reloaded = sc.policy_file ? reloadPolicy() : null
    // Logged by onSecretsReload when it is done (a read after any poll's in progress).
    if (secretsWatcher) void secretsWatcher.reloadNow()
    log.info({ audit_file: audit.reopen ? config.audit.jsonl.path : null, policy_file: sc.policy_file ?? null, policy_version: policy.version, policy_reload: reloaded === null ? null : reloaded.ok ? 'read' : reloaded.reason }, 'SIGHUP: the audit file opened anew and the policy file read again')
  }
  if (opts.reloadOnSighup) process.on('SIGHUP', onSighup)

  // Created (not yet listening) before the control stream starts: a revocation it delivers,
  // even one reloaded from the state file, closes this server's idle connections.
  const { server, openStreams, closeIdleConnections, closeUnused, connections, heldTunnels, inTunnel } = createListener(pipeline, {
    allowRemoteClients: sc.allow_remote_clients,
    clientHeadersTimeoutMs: sc.timeouts.client_headers_ms,
    connectTimeoutMs: sc.timeouts.connect_ms,
    tunnelIdleMs: sc.timeouts.tunnel_idle_ms,
    upstreamHeadersMs: sc.timeouts.headers_ms,
  })
  // A plaintext tunnel's CONNECT stays live (a cut reaches it) but is no call in flight: the requests inside are.
  metrics.liveCount = () => pipeline.live.size - heldTunnels()
  let control: ControlClient | undefined
  if (sc.control) {
    const { ControlClient } = await import('./control/client.js')
    const onRevoked = (r: KnownRevocation) => {
      const t0 = performance.now()
      let tokens = 0
      let cut = 0
      // Upstream pools are per task (forward/pools.ts): the stopped tasks' idle keep-alive sockets
      // are closed with the cut, not left until they idle out. Nothing was to be sent on them, but
      // a revocation is to close what the task holds. A jti's task goes on: its pools stay.
      let pools = 0
      if (r.kind === 'agent') {
        if (!control!.state.appliesToAgent(r)) return
        tokens = (brokerTokens?.dropAll() ?? 0) + (clientCredentials?.dropAll() ?? 0)
        cut = pipeline.cut(() => true)
        pools = pipeline.stages.pools.closeAll()
        // Every connection here is this agent's and none will be served again, so idle keep-alive
        // sockets go too: left open, a revoked agent kept holding the sidecar's descriptors, and
        // only its next request on each learnt of the revocation. Those in plaintext tunnels too
        // (a tunnel to the sidecar itself is no call of its own, so no cut reaches it).
        closeIdleConnections('LK_REVOKED', 'revoked')
      } else {
        // The tasks it stops: the revoked task itself, and any opened with a token derived from the
        // revoked task or jti (lib/delegation.ts); their tokens go and their calls are cut.
        const stopped = new Set(tasks.derivedFrom(r.kind, r.value).map((t) => t.id))
        if (r.kind === 'task') stopped.add(r.value)
        else {
          tokens = brokerTokens?.dropJti(r.value) ? 1 : 0
          // The calls still open on that token stop with it (a stream, an upload, a WebSocket the
          // upstream authenticated by it): left running, they went on sending under a revoked
          // token until they ended by themselves. Only the broker's tokens carry a jti.
          cut = pipeline.cut((_, ctx) => ctx.credential?.id === r.value && (ctx.binding?.source === 'broker' || ctx.binding?.source === 'broker_secret'), 'LK_REVOKED', 'revoked: the token it was sent with (jti) was revoked')
        }
        for (const id of stopped) {
          tokens += brokerTokens?.describe(id).length ?? 0
          brokerTokens?.dropTask(id, r.kind === 'task' && id === r.value ? 'revoked' : 'revoked-delegation')
        }
        if (stopped.size > 0) cut += pipeline.cut((id) => id.taskId !== null && stopped.has(id.taskId))
        for (const id of stopped) pools += pipeline.stages.pools.closeTask(id)
      }
      if (tokens > 0 || cut > 0 || pools > 0 || r.kind === 'agent') log.warn({ kind: r.kind, value: r.value, tokens_dropped: tokens, connections_cut: cut, pools_closed: pools, ms: Math.round((performance.now() - t0) * 1000) / 1000 }, 'revocation applied')
    }
    const { defaultStateFile, RevocationFileError } = await import('./control/persist.js')
    try {
      const t = sc.control.tls
      control = new ControlClient({
        address: new URL(sc.control.url).host,
        tls: t
          ? {
              ca: Buffer.from(loadCaFile('sidecar.control.tls.ca_file', t.ca_file).join('\n')),
              cert: t.cert_file ? readSettingFile('sidecar.control.tls.cert_file', t.cert_file) : null,
              key: t.key_file ? readSettingFile('sidecar.control.tls.key_file', t.key_file) : null,
              serverName: t.server_name ?? null,
            }
          : null,
        token: () => secrets.secret(controlTokenName!)!,
        agentId: sc.agent_id,
        staleAfterMs: sc.control.stale_after_ms,
        backoffMinMs: sc.control.backoff_min_ms,
        backoffMaxMs: sc.control.backoff_max_ms,
        maxBundleBytes: sc.control.max_bundle_bytes,
        log,
        metrics: metrics.registry,
        now,
        onRevoked,
        onPolicy: (version, document) => void policy.offer(document, 'control', `policy bundle ${version.slice(0, 80)}`, version),
        policyVersion: () => policy.version,
        stateFile: sc.control.state_file ?? defaultStateFile(config),
      })
    } catch (err) {
      throw err instanceof RevocationFileError ? new StartupError(err.message) : err
    }
    pipeline.stages.revocations = control.state
    control.start()
  }

  let draining = false
  let proxyBase = ''
  const admin = createAdminServer(metrics, {
    ready: () => {
      const reasons: string[] = []
      if (draining) reasons.push('draining')
      if (!server.listening) reasons.push('proxy listener not open')
      const stale = control?.staleReason()
      if (stale) reasons.push(`${stale}: no new tokens are minted`)
      // on_full "refuse": every new call is a 503 until the collector catches up. ("drop" keeps
      // serving, so it stays ready; its drops are in the metrics.)
      if (audit.accepting && !audit.accepting()) reasons.push(audit.unavailableReason?.() ?? 'the audit sink cannot keep more: new egress is refused')
      return { ok: reasons.length === 0, reasons }
    },
  }, { clientHeadersTimeoutMs: sc.timeouts.client_headers_ms, namedHosts: sc.allow_remote_clients }, (req, res, path) =>
    handleTaskApi(
      {
        tasks,
        bindings: bindings.all(),
        credentials: credentialSources,
        describe: (id) => brokerTokens?.describe(id) ?? [],
        proxyUrl: (handle) => `http://task:${handle}@${proxyBase}`,
        checkCaller: callers ? async (req) => callers.check(await callers.resolve(req.socket)) : undefined,
        revokedBy: (task) => control?.state.revokedBy(task) ?? null,
        bodyTimeoutMs: sc.timeouts.client_headers_ms,
      },
      req,
      res,
      path,
    ),
  )

  try {
    await Promise.all([listening(server, sc.listen.host, sc.listen.port, 'sidecar.listen'), listening(admin, sc.admin.host, sc.admin.port, 'sidecar.admin')])
  } catch (err) {
    server.close()
    admin.close()
    metrics.close()
    await audit.close()
    throw err
  }
  secretsWatcher = config.secrets.file
    ? new SecretsFileWatcher(config.secrets.file, secrets, (candidate) => unsendableSecrets(config, candidate)[0]?.message ?? null, onSecretsReload, config.secrets.reload_interval_ms, secretsAtStart)
    : undefined
  capProxyConnections(server, connections, sc.max_connections, inTunnel, metrics, log)
  capEvictingIdle(admin, MAX_ADMIN_CONNECTIONS, metrics, log)
  const fileLimit = openFileLimit()
  if (fileLimit !== null && fileLimit < 2 * sc.max_connections + MAX_ADMIN_CONNECTIONS + 64) {
    log.warn({ open_file_limit: fileLimit, max_connections: sc.max_connections }, 'the open-file limit is below what sidecar.max_connections needs (two descriptors a connection: the agent\'s, and its share of upstream sockets): a flood can still exhaust it; raise the limit or lower the setting')
  }
  const port = (server.address() as AddressInfo).port
  const adminPort = (admin.address() as AddressInfo).port
  const hostAddresses = Object.values(networkInterfaces()).flatMap((list) => (list ?? []).map((i) => i.address))
  pipeline.admin = admin
  pipeline.ownAddress = { hosts: ownHosts(sc.listen.host), port, adminHosts: ownHosts(sc.admin.host), adminPort, hostAddresses: new Set(hostAddresses.flatMap((a) => (ipaddr.isValid(a) ? [processIp(a).toNormalizedString()] : []))) }
  networkPolicy.protectSelf([port, adminPort], hostAddresses)
  const host = sc.listen.host.includes(':') ? `[${sc.listen.host}]` : sc.listen.host
  proxyBase = `${host}:${port}`
  log.info({ port, adminPort, agent: sc.agent_id, rules: (initialPolicy?.policy ?? config.policy).rules.length, credentials: bindings.all().length, env_overrides: envOverrides(config) }, 'sidecar listening')

  let closing: Promise<void> | null = null
  let hurry: (() => void) | null = null
  let urgently = false
  const close = (urgent = false) => {
    // Asked again, urgently (a second SIGTERM): the drain ends now; what is open is cut and recorded.
    if (urgent) {
      urgently = true
      hurry?.()
    }
    return (closing ??= (async () => {
      draining = true
      pipeline.beginDrain()
      log.info({ drainMs: sc.timeouts.drain_ms }, 'draining')
      await control?.close()
      policyWatcher?.close()
      secretsWatcher?.close()
      const closed = new Promise<void>((resolve) => server.close(() => resolve()))
      closeIdleConnections('LK_DRAINING', 'the sidecar shut down while the tunnel was idle')
      closeUnused()
      // A WebSocket never ends by itself: each is closed now, 1001 Going Away, not cut at the deadline.
      goAway(openStreams)
      // drain_ms, or less when a second signal says not to wait (see close's `urgent`).
      const deadline = new Promise<false>((resolve) => {
        hurry = () => resolve(false)
        if (urgently) hurry()
        else setTimeout(hurry, sc.timeouts.drain_ms).unref()
      })
      const drained = await Promise.race([closed.then(() => true), deadline])
      // A relay (tunnel, WebSocket) whose agent hung up is recorded once its upstream side has
      // closed too, a moment later: waited for, so it is recorded as it ended, not as cut.
      if (drained) await streamsClosed(openStreams, 1_000)
      // What is still open at the deadline is cut, and recorded as cut by the shutdown.
      const cutAtDeadline = pipeline.cut(() => true, 'LK_DRAINING', 'the sidecar shut down before the call finished')
      // Said once, with the count: the operator learns what the shutdown did not let finish.
      if (cutAtDeadline > 0) log.warn({ calls_cut: cutAtDeadline, drain_ms: sc.timeouts.drain_ms, cut_short: urgently }, 'shutdown: calls still running at the drain deadline were cut (each recorded LK_DRAINING)')
      server.closeAllConnections()
      for (const s of openStreams) s.destroy()
      // The audit closes only once every relay cut has been recorded.
      await streamsClosed(openStreams, 1_000)
      await pipeline.stages.pools.close()
      stopping = true
      tasks.close()
      await brokerTokens?.close()
      await clientCredentials?.close()
      // Kept through the drain: a logrotate during a rolling deploy reopens the file the drain's
      // events go to. (Removing it at the drain's start left no listener: SIGHUP's default action
      // ended the process, exit 129, its calls in flight never recorded.)
      process.off('SIGHUP', onSighup)
      await audit.close()
      // Connections are closed as the listener is: an idle or half-sent one on the admin port
      // would otherwise hold the shutdown open for as long as its client liked.
      const adminClosed = new Promise<void>((resolve) => admin.close(() => resolve()))
      admin.closeAllConnections()
      await adminClosed
      metrics.close()
      log.info('sidecar stopped')
    })())
  }

  return {
    proxyUrl: `http://${host}:${port}`,
    adminUrl: `http://${sc.admin.host.includes(':') ? `[${sc.admin.host}]` : sc.admin.host}:${adminPort}`,
    port,
    adminPort,
    log,
    metrics,
    audit,
    tasks,
    brokerTokens,
    control,
    policy,
    reloadPolicy,
    reloadSecrets,
    close,
  }
}
