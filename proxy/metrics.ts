// Prometheus metrics for the sidecar, on its own registry so several sidecars (in tests, or in
// `latchkey up`) never collide. Labels are low-cardinality by construction: no hosts, no paths.
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks'
import { Registry, Counter, Gauge, collectDefaultMetrics } from 'prom-client'
import { RecordedHistogram } from './recorded-histogram.js'

/** How often the event loop's delay is sampled (latchkey_nodejs_eventloop_lag_{min,…,p99}_seconds). */
export const EVENT_LOOP_SAMPLE_MS = 100
/** Samples a window of the loop's delay holds (10 s), and the windows read together (the last minute: five whole, one filling). */
const TICKS_PER_WINDOW = 100
const WINDOWS = 6
/**
 * prom-client's own loop-delay sampler cannot be left out of its default metrics. Its timer fired
 * every 10 ms, which woke an idle sidecar ~98 times a second (1% of a core here, with nothing to
 * do), and the gauges it feeds count the sampling interval as delay (prometheus/client_js#370: an
 * idle loop read 0.010 s). Given this interval its timer never fires, and these gauges are ours.
 */
const NEVER_MS = 2 ** 31 - 1

interface CallCount {
  readonly via: string
  readonly decision: string
  readonly outcome: string
  n: number
}

export class SidecarMetrics {
  readonly registry = new Registry()
  /**
   * Per-call counts, by via → decision → outcome, read by prom-client only when scraped. Nested
   * maps of a few fixed strings: counting a call builds no key and allocates nothing.
   */
  private readonly callCounts = new Map<string, Map<string, Map<string, CallCount>>>()
  readonly calls = new Counter({
    name: 'latchkey_calls_total',
    help: 'Calls handled, by how they arrived, the decision and the outcome code',
    labelNames: ['via', 'decision', 'outcome'] as const,
    registers: [this.registry],
    collect: () => {
      this.calls.reset()
      for (const byDecision of this.callCounts.values()) {
        for (const byOutcome of byDecision.values()) {
          for (const c of byOutcome.values()) this.calls.inc({ via: c.via, decision: c.decision, outcome: c.outcome }, c.n)
        }
      }
    },
  })
  readonly duration = new RecordedHistogram({
    name: 'latchkey_call_duration_seconds',
    help: 'Time from request to the end of the response, as the agent sees it',
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  })

  countCall(via: string, decision: string, outcome: string, seconds: number): void {
    let byDecision = this.callCounts.get(via)
    if (!byDecision) this.callCounts.set(via, (byDecision = new Map()))
    let byOutcome = byDecision.get(decision)
    if (!byOutcome) byDecision.set(decision, (byOutcome = new Map()))
    const c = byOutcome.get(outcome)
    if (c) c.n++
    else byOutcome.set(outcome, { via, decision, outcome, n: 1 })
    this.duration.record(seconds)
  }

  readonly auditFailures = new Gauge({
    name: 'latchkey_audit_write_failures',
    // A gauge that only goes up, kept under its name for the dashboards that read it.
    help: 'Times appends to the audit file began to fail or hang (one per episode; latchkey_audit_events_dropped_total counts the events lost)',
    registers: [this.registry],
  })
  readonly openTunnels = new Gauge({
    name: 'latchkey_open_tunnels',
    help: 'CONNECT tunnels and WebSocket connections currently open',
    registers: [this.registry],
  })

  readonly droppedConnections = new Counter({
    name: 'latchkey_connections_dropped_total',
    help: 'Connections closed because their port was at its connection limit (the oldest holding no call on the proxy port, not being answered on the admin port, else the new one, unread), or that could not be accepted, by port',
    labelNames: ['port'] as const,
    registers: [this.registry],
  })

