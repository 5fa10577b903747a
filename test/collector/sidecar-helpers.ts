// A real sidecar whose audit goes to a collector (the shared harness fixes audit to JSON lines).
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { request, ProxyAgent } from 'undici'
import { validateConfig } from '../../lib/config/load.js'
import type { Config } from '../../lib/config/schema.js'
import { startSidecar, type RunningSidecar } from '../../proxy/sidecar.js'
import type { CollectorAuditSink } from '../../proxy/audit/collector-sink.js'
import { CANARY, loopbackPolicy } from '../helpers/harness.js'
import type { SidecarIdentity } from './collector-helpers.js'
export { freePort } from '../helpers/free-port.js'

export interface CollectedSidecar {
  sidecar: RunningSidecar
  sink: CollectorAuditSink
  config: Config
  logs: string[]
  spoolDir: string
  close(): Promise<void>
}

export function sidecarConfig(o: {
  id: SidecarIdentity
  collector: string
  upstreamPort: number
  spoolDir: string
  collectorOpts?: Record<string, unknown>
  agent?: string
}): Config {
  return validateConfig({
    version: 1,
    ...loopbackPolicy([o.upstreamPort]),
    sidecar: { listen: { port: 0 }, admin: { port: 0 }, agent_id: o.agent ?? 'agent:summarizer:test:a1', timeouts: { drain_ms: 2000 } },
    credentials: [{ id: 'upstream', audience: `http://127.0.0.1:${o.upstreamPort}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
    audit: {
      collector: {
        address: o.collector,
        sidecar_id: o.id.id,
        token_secret: 'COLLECTOR',
        spool_dir: o.spoolDir,
        backoff_min_ms: 20,
        backoff_max_ms: 200,
        close_timeout_ms: 3000,
        ...o.collectorOpts,
      },
    },
    log: { level: 'info' },
  })
}

export async function startCollectedSidecar(o: Omit<Parameters<typeof sidecarConfig>[0], 'spoolDir'> & { spoolDir?: string }): Promise<CollectedSidecar> {
  const spoolDir = o.spoolDir ?? join(mkdtempSync(join(tmpdir(), 'lk-sc-')), 'spool')
  const config = sidecarConfig({ ...o, spoolDir })
  const logs: string[] = []
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logs.push(chunk.toString())
      cb()
    },
  })
  const sidecar = await startSidecar(config, { env: { LATCHKEY_SECRET_CANARY: CANARY, LATCHKEY_SECRET_COLLECTOR: o.id.token }, logDestination: destination })
  return { sidecar, sink: sidecar.audit as CollectorAuditSink, config, logs, spoolDir, close: () => sidecar.close() }
}

/** One call through the sidecar as an agent makes it (absolute-form, HTTP_PROXY); returns the status. */
export async function call(agent: ProxyAgent, url: string): Promise<number> {
  const res = await request(url, { dispatcher: agent })
  await res.body.text()
  return res.statusCode
}

export function proxyAgent(proxyUrl: string): ProxyAgent {
  // Plain-HTTP absolute-form through the proxy (not CONNECT).
  return new ProxyAgent({ uri: proxyUrl, proxyTunnel: false })
}
