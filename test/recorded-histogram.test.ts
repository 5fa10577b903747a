// RecordedHistogram (proxy/recorded-histogram.ts) against prom-client's own Histogram: fed the same
// values, a registry prints the same text for both, bucket edges (le is inclusive) and all.
import t from 'tap'
import { Histogram, Registry } from 'prom-client'
import { RecordedHistogram } from '../proxy/recorded-histogram.js'

const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

function pair(buckets = BUCKETS): { ours: RecordedHistogram; theirs: Histogram; text: () => Promise<[string, string]> } {
  const a = new Registry()
  const b = new Registry()
  const ours = new RecordedHistogram({ name: 'h_seconds', help: 'help text', buckets, registers: [a] })
  const theirs = new Histogram({ name: 'h_seconds', help: 'help text', buckets, registers: [b] })
  return { ours, theirs, text: async () => [await a.metrics(), await b.metrics()] }
}

t.test('the same exposition as prom-client for the same values', async (t) => {
  const { ours, theirs, text } = pair()
  const [emptyOurs, emptyTheirs] = await text()
  t.equal(emptyOurs, emptyTheirs, 'nothing recorded: every bucket 0')
  // Every bound exactly (le is inclusive), just past each, below the first, past the last, zero, negative.
  const values = [...BUCKETS, ...BUCKETS.map((b) => b * 1.0001), 0, -1, 0.0001, 11, 1e6, 0.3, 0.3, 0.3]
  for (const v of values) {
    ours.record(v)
    theirs.observe(v)
  }
  const [o, p] = await text()
  t.equal(o, p)
  t.match(o, /^h_seconds_bucket\{le="0.0005"\} 4$/m, '-1, 0, 0.0001 and 0.0005 itself')
  t.match(o, /^h_seconds_bucket\{le="\+Inf"\} 36$/m)
  t.match(o, /^h_seconds_count 36$/m)
  const samples = async (h: Histogram): Promise<unknown[]> => (await h.get()).values.map((v) => [v.metricName, v.labels, v.value])
  t.same(await samples(ours), await samples(theirs), 'get(), the JSON form, too')
})

t.test('buckets out of order, or given twice, are refused', async (t) => {
  t.throws(() => new RecordedHistogram({ name: 'h', help: 'h', buckets: [1, 0.1, 10], registers: [] }), /h: buckets must be given in ascending order/)
  t.throws(() => new RecordedHistogram({ name: 'h', help: 'h', buckets: [0.1, 0.1], registers: [] }), /ascending order, each once/)
})

t.test('a value that is not a finite number is not counted; reset zeroes it', async (t) => {
  const { ours, theirs, text } = pair()
  for (const v of [NaN, Infinity, -Infinity]) ours.record(v)
  ours.record(0.2)
  theirs.observe(0.2)
  const [o, p] = await text()
  t.equal(o, p, 'only 0.2 counted')
  ours.reset()
  const [o2] = await text()
  t.match(o2, /^h_seconds_bucket\{le="1"\} 0$/m)
  t.match(o2, /^h_seconds_sum 0$/m)
  t.match(o2, /^h_seconds_count 0$/m)
})