  readonly secretsReloads = new Counter({
    name: 'latchkey_secrets_reloads_total',
    help: 'Reads of secrets.file after start-up (a change seen, or SIGHUP), by outcome: changed (the new set swapped in), unchanged, rejected (the set in force kept)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  })

  readonly tokenExchanges = new Counter({
    name: 'latchkey_token_exchanges_total',
    help: 'Token exchanges with the broker, by outcome (granted, refused, unreachable, evidence)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  })
  /** Set by the sidecar: how many admitted calls have not finished, read at scrape time. */
  liveCount: () => number = () => 0
  readonly callsInFlight: Gauge = new Gauge({
    name: 'latchkey_calls_in_flight',
    help: 'Calls admitted and not finished: requests being answered (in plaintext tunnels too), TLS relays, tunnels not yet used, WebSockets',
    registers: [this.registry],
    collect: (): void => this.callsInFlight.set(this.liveCount()),
  })
  /** Set by the sidecar: upstream sockets open, read at scrape time. */
  upstreamCount: () => { pooled: number; relayed: number } = () => ({ pooled: 0, relayed: 0 })
  readonly openUpstreamConnections: Gauge<'kind'> = new Gauge({
    name: 'latchkey_open_upstream_connections',
    help: 'Upstream connections open, by kind: pooled (in use or idle keep-alive) and relayed (CONNECT tunnels, WebSockets); together held to sidecar.max_connections',
    labelNames: ['kind'] as const,
    registers: [this.registry],
    collect: (): void => {
      const { pooled, relayed } = this.upstreamCount()
      this.openUpstreamConnections.set({ kind: 'pooled' }, pooled)
      this.openUpstreamConnections.set({ kind: 'relayed' }, relayed)
    },
  })
  /** Set by the sidecar: how many tasks are open, read at scrape time. */
  taskCount: () => number = () => 0
  readonly openTasks: Gauge = new Gauge({
    name: 'latchkey_open_tasks',
    help: 'Tasks currently open on this sidecar',
    registers: [this.registry],
    collect: (): void => this.openTasks.set(this.taskCount()),
  })

  /** The loop-delay sampler's timer (watchEventLoopDelay). */
  private loopTimer: NodeJS.Timeout | null = null

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'latchkey_', eventLoopMonitoringPrecision: NEVER_MS })
    this.watchEventLoopDelay()
  }

  /**
   * The loop's delay: how late a timer due every 100 ms fires, over the last minute. Sampling
   * every 100 ms catches every stall of 100 ms or more, and shorter ones in proportion to their
   * length. Kept in 10 s windows, the last six read together, so what a scrape sees does not
   * depend on who else scrapes: read "since the last scrape", a second scraper (an HA pair of
   * Prometheus servers, anyone's curl) emptied the window the first was to read, and a 54 ms
   * stall read 0.3 ms. (Node's monitorEventLoopDelay histograms cannot be added together; these can.)
   */
  private watchEventLoopDelay(): void {
    const past: RecordableHistogram[] = []
    let current = createHistogram()
    let ticks = 0
    let due = performance.now() + EVENT_LOOP_SAMPLE_MS
    this.loopTimer = setInterval(() => {
      const now = performance.now()
      current.record(Math.max(1, Math.round((now - due) * 1e6)))
      due = now + EVENT_LOOP_SAMPLE_MS
      if (++ticks < TICKS_PER_WINDOW) return
      ticks = 0
      past.push(current)
      if (past.length === WINDOWS) past.shift()
      current = createHistogram()
    }, EVENT_LOOP_SAMPLE_MS).unref()
    const seconds = (ns: number): number => ns / 1e9
    const read = {
      min: (h: RecordableHistogram) => seconds(h.min),
      max: (h: RecordableHistogram) => seconds(h.max),
      mean: (h: RecordableHistogram) => seconds(h.mean),
      stddev: (h: RecordableHistogram) => seconds(h.stddev),
      p50: (h: RecordableHistogram) => seconds(h.percentile(50)),
      p90: (h: RecordableHistogram) => seconds(h.percentile(90)),
      p99: (h: RecordableHistogram) => seconds(h.percentile(99)),
    }
    // The first gauge collected sets them all; with no sample yet (the first 100 ms) they stay as they were.
    const collect = (): void => {
      const minute = createHistogram()
      for (const h of past) minute.add(h)
      minute.add(current)
      if (minute.count === 0) return
      for (const { gauge, value } of gauges) gauge.set(value(minute))
    }
    const gauges = Object.entries(read).map(([stat, value], i) => {
      const name = `latchkey_nodejs_eventloop_lag_${stat}_seconds`
      this.registry.removeSingleMetric(name)
      const gauge = new Gauge({ name, help: `Event loop delay (how late a timer due every ${EVENT_LOOP_SAMPLE_MS} ms fires) over the last minute: ${stat}`, registers: [this.registry], collect: i === 0 ? collect : undefined })
      return { gauge, value }
    })
  }

  /** Stops the loop-delay sampler's timer (a sidecar stopped in a process that goes on: tests, `latchkey up`). */
  close(): void {
    if (this.loopTimer) clearInterval(this.loopTimer)
  }

  /** The JSON-lines sink's backlog and losses, read at scrape time: a hung or slow audit disk shows as growing unwritten bytes. */
  watchJsonlSink(sink: { readonly unwrittenBytes: number; readonly failures: number }): void {
    const unwritten: Gauge = new Gauge({
      name: 'latchkey_audit_unwritten_bytes',
      help: 'Audit bytes encoded but not yet appended to the audit file (appends slow, hung or failing)',
      registers: [this.registry],
      collect: () => unwritten.set(sink.unwrittenBytes),
    })
    const dropped: Counter = new Counter({
      name: 'latchkey_audit_events_dropped_total',
      help: 'Audit events not written: past the unwritten budget while appends hung or failed, or still unwritten at close',
      registers: [this.registry],
      collect: () => {
        dropped.reset()
        dropped.inc(sink.failures)
      },
    })
  }
}
