// A real broker for tests, started in-process on a real port with a real store, with test
// issuers standing in for the user IdP, the cluster and the SPIFFE trust domain. Its log and
// events are captured so tests can assert that no token ever reaches them.
import { spawnSync } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { stringify } from 'yaml'
import { validateConfig } from '../../lib/config/load.js'
import type { BrokerConfig } from '../../lib/config/schema.js'
import { createLogger } from '../../lib/log.js'
import { startBroker, type RunningBroker } from '../../broker/broker.js'
import type { BrokerEvent } from '../../broker/events.js'
import { ensureLocalAttestorKey, signLocalAttestation, type LocalAttestorKey } from '../../lib/local-attestor.js'
import { GRANT_TYPE } from '../../broker/exchange.js'
import { TOKEN_TYPES } from '../../broker/attest/attestor.js'
import { TestIssuer } from './issuer.js'
import { freePort } from './free-port.js'
import { CLI } from './cli.js'
export { freePort }

export const API = 'https://api.example.com'
export const MAIL = 'https://mail.example.com'
/** An API that takes only a static key: the broker lends it per task. */
export const LEGACY = 'https://legacy.example.com'
export const USER_ISSUER = 'https://idp.example.com'
export const K8S_ISSUER = 'https://kubernetes.default.svc.cluster.local'
export const TRUST_DOMAIN = 'example.org'

/** What the summarizer may get, whichever attestor vouches for it (a fresh copy each: a test may edit one). */
const summarizer = () => ({ env: 'prod', audiences: { [API]: ['read', 'write'], [MAIL]: ['mail.send'], [LEGACY]: [] }, max_lifetime_s: 900, users: 'optional', may_task: ['helper'] })

// One agent type per attestor (the registry refuses a type naming two): the summarizer attested
// locally is agent:summarizer:…, from its pods agent:summarizer-k8s:…, by SPIFFE agent:summarizer-spiffe:….
export const TEST_REGISTRY = {
  version: 1,
  agents: {
    summarizer: { ...summarizer(), match: { local: true } },
    'summarizer-k8s': { ...summarizer(), match: { kubernetes: { namespace: 'agents', service_account: 'summarizer' } } },
    'summarizer-spiffe': { ...summarizer(), match: { spiffe: { path_prefix: '/agents/summarizer' } } },
    helper: { env: 'prod', match: { local: true }, audiences: { [API]: ['read'] }, max_lifetime_s: 300, users: 'optional' },
    loner: { env: 'prod', match: { local: true }, audiences: { [API]: ['read'] }, max_lifetime_s: 600, users: 'none' },
    assistant: { env: 'prod', match: { local: true }, audiences: { [API]: ['read', 'write'] }, max_lifetime_s: 600, users: 'required' },
  },
}

/**
 * `latchkey broker` run as an operator runs it, on `registry` (YAML text) and a config of its own
 * (a temp dir, the local attestor, SQLite unless `store` says otherwise), for a start-up expected
 * to fail: its exit status and stderr, and where the registry was written.
 */
export async function brokerCliStart(registry: string, store?: Record<string, unknown>, broker: Record<string, unknown> = {}): Promise<{ status: number | null; stderr: string; registryFile: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-broker-cli-'))
  const registryFile = join(dir, 'agents.yaml')
  writeFileSync(registryFile, registry)
  const config = join(dir, 'broker.yaml')
  writeFileSync(
    config,
    stringify({
      version: 1,
      broker: {
        issuer: 'http://127.0.0.1:1',
        listen: { host: '127.0.0.1', port: 0 },
        registry_file: registryFile,
        keys: { dir: join(dir, 'keys') },
        attestors: { local: { keys_file: (await ensureLocalAttestorKey(join(dir, 'local'))).jwksFile } },
        store: store ?? { sqlite: { path: join(dir, 'broker.db') } },
        ...broker,
      },
    }),
  )
  const r = spawnSync(process.execPath, [CLI, 'broker', '-c', config], { encoding: 'utf8', timeout: 15_000 })
  return { status: r.status, stderr: r.stderr, registryFile }
}

export interface TestBroker {
  broker: RunningBroker
  url: string
  issuer: string
  dir: string
  registryFile: string
  users: TestIssuer
  k8s: TestIssuer
  spiffe: TestIssuer
  localKey: LocalAttestorKey
  events: BrokerEvent[]
  logs: () => string
  adminToken: string
  introspectionSecret: string
  /** A fresh single-use local attestation for an instance. */
  attest(instanceId: string): Promise<string>
  userToken(sub: string, scope: string, extra?: Record<string, unknown>): Promise<string>
  /** POSTs a form to /oauth2/token; returns status, headers and the parsed body. */
  exchange(params: Record<string, string | string[]>): Promise<{ status: number; headers: Headers; body: Record<string, unknown>; text: string }>
  close(): Promise<void>
}

