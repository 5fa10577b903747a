// A label-free prom-client Histogram that a hot path can feed once a call. prom-client's own
// observe() validates and hashes a label set on every call (about 1 µs, 1% of a proxied call's
// CPU at 16 connections); record() finds the bucket and adds to three numbers, and get() (what
// the registry reads at scrape) exports them in the shape prom-client's Histogram does.
import { Histogram, type HistogramConfiguration, type MetricType } from 'prom-client'

type Exported = Awaited<ReturnType<Histogram['get']>>

// prom-client's types declare MetricType a numeric enum that its JavaScript never exports; what
// the registry prints after "# TYPE" is the string it finds here.
const HISTOGRAM = 'histogram' as unknown as MetricType

export class RecordedHistogram extends Histogram {
  private readonly header: Omit<Exported, 'values'>
  private readonly bounds: readonly number[]
  /** Values per bucket, not cumulative: counts[i] for bounds[i-1] < v <= bounds[i]; the last is past every bound (+Inf). */
  private readonly counts: Float64Array
  private sum = 0
  private count = 0

  constructor(o: Pick<HistogramConfiguration<string>, 'name' | 'help' | 'registers'> & { buckets: number[] }) {
    super({ name: o.name, help: o.help, buckets: o.buckets, registers: o.registers })
    this.header = { name: o.name, help: o.help, type: HISTOGRAM, aggregator: 'sum', collect: () => undefined }
    if (o.buckets.some((b, i) => i > 0 && !(b > o.buckets[i - 1]!))) throw new Error(`${o.name}: buckets must be given in ascending order, each once`)
    this.bounds = [...o.buckets]
    this.counts = new Float64Array(this.bounds.length + 1)
  }

  /** One value, in the histogram's unit. A value that is not a finite number is not counted (prom-client would throw). */
  record(value: number): void {
    if (!Number.isFinite(value)) return
    let i = 0
    for (const bound of this.bounds) {
      if (value <= bound) break
      i++
    }
    this.counts[i]!++
    this.sum += value
    this.count++
  }

  /** prom-client's own metric object (name, help, type, aggregator), its values read from the counts. */
  override get(): Promise<Exported> {
    return this.getForPromString()
  }

  /**
   * What prom-client's Registry reads for the text exposition when a metric has it (Histogram does,
   * untyped), in place of get(). test/recorded-histogram.test.ts prints both kinds side by side, so
   * a prom-client that reads something else fails there.
   */
  getForPromString(): Promise<Exported> {
    const name = this.header.name
    const bucket = `${name}_bucket`
    let cumulative = 0
    const values: Exported['values'] = this.bounds.map((le, i) => ({ labels: { le }, value: (cumulative += this.counts[i]!), metricName: bucket }))
    values.push(
      { labels: { le: '+Inf' }, value: this.count, metricName: bucket },
      { labels: {}, value: this.sum, metricName: `${name}_sum` },
      { labels: {}, value: this.count, metricName: `${name}_count` },
    )
    return Promise.resolve({ ...this.header, values })
  }

  override reset(): void {
    super.reset()
    // prom-client's constructor calls reset() before this subclass's fields exist.
    if (!(this.counts instanceof Float64Array)) return
    this.counts.fill(0)
    this.sum = 0
    this.count = 0
  }
}
