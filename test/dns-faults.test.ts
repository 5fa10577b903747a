// DNS that does not answer. getaddrinfo runs on libuv's thread pool, two lookups at once by
// default, and a silent DNS server holds a thread for glibc's whole retry schedule (10 s and
// more): measured before these limits, 12 dead names under an allowed *.example.com made a name
// in /etc/hosts take 59.5 s. A lookup that never answers cannot be caused on this machine (its
// resolver is the system's), so it is the fault the injected `lookup` exists for.
import t from 'tap'
import { NetworkPolicy } from '../proxy/resolve/network-policy.js'
import { DnsResolver, lookupThreads, type LookupFn } from '../proxy/resolve/resolver.js'
import { parseAbsoluteTarget } from '../proxy/listen/target.js'
import { parseConfig } from '../lib/config/load.js'
import { startTestSidecar, rawRequest } from './helpers/harness.js'

const network = () => new NetworkPolicy(parseConfig('version: 1\n').network)
const target = (host: string) => parseAbsoluteTarget(`http://${host}/`)

/** Names in `good` answer a public address at once; every other name hangs until released. */
function dns(good: string[] = []) {
  const calls: string[] = []
  const hung: (() => void)[] = []
  let running = 0
  let peak = 0
  const lookup: LookupFn = (host) => {
    calls.push(host)
    running++
    peak = Math.max(peak, running)
    const done = () => running--
    if (good.includes(host)) {
      return new Promise((r) => setTimeout(r, 5)).then(() => {
        done()
        return [{ address: '93.184.216.34', family: 4 }]
      })
    }
    return new Promise((_r, reject) => hung.push(() => {
      done()
      reject(Object.assign(new Error('getaddrinfo EAI_AGAIN'), { code: 'EAI_AGAIN' }))
    }))
  }
  return { lookup, calls, peak: () => peak, release: () => hung.splice(0).forEach((f) => f()) }
}

const settle = async (p: unknown) => {
  const t0 = performance.now()
  try {
    await p
    return { ms: performance.now() - t0, err: null }
  } catch (err) {
    return { ms: performance.now() - t0, err: err as { code: string; status: number; reason: string; retryable: boolean } }
  }
}
/** The call as the pipeline makes it: a refusal may come synchronously. */
const call = (r: DnsResolver, host: string) => settle((async () => r.resolve(target(host)))())

t.test('a lookup that never answers ends at the deadline, 504 LK_DNS_TIMEOUT', async (t) => {
  const d = dns()
  t.teardown(d.release)
  const r = new DnsResolver(network(), { cacheMs: 30_000, timeoutMs: 150, lookup: d.lookup })
  const { ms, err } = await call(r, 'dead.example.com')
  t.match(err, { code: 'LK_DNS_TIMEOUT', status: 504, retryable: true, reason: 'dead.example.com: DNS lookup timed out after 150 ms (sidecar.timeouts.dns_ms)' })
  t.ok(ms >= 140 && ms < 1_000, `ended at the deadline (${Math.round(ms)} ms)`)
})

t.test('a failed name is answered from the negative cache within its window, looked up again after', async (t) => {
  let now = 1_000
  const d = dns()
  const missing: LookupFn = async (host) => {
    d.calls.push(host)
    throw Object.assign(new Error('nope'), { code: 'ENOTFOUND' })
  }
  const r = new DnsResolver(network(), { cacheMs: 30_000, negativeCacheMs: 5_000, lookup: missing, now: () => now })
  t.match((await call(r, 'gone.example.com')).err, { code: 'LK_DNS_FAILED', status: 502, reason: 'gone.example.com: name not found' })
  for (let i = 0; i < 20; i++) t.match((await call(r, 'gone.example.com')).err, { code: 'LK_DNS_FAILED', reason: 'gone.example.com: name not found' }, `again (${i})`)
  now += 4_999
  t.match((await call(r, 'gone.example.com')).err, { code: 'LK_DNS_FAILED' })
  t.same(d.calls, ['gone.example.com'], '22 calls within the window, one lookup')
  now += 2
  await call(r, 'gone.example.com')
  t.same(d.calls, ['gone.example.com', 'gone.example.com'], 'looked up again after it')

  // Never kept longer than a positive answer would be.
  d.calls.length = 0
  const short = new DnsResolver(network(), { cacheMs: 1_000, negativeCacheMs: 5_000, lookup: missing, now: () => now })
  await call(short, 'gone.example.com')
  now += 1_001
  await call(short, 'gone.example.com')
  t.equal(d.calls.length, 2, 'negative answers capped at cacheMs')
})

