// The collector sink's state on the sidecar's /metrics, read at scrape time.
import { Counter, Gauge, type Registry } from 'prom-client'
import type { CollectorAuditSink } from './collector-sink.js'

export function registerCollectorSinkMetrics(registry: Registry, sink: CollectorAuditSink): void {
  const dropped = new Counter({
    name: 'latchkey_audit_events_dropped_total',
    help: 'Audit events not kept: spool full with on_full: drop, or a spool write failed',
    registers: [registry],
    collect: () => {
      dropped.reset()
      dropped.inc(sink.stats.dropped)
    },
  })
  const spooled = new Counter({
    name: 'latchkey_audit_events_spooled_total',
    help: 'Audit events appended to the local spool',
    registers: [registry],
    collect: () => {
      spooled.reset()
      spooled.inc(sink.stats.spooled)
    },
  })
  const lost = new Counter({
    name: 'latchkey_audit_events_lost_total',
    help: 'Spooled audit events whose records were removed under the sidecar before the collector had them (a spool segment deleted or cut short)',
    registers: [registry],
    collect: () => {
      lost.reset()
      lost.inc(sink.stats.lost)
    },
  })
  const gauges: Array<[string, string, () => number]> = [
    ['latchkey_audit_unacked_events', 'Spooled audit events the collector has not acknowledged yet', () => sink.spool.lastSeq - sink.stats.acked],
    ['latchkey_audit_spool_bytes', 'Bytes held in the audit spool', () => sink.spool.bytes],
    ['latchkey_audit_spool_full', '1 while the audit spool is full (egress refused, or events dropped, per on_full)', () => (sink.isFull ? 1 : 0)],
    // The state /readyz reports, where alerts look: a disk full under the spool showed nowhere else.
    ['latchkey_audit_spool_unwritable', '1 while appends to the audit spool fail (a full disk, a read-only directory): egress is refused, or events are held then dropped, per on_full', () => (sink.appendFailing ? 1 : 0)],
    // A refusal is the collector's own answer, so this is honest where "connected" would not be
    // (an idle stream hears nothing back): a stale token after a rotation shows here at once.
    ['latchkey_audit_collector_refusing', '1 while the collector refuses this sidecar (a wrong or stale token, an unknown sidecar ID, an agent it may not report, a clock ahead): calls go on and are spooled; the log says why', () => (sink.refusedCode === null ? 0 : 1)],
    ['latchkey_audit_spool_damaged_bytes', 'Bytes skipped when the spool was recovered because records failed their checksum', () => sink.spool.recovery.corruptBytes],
  ]
  for (const [name, help, read] of gauges) {
    const g: Gauge = new Gauge({ name, help, registers: [registry], collect: () => g.set(read()) })
  }
}
