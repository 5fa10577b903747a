// `latchkey up` (what `npm start` runs): the local system on its embedded defaults, in one
// process: the broker (local attestor, SQLite revocations), the collector (SQLite store, its
// query API), the sidecar in front of a demo upstream, its audit streamed to the collector.
import { createHash, randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { dirname, isAbsolute, resolve } from 'node:path'
import { loadConfigFile } from '../lib/config/load.js'
import { createLogger } from '../lib/log.js'
import { listenError } from '../lib/listen-error.js'
import { ensureLocalAttestorKey } from '../lib/local-attestor.js'
import { startSidecar } from '../proxy/sidecar.js'
import { startBroker, type RunningBroker } from '../broker/broker.js'
import { startCollector, type RunningCollector } from '../collector/collector.js'
import { validateCollectorConfig } from '../collector/config.js'
import { startDemoUpstream } from './demo-upstream.js'

export const EXAMPLE_CONFIG = fileURLToPath(new URL('../../deploy/examples/up.yaml', import.meta.url))
/** The collector's query API under `latchkey up`: where `latchkey audit` looks by default. */
const ADMIN_TOKEN_FILE = '.latchkey/broker-admin-token'

export async function runUp(opts: { config: string }): Promise<{ close(urgent?: boolean): Promise<void> }> {
  const configFile = opts.config || EXAMPLE_CONFIG
  const config = loadConfigFile(configFile)
  const env: NodeJS.ProcessEnv = { ...process.env }
  // The demo upstream listens where the config's `demo` route points, so the policy, the route
  // and the credential's audience all name it (15080 in the example).
  const demo = new URL(config.routes.demo ?? 'http://127.0.0.1:15080')
  const upstreamPort = Number(demo.port || 80)
  let broker: RunningBroker | undefined
  let revokeHint = ''
  let adminToken: string | undefined
  if (config.broker) {
    // The local default: one attestor key per installation, trusted by the broker.
    const local = await ensureLocalAttestorKey('.latchkey/local-attestor')
    const b = config.broker
    if (!isAbsolute(b.registry_file)) b.registry_file = resolve(dirname(configFile), b.registry_file)
    if (b.attestors.local) b.attestors.local.keys_file = local.jwksFile
    if (b.control && config.sidecar.control) {
      // A fresh control-stream token per run, shared by the broker and the sidecar.
      const controlToken = randomBytes(32).toString('base64url')
      env[b.control.token_env] = controlToken
      env[`${config.secrets.env_prefix}${config.sidecar.control.token_secret}`] = controlToken
    }
    if (!env[b.admin_token_env]) {
      // So `latchkey revoke` works out of the box: a fresh admin token per run, in a file only
      // this user can read, never printed. Written once all is up (below): a second `up` that
      // fails on busy ports must not replace the token of the one running.
      adminToken = env[b.admin_token_env] = randomBytes(32).toString('base64url')
      revokeHint = `${b.admin_token_env}=$(cat ${resolve(ADMIN_TOKEN_FILE)}) `
    }
    broker = await startBroker(b, { logger: createLogger(config.log.level, 'latchkey-broker'), env })
    // The CLI's defaults name the example's ports: a config that moves them is named, or the hint fails.
    revokeHint += `npx latchkey revoke ${config.sidecar.agent_id}${broker.url === 'http://127.0.0.1:15003' ? '' : ` --broker ${broker.url}`}`
  }
  let collector: RunningCollector | undefined
  const cc = config.audit.collector
  if (cc) {
    // A fresh sidecar token per run: the sidecar holds it, the collector only its hash.
    const token = randomBytes(32).toString('base64url')
    env[`${config.secrets.env_prefix}${cc.token_secret}`] = token
    const [host, port] = [cc.address.slice(0, cc.address.lastIndexOf(':')), Number(cc.address.slice(cc.address.lastIndexOf(':') + 1))]
    collector = await startCollector(
      validateCollectorConfig({
        version: 1,
        collector: {
          grpc: { host, port },
          // The query API on the next port (15101 beside the example's 15100): moving the
          // collector's address moves both, so two `up`s, or one confined to a port range, can run.
          http: { host: '127.0.0.1', port: port + 1 },
          store: { kind: 'sqlite', path: '.latchkey/collector.db' },
          sidecars: [{ id: cc.sidecar_id, token_sha256: createHash('sha256').update(token).digest('hex') }],
        },
        log: { level: config.log.level },
      }),
    )
  }
  // A fresh demo secret per run, held in memory only, for configs that inject a static one.
  const demoSecret = 'lk-demo-' + randomBytes(24).toString('base64url')
  env[`${config.secrets.env_prefix}DEMO_TOKEN`] = demoSecret
  const upstream = await startDemoUpstream('127.0.0.1', upstreamPort, {
    staticAuthorization: `Bearer ${demoSecret}`,
    ...(broker ? { broker: { url: broker.url, issuer: broker.issuer, audience: `http://127.0.0.1:${upstreamPort}` } } : {}),
  }).catch(async (err: NodeJS.ErrnoException) => {
    await Promise.all([collector?.close(), broker?.close()])
    throw listenError('demo upstream (routes.demo)', '127.0.0.1', upstreamPort, err)
  })
  const sidecar = await startSidecar(config, { env })
  if (adminToken !== undefined) writeFileSync(ADMIN_TOKEN_FILE, adminToken + '\n', { mode: 0o600 })
  const proxy = sidecar.proxyUrl
  const line = (label: string, value: string) => `  ${label.padEnd(22)}${value}\n`
  console.log(
    '\nLatchkey is up.\n' +
      line('sidecar (HTTP_PROXY)', proxy) +
      line('sidecar admin', `${sidecar.adminUrl}/metrics  /healthz  /readyz  POST /v1/tasks`) +
      line('demo upstream', `http://127.0.0.1:${upstreamPort}`) +
      (broker ? line('broker', `${broker.url}  (RFC 8693 /oauth2/token, JWKS /.well-known/jwks.json)`) : '') +
      (collector ? line('collector', `${collector.httpUrl ?? ''}  (gRPC ingest ${collector.grpcAddress})`) : '') +
      line('audit trail', collector ? `npx latchkey audit --agent ${config.sidecar.agent_id}${!collector.httpUrl || collector.httpUrl === 'http://127.0.0.1:15101' ? '' : ` --url ${collector.httpUrl}`}` : config.audit.jsonl.path) +
      (revokeHint ? line('revoke the agent', revokeHint) : '') +
      `
Try:
  curl -x ${proxy} http://127.0.0.1:${upstreamPort}/hello           # allowed, credential injected
  curl ${proxy}/demo/hello                                       # the same via a reverse route
  curl -x ${proxy} http://169.254.169.254/latest/meta-data/         # denied: cloud metadata
`,
  )
  return {
    close: async (urgent = false) => {
      await sidecar.close(urgent)
      await collector?.close()
      await broker?.close()
      await new Promise<void>((resolve) => upstream.close(() => resolve()))
    },
  }
}
