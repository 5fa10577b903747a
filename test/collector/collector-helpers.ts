// A real collector for tests: gRPC on an ephemeral port, SQLite in a temp dir (or a store given),
// logs captured so tests can assert what was (and was not) logged.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { credentials, Metadata } from '@grpc/grpc-js'
import { AuditIngestServiceClient } from '../../protos/gen/latchkey/v1/audit.js'
import { validateCollectorConfig, type CollectorConfig } from '../../collector/config.js'
import { startCollector, type CollectorOptions, type RunningCollector } from '../../collector/collector.js'

export interface SidecarIdentity {
  id: string
  token: string
}

export function sidecarIdentity(id = 'sidecar-' + randomBytes(3).toString('hex')): SidecarIdentity {
  return { id, token: 'LKCANARY' + randomBytes(16).toString('hex') }
}

export function sha256hex(s: string): string {
  return createHash('sha256').update(s).digest('hex')
}

export interface TestCollector extends RunningCollector {
  logs: string[]
  dir: string
  config: CollectorConfig
}

export async function startTestCollector(
  sidecars: SidecarIdentity[],
  o: { store?: CollectorOptions['store']; dbPath?: string; grpcPort?: number; fanOut?: CollectorOptions['fanOut']; raw?: Record<string, unknown> } = {},
): Promise<TestCollector> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-collector-'))
  const config = validateCollectorConfig({
    version: 1,
    collector: {
      grpc: { host: '127.0.0.1', port: o.grpcPort ?? 0 },
      http: { host: '127.0.0.1', port: 0 },
      store: { kind: 'sqlite', path: o.dbPath ?? join(dir, 'audit.db') },
      sidecars: sidecars.map((s) => ({ id: s.id, token_sha256: sha256hex(s.token) })),
      ...o.raw,
    },
    log: { level: 'info' },
  })
  const logs: string[] = []
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logs.push(chunk.toString())
      cb()
    },
  })
  const c = await startCollector(config, { logDestination: dest, store: o.store, fanOut: o.fanOut })
  return { ...c, logs, dir, config }
}

export function ingestClient(address: string): AuditIngestServiceClient {
  return new AuditIngestServiceClient(address, credentials.createInsecure())
}

export function authMetadata(s: SidecarIdentity): Metadata {
  const md = new Metadata()
  md.set('x-latchkey-sidecar', s.id)
  md.set('authorization', `Bearer ${s.token}`)
  return md
}
