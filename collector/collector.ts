// Assembles a collector from its config: the store, the gRPC ingest server, the HTTP query API,
// and (when configured) the JetStream fan-out.
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { Server, ServerCredentials } from '@grpc/grpc-js'
import type { DestinationStream } from 'pino'
import { AuditIngestServiceService } from '../protos/gen/latchkey/v1/audit.js'
import { createLogger, type Logger } from '../lib/log.js'
import type { CollectorConfig, StoreConfig } from './config.js'
import { IngestService } from './ingest.js'
import { decodeIngestRequest } from './wire.js'
import { createQueryServer } from './http.js'
import { createCollectorMetrics } from './metrics.js'
import type { AuditStore, AuditStoreBackend, StoredEvent } from './store/types.js'
import type { PostgresStoreOptions } from './store/postgres.js'
import { JetStreamFanOut } from './fanout.js'
import { listenError } from '../lib/listen-error.js'
import { readServerTls } from '../lib/tls-files.js'
import { postgresWhere, storeStartupError } from '../lib/store-schema.js'
import { envOverrides } from '../lib/config/load.js'
import { watchStoreAtStart } from './store-watch.js'

/** How long start-up waits for the store to answer the schema check before going on without it. */
const SCHEMA_CHECK_WAIT_MS = 5_000

// Each backend opens both ways (AuditStoreBackend): the compiler holds them to it. Only the
// configured one is loaded: pg, loaded for a SQLite store, took Node's fetch implementation in
// with it (it looks for a Cloudflare runtime at import) on every `audit -c` and collector start.
const sqlite = async (): Promise<AuditStoreBackend<string>> => (await import('./store/sqlite.js')).SqliteAuditStore
const postgres = async (): Promise<AuditStoreBackend<PostgresStoreOptions>> => (await import('./store/postgres.js')).PostgresAuditStore
const postgresOptions = (c: Extract<StoreConfig, { kind: 'postgres' }>): PostgresStoreOptions => ({ url: c.url, schema: c.schema, poolSize: c.pool_size, writerRole: c.writer_role, migrate: c.migrate })

/** The collector's own store: created when missing, migrated (see AuditStoreBackend). */
export async function openStore(c: StoreConfig): Promise<AuditStore> {
  return c.kind === 'sqlite' ? new (await sqlite())(c.path) : new (await postgres())(postgresOptions(c))
}

/** A reader's (`latchkey audit -c`): an existing store only, read-only; nothing is created or changed. */
export async function openStoreReadOnly(c: StoreConfig): Promise<AuditStore> {
  return c.kind === 'sqlite' ? (await sqlite()).openReadOnly(c.path) : (await postgres()).openReadOnly(postgresOptions(c))
}

export interface FanOut {
  publish(events: StoredEvent[]): void
  /** Publishes what was stored but not yet published (before ingest starts). */
  catchUp?(store: AuditStore): Promise<number>
  close(): Promise<void>
}

export interface CollectorOptions {
  logDestination?: DestinationStream
  /** Use this store instead of opening the configured one (tests, `latchkey up`). */
  store?: AuditStore
  fanOut?: FanOut
  /** How often a store that did not answer at start is asked again (tests shorten it). */
  storeRetryMs?: number
}

export interface RunningCollector {
  grpcPort: number
  grpcAddress: string
  httpUrl: string | null
  store: AuditStore
  ingest: IngestService
  log: Logger
  close(): Promise<void>
}

export async function startCollector(config: CollectorConfig, opts: CollectorOptions = {}): Promise<RunningCollector> {
  const c = config.collector
  const log = createLogger(config.log.level, 'latchkey-collector', opts.logDestination)
  // The TLS files first: one missing, not PEM, or a key not the certificate's is said in one line naming the setting.
  const tls = c.grpc.tls ? readServerTls('collector.grpc.tls', c.grpc.tls) : null
  // A store that cannot be opened (not a database, a directory that cannot be written) is said in
  // one line naming collector.store and where it is.
  const where = c.store.kind === 'sqlite' ? c.store.path : postgresWhere(c.store.url)
  let store: AuditStore
  try {
    store = opts.store ?? (await openStore(c.store))
  } catch (err) {
    throw storeStartupError('collector.store', where, err)
  }
  let fanOut: FanOut | null
  try {
    // A table of the wrong shape stops the start; a database not reachable yet does not (it is
    // retried, and /readyz says so), nor may one that does not answer hold the start for long.
    let waited: NodeJS.Timeout | undefined
    await Promise.race([
      store.checkSchema().catch((err: unknown) => {
        throw opts.store ? err : storeStartupError('collector.store', where, err)
      }),
      new Promise<void>((resolve) => (waited = setTimeout(resolve, SCHEMA_CHECK_WAIT_MS))),
    ]).finally(() => clearTimeout(waited))
    fanOut = opts.fanOut ?? (c.nats ? await JetStreamFanOut.open(c.nats, log) : null)
    await fanOut?.catchUp?.(store)
  } catch (err) {
    if (!opts.store) await store.close()
    throw err
  }
  const ingest = new IngestService(store, c.sidecars, log, fanOut ? (events) => fanOut.publish(events) : undefined, !!tls, c.grpc.max_clock_skew_ms)
  const serverCreds = tls ? ServerCredentials.createSsl(tls.clientCa, [{ cert_chain: tls.cert, private_key: tls.key }], true) : ServerCredentials.createInsecure()

  const grpc = new Server({ 'grpc.max_receive_message_length': c.grpc.max_batch_bytes })
  // Requests decoded by collector/wire.ts: each event's bytes are stored as received.
  grpc.addService({ ingest: { ...AuditIngestServiceService.ingest, requestDeserialize: decodeIngestRequest } }, ingest.implementation())
  const grpcPort = await new Promise<number>((resolve, reject) =>
    grpc.bindAsync(`${c.grpc.host.includes(':') ? `[${c.grpc.host}]` : c.grpc.host}:${c.grpc.port}`, serverCreds, (err, port) =>
      err ? reject(listenError('collector.grpc', c.grpc.host, c.grpc.port, err)) : resolve(port),
    ),
  )

  let httpUrl: string | null = null
  const http = c.http ? createQueryServer(store, log, c.http.reader_tokens_sha256, undefined, undefined, createCollectorMetrics(ingest, store)) : null
  if (http && c.http) {
    http.listen(c.http.port, c.http.host)
    try {
      await once(http, 'listening')
    } catch (err) {
      grpc.forceShutdown()
      throw listenError('collector.http', c.http.host, c.http.port, err)
    }
    httpUrl = `http://${c.http.host}:${(http.address() as AddressInfo).port}`
  }
  log.info({ grpcPort, httpUrl, store: store.kind, sidecars: c.sidecars.length, nats: !!fanOut, env_overrides: envOverrides(config) }, 'collector listening')
  const stopWatch = watchStoreAtStart(store, log, opts.storeRetryMs)

  let closing: Promise<void> | null = null
  return {
    grpcPort,
    grpcAddress: `${c.grpc.host}:${grpcPort}`,
    httpUrl,
    store,
    ingest,
    log,
    close: () =>
      (closing ??= (async () => {
        stopWatch()
        ingest.closeStreams()
        await new Promise<void>((resolve) => {
          const force = setTimeout(() => grpc.forceShutdown(), 2000)
          grpc.tryShutdown(() => {
            clearTimeout(force)
            resolve()
          })
        })
        if (http) {
          await new Promise<void>((resolve) => http.close(() => resolve()))
          http.closeAllConnections()
        }
        await fanOut?.close()
        if (!opts.store) await store.close()
        log.info('collector stopped')
      })()),
  }
}
