// `latchkey up` (what `npm start` runs): the local system on its embedded defaults. For now the
// sidecar with the example policy and a demo upstream; the broker and collector join it as they land.
import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { loadConfigFile } from '../lib/config/load.js'
import { startSidecar } from '../proxy/sidecar.js'
import { startDemoUpstream } from './demo-upstream.js'
import { dirname, isAbsolute, resolve } from 'node:path'
import { startBroker, type RunningBroker } from '../broker/broker.js'
import { ensureLocalAttestorKey } from '../lib/local-attestor.js'
import { createLogger } from '../lib/log.js'

export const EXAMPLE_CONFIG = fileURLToPath(new URL('../../deploy/examples/up.yaml', import.meta.url))

export async function runUp(opts: { config: string; upstreamPort: string }): Promise<{ close(): Promise<void> }> {
  const configFile = opts.config || EXAMPLE_CONFIG
  const config = loadConfigFile(configFile)
  let broker: RunningBroker | undefined
  if (config.broker) {
    // The local default: one attestor key per installation, trusted by the broker.
    const local = await ensureLocalAttestorKey('.latchkey/local-attestor')
    const b = config.broker
    if (!isAbsolute(b.registry_file)) b.registry_file = resolve(dirname(configFile), b.registry_file)
    if (b.attestors.local) b.attestors.local.keys_file = local.jwksFile
    broker = await startBroker(b, { logger: createLogger(config.log.level, 'latchkey-broker') })
  }
  // A fresh demo secret per run, held in memory only: the sidecar injects it, the upstream checks it.
  const demoSecret = 'lk-demo-' + randomBytes(24).toString('base64url')
  const upstreamPort = Number(opts.upstreamPort)
  const upstream = await startDemoUpstream('127.0.0.1', upstreamPort, {
    staticAuthorization: `Bearer ${demoSecret}`,
    ...(broker ? { broker: { url: broker.url, issuer: broker.issuer, audience: `http://127.0.0.1:${upstreamPort}` } } : {}),
  })
  const sidecar = await startSidecar(config, { env: { ...process.env, [`${config.secrets.env_prefix}DEMO_TOKEN`]: demoSecret } })
  const proxy = sidecar.proxyUrl
  console.log(`
Latchkey is up.
  sidecar (HTTP_PROXY)  ${proxy}
  admin                 ${sidecar.adminUrl}/metrics  /healthz  /readyz
  demo upstream         http://127.0.0.1:${upstreamPort}${broker ? `\n  broker                ${broker.url}  (RFC 8693 ${broker.url}/oauth2/token, JWKS ${broker.url}/.well-known/jwks.json)` : ''}
  audit trail           ${config.audit.jsonl.path}

Try:
  curl -x ${proxy} http://127.0.0.1:${upstreamPort}/hello           # allowed, credential injected
  curl ${proxy}/demo/hello                                       # the same via a reverse route
  curl -x ${proxy} http://169.254.169.254/latest/meta-data/         # denied: cloud metadata
`)
  return {
    close: async () => {
      await sidecar.close()
      await broker?.close()
      await new Promise<void>((resolve) => upstream.close(() => resolve()))
    },
  }
}