t.test('a timeout is kept too, and a lookup still running is joined, never started twice', async (t) => {
  let now = 1_000
  const d = dns()
  t.teardown(d.release)
  const r = new DnsResolver(network(), { cacheMs: 30_000, negativeCacheMs: 2_000, timeoutMs: 100, lookup: d.lookup, now: () => now })
  t.match((await call(r, 'dead.example.com')).err, { code: 'LK_DNS_TIMEOUT' })
  const again = await call(r, 'dead.example.com')
  t.match(again.err, { code: 'LK_DNS_TIMEOUT' })
  t.ok(again.ms < 50, `answered from the negative cache (${again.ms.toFixed(1)} ms)`)
  now += 2_001
  t.match((await call(r, 'dead.example.com')).err, { code: 'LK_DNS_TIMEOUT' }, 'past the window, it waits on the lookup still running')
  t.same(d.calls, ['dead.example.com'], 'one getaddrinfo for the name, however often it is asked')
})

t.test('past the in-flight bound, a new name is refused at once; cached names and localhost still answer', async (t) => {
  const d = dns(['good.example.com', 'good2.example.com'])
  t.teardown(d.release)
  const r = new DnsResolver(network(), { cacheMs: 30_000, timeoutMs: 10_000, maxLookups: 3, maxRunning: 8, lookup: d.lookup })
  t.notOk((await call(r, 'good.example.com')).err, 'good.example.com answered and cached')
  const flood = ['a', 'b', 'c'].map((n) => call(r, `${n}.example.com`))
  const refused = await call(r, 'other.example.com')
  t.match(refused.err, { code: 'LK_DNS_BUSY', status: 503, retryable: true, reason: 'other.example.com: not looked up: 3 DNS lookups are already in flight (network.dns_max_lookups); try again shortly' })
  t.ok(refused.ms < 50, `refused at once (${refused.ms.toFixed(1)} ms)`)
  t.notOk(d.calls.includes('other.example.com'), 'never handed to getaddrinfo')
  const cached = r.resolve(target('good.example.com'))
  t.notOk(cached instanceof Promise, 'a cached name answers synchronously')
  t.match(cached, { address: { address: '93.184.216.34' } })
  t.match(r.resolve(target('localhost')), { denied: { rule: 'network:loopback' } }, 'localhost is never looked up')
  const joined = call(r, 'a.example.com')
  t.equal(d.calls.filter((h) => h === 'a.example.com').length, 1, 'a name already in flight is joined, not refused or looked up again')
  d.release()
  for (const f of await Promise.all([...flood, joined])) t.match(f.err, { code: 'LK_DNS_FAILED', reason: /EAI_AGAIN/ })
  t.equal((await call(r, 'good2.example.com')).err, null, 'with the flood over, new names are looked up again')
})

