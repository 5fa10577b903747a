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
import { CollectorAuditSink, type CollectorSinkOptions } from '../../proxy/audit/collector-sink.js'
import type { AuditEvent as SidecarAuditEvent } from '../../proxy/context.js'

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
  o: { store?: CollectorOptions['store']; dbPath?: string; grpcPort?: number; fanOut?: CollectorOptions['fanOut']; storeRetryMs?: number; raw?: Record<string, unknown> } = {},
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
  const c = await startCollector(config, { logDestination: dest, store: o.store, fanOut: o.fanOut, storeRetryMs: o.storeRetryMs })
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

/**
 * A collector sink as the sidecar builds one, for `id`, spooling to a fresh directory (or
 * `o.spoolDir`): the defaults every sink test starts from, `o` what the test is about.
 */
export function testSink(id: SidecarIdentity, address: string, o: Partial<CollectorSinkOptions> = {}): CollectorAuditSink {
  return new CollectorAuditSink({
    address,
    sidecarId: id.id,
    token: () => id.token,
    tls: null,
    spoolDir: join(mkdtempSync(join(tmpdir(), 'lk-sink-')), 'spool'),
    segmentBytes: 1 << 20,
    maxBytes: 8 << 20,
    onFull: 'refuse',
    batchEvents: 1000,
    backoffMinMs: 20,
    backoffMaxMs: 200,
    closeTimeoutMs: 2000,
    ...o,
  })
}

/** The sidecar's record of call `n` (GET /call/n, allowed, 200); `o` changes what the test needs. */
export function sidecarEvent(n: number, o: Partial<SidecarAuditEvent> = {}): SidecarAuditEvent {
  return {
    id: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
    ts: new Date().toISOString(),
    agent: 'agent:summarizer:test:a1',
    task: null,
    user: null,
    via: 'absolute',
    method: 'GET',
    scheme: 'http',
    host: '127.0.0.1',
    port: 80,
    path: `/call/${n}`,
    destination: null,
    address: '127.0.0.1',
    status: 200,
    bytes_in: 0,
    bytes_out: 2,
    duration_ms: 1,
    upstream_ms: 1,
    decision: 'allow',
    rule: 'r',
    reason: null,
    credential: null,
    error: null,
    caller: null,
    ...o,
  }
}