export async function startTestBroker(
  opts: { registry?: unknown; store?: BrokerConfig['store']; now?: () => number; broker?: Record<string, unknown>; env?: NodeJS.ProcessEnv } = {},
): Promise<TestBroker> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-broker-'))
  const users = await TestIssuer.create(USER_ISSUER, 'RS256')
  const k8s = await TestIssuer.create(K8S_ISSUER)
  const spiffe = await TestIssuer.create(`spiffe://${TRUST_DOMAIN}`)
  const localKey = await ensureLocalAttestorKey(join(dir, 'local'))
  const registryFile = join(dir, 'agents.yaml')
  writeFileSync(registryFile, stringify(opts.registry ?? TEST_REGISTRY))
  const port = await freePort()
  const issuer = `http://127.0.0.1:${port}`
  const config = validateConfig({
    version: 1,
    broker: {
      issuer,
      listen: { host: '127.0.0.1', port },
      registry_file: registryFile,
      users: { issuer: USER_ISSUER, audience: 'latchkey', jwks_file: users.jwksFile },
      attestors: {
        kubernetes: { issuer: K8S_ISSUER, jwks_file: k8s.jwksFile },
        spiffe: { trust_domain: TRUST_DOMAIN, jwks_file: spiffe.jwksFile },
        local: { keys_file: localKey.jwksFile },
      },
      store: opts.store ?? { sqlite: { path: join(dir, 'broker.db') } },
      introspection_clients: { 'api-server': 'LK_TEST_INTROSPECTION_SECRET' },
      ...opts.broker,
      keys: { dir: join(dir, 'keys'), ...((opts.broker?.keys as object | undefined) ?? {}) },
    },
  }).broker!
  let logText = ''
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logText += chunk.toString()
      cb()
    },
  })
  const adminToken = 'admin-' + Math.random().toString(36).slice(2)
  const introspectionSecret = 'introspect-' + Math.random().toString(36).slice(2)
  const broker = await startBroker(config, {
    env: { LATCHKEY_BROKER_ADMIN_TOKEN: adminToken, LK_TEST_INTROSPECTION_SECRET: introspectionSecret, ...opts.env },
    logger: createLogger('info', 'latchkey-broker', sink),
    ...(opts.now ? { now: opts.now } : {}),
  })
  const events: BrokerEvent[] = []
  broker.events.on((e) => events.push(e))
  return {
    broker,
    url: broker.url,
    issuer,
    dir,
    registryFile,
    users,
    k8s,
    spiffe,
    localKey,
    events,
    logs: () => logText,
    adminToken,
    introspectionSecret,
    attest: (instanceId) => signLocalAttestation(localKey, instanceId, issuer),
    userToken: (sub, scope, extra = {}) => users.sign({ sub, aud: 'latchkey', scope, exp: Math.floor(Date.now() / 1000) + 3600, ...extra }),
    async exchange(params) {
      const body = new URLSearchParams()
      for (const [k, v] of Object.entries(params)) for (const x of Array.isArray(v) ? v : [v]) body.append(k, x)
      const res = await fetch(`${broker.url}/oauth2/token`, { method: 'POST', body })
      const text = await res.text()
      let parsed: Record<string, unknown> = {}
      try {
        parsed = JSON.parse(text) as Record<string, unknown>
      } catch {
        // left empty: the test asserts on status and text
      }
      return { status: res.status, headers: res.headers, body: parsed, text }
    },
    close: () => broker.close(),
  }
}

/** A failing assertion's message: the refusal's description, never the response body (it may hold a token). */
export function why(res: { status: number; body: Record<string, unknown> }): string {
  return `status ${res.status}: ${String(res.body.error ?? '')} ${String(res.body.error_description ?? '')}`
}

/** The usual request: the agent acts for a user, one audience. */
export function delegatedRequest(subject: string, actor: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    grant_type: GRANT_TYPE,
    subject_token: subject,
    subject_token_type: TOKEN_TYPES.jwt,
    actor_token: actor,
    actor_token_type: TOKEN_TYPES.local,
    audience: API,
    task_id: 'task-1',
    task_duration: '300',
    ...extra,
  }
}