t.test('lookups beyond the thread share wait here: a healthy burst all answers, a dead one never takes every call', async (t) => {
  const names = Array.from({ length: 10 }, (_, i) => `n${i}.example.com`)
  const healthy = dns(names)
  const r = new DnsResolver(network(), { cacheMs: 30_000, timeoutMs: 5_000, maxRunning: 2, lookup: healthy.lookup })
  const burst = await Promise.all(names.map((n) => call(r, n)))
  t.same(burst.map((b) => b.err), names.map(() => null), '10 distinct names at once: every one answered, none refused')
  t.equal(healthy.peak(), 2, 'no more than the thread share in getaddrinfo at once')

  const d = dns(['good.example.com', 'queued.example.com'])
  t.teardown(d.release)
  const q = new DnsResolver(network(), { cacheMs: 30_000, timeoutMs: 150, maxRunning: 1, lookup: d.lookup })
  const dead = call(q, 'dead.example.com')
  const queued = await call(q, 'queued.example.com')
  t.match(queued.err, { code: 'LK_DNS_TIMEOUT', reason: 'queued.example.com: not looked up within 150 ms (sidecar.timeouts.dns_ms): every lookup thread was busy with other names' }, 'a name waiting for the thread ends at its deadline, saying why')
  t.same(d.calls, ['dead.example.com'], 'and was never handed to getaddrinfo')
  t.match((await dead).err, { code: 'LK_DNS_TIMEOUT' })
  // The one thread is held by a lookup past its deadline: a new name would only wait its deadline out.
  const fast = await call(q, 'good.example.com')
  t.match(fast.err, { code: 'LK_DNS_BUSY', status: 503, reason: 'good.example.com: not looked up: every DNS lookup thread (1) is held by a lookup unanswered for over 150 ms; try again shortly' })
  t.ok(fast.ms < 50, `refused at once (${fast.ms.toFixed(1)} ms)`)
  d.release()
  await new Promise((r) => setImmediate(r))
  t.notOk((await call(q, 'good.example.com')).err, 'once the thread is back, the name is looked up and answered')
  t.notOk((await call(q, 'queued.example.com')).err, "so is the one that only waited: others' dead names left no failure cached for it")
})

t.test('lookupThreads: libuv runs (threads + 1) / 2 lookups at once', async (t) => {
  t.equal(lookupThreads({}), 2)
  t.equal(lookupThreads({ UV_THREADPOOL_SIZE: '64' }), 32)
  t.equal(lookupThreads({ UV_THREADPOOL_SIZE: '5' }), 3)
  t.equal(lookupThreads({ UV_THREADPOOL_SIZE: 'junk' }), 1)
  t.equal(lookupThreads({ UV_THREADPOOL_SIZE: '99999' }), 512)
})

t.test('through the sidecar: an agent gets the coded 504, then the cached one at once, on every entry path', async (t) => {
  const d = dns()
  t.teardown(d.release)
  const fragment = { policy: { default: 'deny', rules: [{ id: 'examples', action: 'allow', hosts: ['*.example.com'] }] } }
  const resolver = new DnsResolver(network(), { cacheMs: 30_000, timeoutMs: 200, lookup: d.lookup })
  const s = await startTestSidecar(fragment, {}, { resolver })
  t.teardown(() => s.close())
  const t0 = performance.now()
  const first = await rawRequest(s.sidecar.port, 'GET http://dead.example.com/x HTTP/1.1\r\nHost: dead.example.com\r\nConnection: close\r\n\r\n', 50)
  const firstMs = performance.now() - t0
  t.equal(first.status, 504)
  t.equal(first.headers['x-latchkey-error'], 'LK_DNS_TIMEOUT')
  t.equal(first.headers['x-should-retry'], 'true')
  t.same(JSON.parse(first.body), { error: 'upstream_unresolvable', code: 'LK_DNS_TIMEOUT', rule: null, reason: 'dead.example.com: DNS lookup timed out after 200 ms (sidecar.timeouts.dns_ms)', retryable: true })
  t.ok(firstMs < 2_000, `answered near the deadline (${Math.round(firstMs)} ms)`)
  const connect = await rawRequest(s.sidecar.port, 'CONNECT dead.example.com:443 HTTP/1.1\r\nHost: dead.example.com:443\r\n\r\n', 50)
  t.equal(connect.status, 504, 'a CONNECT to it: the same refusal, from the negative cache')
  t.match(connect.raw, /^HTTP\/1\.1 504 Gateway Timeout \(LK_DNS_TIMEOUT: dead\.example\.com: DNS lookup timed out after 200 ms/)
  t.same(d.calls, ['dead.example.com'], 'one lookup for both calls')
  t.match(await s.audit(), [{ status: 504, error: 'LK_DNS_TIMEOUT' }, { via: 'connect', status: 504, error: 'LK_DNS_TIMEOUT' }])
})
