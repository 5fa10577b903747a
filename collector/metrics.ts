// The collector's Prometheus metrics, served at /metrics on its HTTP port (collector.http), read
// at scrape time from the ingest's own counts: nothing is counted twice, and nothing is done per
// batch for them. Labels are the configured sidecar IDs and a fixed set of reasons, never an
// agent, a host or anything a sidecar sent.
import { Counter, Gauge, Registry } from 'prom-client'
import type { IngestService, SidecarSeen } from './ingest.js'
import type { AuditStore } from './store/types.js'

/** How long a scrape waits for the store to answer before latchkey_collector_store_up says 0. */
const STORE_PING_MS = 2_000

export function createCollectorMetrics(ingest: IngestService, store: AuditStore): Registry {
  // No process metrics (prom-client's defaults): their loop-delay sampler wakes the process every
  // 10 ms and misreads an idle loop (see proxy/metrics.ts); the kubelet measures CPU and memory.
  const registry = new Registry()
  const fromStats = (name: string, help: string, read: () => number) => {
    const c: Counter = new Counter({
      name,
      help,
      registers: [registry],
      collect: () => {
        c.reset()
        c.inc(read())
      },
    })
  }
  fromStats('latchkey_collector_batches_total', 'Audit batches stored and acknowledged', () => ingest.stats.batches)
  fromStats('latchkey_collector_events_stored_total', 'Audit events stored (each once: a resent event is a duplicate)', () => ingest.stats.stored)
  fromStats('latchkey_collector_events_duplicate_total', 'Audit events received again after they were stored (a sidecar resending what it had no ack for)', () => ingest.stats.duplicates)
  const refusals: Counter<'reason'> = new Counter({
    name: 'latchkey_collector_refusals_total',
    help: 'Ingest streams and batches not taken, by reason (unauthenticated: a wrong token or unknown sidecar; store_unavailable: the store failed; the sidecar keeps what was refused spooled)',
    labelNames: ['reason'],
    registers: [registry],
    collect: () => {
      refusals.reset()
      for (const [reason, n] of ingest.refusals) refusals.inc({ reason }, n)
    },
  })
  // One series per configured sidecar, set at each scrape from what the ingest saw of it.
  const perSidecar = (kind: 'gauge' | 'counter', name: string, help: string, read: (seen: SidecarSeen) => number) => {
    if (kind === 'gauge') {
      const g: Gauge<'sidecar'> = new Gauge({ name, help, labelNames: ['sidecar'], registers: [registry], collect: () => ingest.sidecars.forEach((seen, sidecar) => g.set({ sidecar }, read(seen))) })
    } else {
      const c: Counter<'sidecar'> = new Counter({
        name,
        help,
        labelNames: ['sidecar'],
        registers: [registry],
        collect: () => {
          c.reset()
          ingest.sidecars.forEach((seen, sidecar) => c.inc({ sidecar }, read(seen)))
        },
      })
    }
  }
  perSidecar('gauge', 'latchkey_collector_sidecar_streams', 'Ingest streams open now, per configured sidecar (0: it is not connected)', (seen) => seen.streams)
  perSidecar('counter', 'latchkey_collector_sidecar_events_stored_total', 'Audit events stored, per configured sidecar', (seen) => seen.stored)
  perSidecar(
    'gauge',
    'latchkey_collector_sidecar_last_batch_timestamp_seconds',
    'When a batch from this sidecar was last stored (Unix seconds; 0: none since the collector started)',
    (seen) => seen.lastBatchMs / 1000,
  )
  const storeUp: Gauge = new Gauge({
    name: 'latchkey_collector_store_up',
    help: `1 if the store answered a ping at this scrape (within ${STORE_PING_MS} ms), else 0: batches are refused and stay spooled on the sidecars`,
    registers: [registry],
    collect: async () => {
      let timer: NodeJS.Timeout | undefined
      const up = await Promise.race([
        store.ping().then(
          () => 1,
          () => 0,
        ),
        new Promise<number>((resolve) => (timer = setTimeout(resolve, STORE_PING_MS, 0))),
      ]).finally(() => clearTimeout(timer))
      storeUp.set(up)
    },
  })
  return registry
}
