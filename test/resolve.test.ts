import t from 'tap'
import { classifyAddress } from '../proxy/resolve/classify.js'
import { NetworkPolicy } from '../proxy/resolve/network-policy.js'
import { DnsResolver, type LookupFn } from '../proxy/resolve/resolver.js'
import { parseAbsoluteTarget } from '../proxy/listen/target.js'
import { parseConfig } from '../lib/config/load.js'
import type { Config } from '../lib/config/schema.js'

const defaults = parseConfig('version: 1\n').network
const network = (extra: Partial<Config['network']> = {}) => new NetworkPolicy({ ...defaults, ...extra })

t.test('IPv4 ranges, with the addresses either side of each boundary', async (t) => {
  const table: [string, string][] = [
    ['0.0.0.0', 'unspecified'],
    ['0.255.255.255', 'unspecified'],
    ['1.0.0.0', 'public'],
    ['9.255.255.255', 'public'],
    ['10.0.0.0', 'private'],
    ['10.255.255.255', 'private'],
    ['11.0.0.0', 'public'],
    ['100.63.255.255', 'public'],
    ['100.64.0.0', 'cgnat'],
    ['100.127.255.255', 'cgnat'],
    ['100.128.0.0', 'public'],
    ['100.100.100.200', 'metadata'],
    ['126.255.255.255', 'public'],
    ['127.0.0.0', 'loopback'],
    ['127.255.255.255', 'loopback'],
    ['128.0.0.0', 'public'],
    ['168.63.129.15', 'public'],
    ['168.63.129.16', 'metadata'],
    ['168.63.129.17', 'public'],
    ['169.253.255.255', 'public'],
    ['169.254.0.0', 'link-local'],
    ['169.254.169.254', 'metadata'],
    ['169.254.170.2', 'metadata'],
    ['169.254.255.255', 'link-local'],
    ['169.255.0.0', 'public'],
    ['172.15.255.255', 'public'],
    ['172.16.0.0', 'private'],
    ['172.31.255.255', 'private'],
    ['172.32.0.0', 'public'],
    ['192.0.0.0', 'reserved'],
    ['192.0.0.192', 'metadata'],
    ['192.0.2.1', 'documentation'],
    ['192.88.99.1', 'reserved'],
    ['192.167.255.255', 'public'],
    ['192.168.0.0', 'private'],
    ['192.168.255.255', 'private'],
    ['192.169.0.0', 'public'],
    ['198.17.255.255', 'public'],
    ['198.18.0.0', 'benchmarking'],
    ['198.19.255.255', 'benchmarking'],
    ['198.20.0.0', 'public'],
    ['198.51.100.7', 'documentation'],
    ['203.0.113.9', 'documentation'],
    ['223.255.255.255', 'public'],
    ['224.0.0.0', 'multicast'],
    ['239.255.255.255', 'multicast'],
    ['240.0.0.0', 'reserved'],
    ['255.255.255.254', 'reserved'],
    ['255.255.255.255', 'broadcast'],
    ['8.8.8.8', 'public'],
  ]
  for (const [addr, cls] of table) t.equal(classifyAddress(addr), cls, addr)
})

t.test('IPv6 ranges', async (t) => {
  const table: [string, string][] = [
    ['::', 'unspecified'],
    ['::1', 'loopback'],
    ['::2', 'unspecified'], // IPv4-compatible ::0.0.0.2
    ['fe80::1', 'link-local'],
    ['febf:ffff::1', 'link-local'],
    ['fec0::1', 'site-local'],
    ['fc00::1', 'unique-local'],
    ['fdff:ffff::1', 'unique-local'],
    ['fd00:ec2::254', 'metadata'],
    ['fd20:ce::254', 'metadata'],
    ['ff02::1', 'multicast'],
    ['2001:db8::1', 'documentation'],
    ['3fff::1', 'documentation'],
    ['2001:2::1', 'benchmarking'],
    ['100::1', 'reserved'],
    ['64:ff9b:1::1', 'private'],
    ['2606:4700::1111', 'public'],
    ['1fff:ffff::1', 'reserved'],
    ['4000::1', 'reserved'],
  ]
  for (const [addr, cls] of table) t.equal(classifyAddress(addr), cls, addr)
})

t.test('IPv4 carried in IPv6 is judged by the IPv4', async (t) => {
  const inside = { loopback: '127.0.0.1', private: '10.1.2.3', metadata: '169.254.169.254', public: '8.8.8.8' } as const
  const hex = (v4: string) => {
    const [a, b, c, d] = v4.split('.').map(Number) as [number, number, number, number]
    return [((a << 8) | b).toString(16), ((c << 8) | d).toString(16)]
  }
  const xor = (v4: string) => hex(v4).map((h) => (parseInt(h, 16) ^ 0xffff).toString(16))
  for (const [cls, v4] of Object.entries(inside)) {
    const [hi, lo] = hex(v4) as [string, string]
    const [xhi, xlo] = xor(v4) as [string, string]
    const forms = [
      `::ffff:${v4}`, // mapped
      `::ffff:${hi}:${lo}`,
      `::${v4}`, // compatible
      `::ffff:0:${v4}`, // translated
      `64:ff9b::${v4}`, // NAT64
      `2002:${hi}:${lo}::1`, // 6to4
      `2001:0:4136:e378:8000:63bf:${xhi}:${xlo}`, // Teredo client
    ]
    for (const f of forms) t.equal(classifyAddress(f), cls, `${f} carries ${v4}`)
  }
  t.equal(classifyAddress(`2001:0:${hex('127.0.0.1').join(':')}:0:0:${xor('8.8.8.8').join(':')}`), 'loopback', 'Teredo server address checked too')
})

t.test('the network floor: defaults, deny CIDRs and allow exceptions', async (t) => {
  const floor = network()
  t.same(floor.check('127.0.0.1', 80), { allowed: false, cls: 'loopback', rule: 'network:loopback', reason: '127.0.0.1 is a loopback address', what: 'a loopback address' })
  t.same(floor.check('::ffff:169.254.169.254', 80), { allowed: false, cls: 'metadata', rule: 'network:metadata', reason: '::ffff:169.254.169.254 is a cloud metadata address', what: 'a cloud metadata address' })
  t.same(floor.check('0.0.0.0', 80), { allowed: false, cls: 'unspecified', rule: 'network:unspecified', reason: '0.0.0.0 is an unspecified address', what: 'an unspecified address' })
  t.same(floor.check('8.8.8.8', 443), { allowed: true, cls: 'public' })

  const custom = network({ deny: ['loopback', '8.8.4.0/24'], allow: [{ cidr: '127.0.0.1/32', ports: [8080] }, { cidr: '10.9.0.0/16' }] })
  t.equal(custom.check('127.0.0.1', 8080).allowed, true, 'allowed range and port')
  t.equal(custom.check('::ffff:127.0.0.1', 8080).allowed, true, 'the same address in its mapped IPv6 form')
  t.equal(custom.check('127.0.0.1', 8081).allowed, false, 'other ports stay closed')
  t.equal(custom.check('127.0.0.2', 8080).allowed, false)
  t.equal(custom.check('10.1.1.1', 80).allowed, true, 'private is not in this deny list')
  t.same(custom.check('8.8.4.4', 53), { allowed: false, cls: 'public', rule: 'network:8.8.4.0/24', reason: '8.8.4.4 is in the denied range 8.8.4.0/24', what: 'in the denied range 8.8.4.0/24' })
  t.equal(custom.check('::ffff:8.8.4.4', 53).allowed, false, 'deny CIDRs apply to the embedded IPv4 too')

  // A deny written in IPv6 names the IPv4 it maps: the same socket destination, however spelt.
  const mapped = network({ deny: ['::ffff:8.8.4.4/128', '::ffff:10.0.0.0/104'] })
  t.same(mapped.check('8.8.4.4', 53), { allowed: false, cls: 'public', rule: 'network:::ffff:8.8.4.4/128', reason: '8.8.4.4 is in the denied range ::ffff:8.8.4.4/128', what: 'in the denied range ::ffff:8.8.4.4/128' })
  t.equal(mapped.check('10.200.1.1', 80).allowed, false, 'a mapped /104 is the IPv4 /8')
  t.equal(mapped.check('8.8.4.5', 53).allowed, true, 'and nothing beside it')
  t.equal(network({ deny: ['::/0'] }).check('1.1.1.1', 443).allowed, false, 'an IPv6 range holding every mapped address holds every IPv4 one')
  // As a deny written `8.8.4.4` does, one written mapped holds every IPv6 address carrying 8.8.4.4 (all were allowed).
  for (const address of ['::8.8.4.4', '64:ff9b::8.8.4.4', '::ffff:0:8.8.4.4', '2002:808:404::1', '2001:0:4136:e378:8000:63bf:f7f7:fbfb']) {
    t.match(mapped.check(address, 53), { allowed: false, rule: 'network:::ffff:8.8.4.4/128' }, `${address} carries 8.8.4.4: denied by the mapped deny`)
    t.match(mapped.check(address.replace('8.8.4.4', '10.200.1.1').replace('808:404', 'ac8:101').replace('f7f7:fbfb', 'f537:fefe'), 80), { allowed: false, rule: 'network:::ffff:10.0.0.0/104' }, `${address}, carrying 10.200.1.1: denied by the mapped /104`)
  }
})

t.test('remembered verdicts: per address and port, the same as judged afresh, past the bound, and forgotten by protectSelf', async (t) => {
  const cfg = { deny: [...defaults.deny], allow: [{ cidr: '127.0.0.1/32', ports: [8080] }] }
  const remembering = network(cfg)
  const judge = (address: string, port: number) => network(cfg).check(address, port)
  // One address, two ports with different verdicts, asked alternately: a cache keyed by address alone would answer the first for both.
  for (let i = 0; i < 3; i++) {
    t.equal(remembering.check('127.0.0.1', 8080).allowed, true, 'the allowed port')
    t.equal(remembering.check('127.0.0.1', 8081).allowed, false, 'the other port')
  }
  // Past the 4,096 remembered: the map is emptied and starts again; every answer is still what a fresh policy says.
  const differing: string[] = []
  for (let i = 0; i < 5000; i++) {
    const address = `10.${(i >> 8) & 255}.${i & 255}.1`
    const port = 80 + (i % 3)
    if (JSON.stringify(remembering.check(address, port)) !== JSON.stringify(judge(address, port))) differing.push(`${address}:${port}`)
    if (i % 997 === 0) t.same(remembering.check('127.0.0.1', 8080), judge('127.0.0.1', 8080), `127.0.0.1:8080 after ${i + 1} others`)
  }
  t.same(differing, [], '5,000 others, each as a fresh policy judges it')
  t.equal(remembering.check('127.0.0.1', 8081).allowed, false, 'after the bound, the other port still closed')
  // The sidecar's own ports are closed once it says which they are, even to an address judged (and remembered) before.
  t.equal(remembering.check('127.0.0.1', 8080).allowed, true)
  remembering.protectSelf([8080], [])
  t.match(remembering.check('127.0.0.1', 8080), { allowed: false, rule: 'network:self' }, 'a verdict remembered before protectSelf is not used after it')
})

t.test('an allow opens the address as dialled, never an IPv6 address that merely embeds it', async (t) => {
  const floor = network({ allow: [{ cidr: '127.0.0.1/32' }, { cidr: '10.9.0.0/16', ports: [443] }] })
  t.equal(floor.check('::ffff:127.0.0.1', 80).allowed, true, 'IPv4-mapped dials the same address')
  // 6to4 and Teredo carry an IPv4 but are routed elsewhere; NAT64 goes through a translator.
  // `::127.0.0.1` is how getaddrinfo writes the IPv4-compatible ::7f00:1 (ipaddr.js alone read it as mapped: opened).
  for (const address of ['2002:7f00:1::', '2002:7f00:1:abcd::1', '2001:0:7f00:1::5601:5601', '64:ff9b::7f00:1', '::7f00:1', '::127.0.0.1', '::10.9.0.5', '2002:a09:101::1']) {
    const v = floor.check(address, 443)
    t.equal(v.allowed, false, `${address}: not opened by an IPv4 allow`)
  }
  t.match(floor.check('2001:0:7f00:1::5601:5601', 80), { allowed: false, rule: /^network:/ }, 'Teredo to the metadata address through an allowed server address')
  t.equal(network({ allow: [{ cidr: '2002:7f00:1::/48' }] }).check('2002:7f00:1:abcd::1', 80).allowed, true, 'an IPv6 allow written for the range opens it')
  // Written as the mapped IPv6, an allow opens the IPv4 it dials too (it opened only the mapped
  // spelling: 127.0.0.1 refused, [::ffff:127.0.0.1] allowed, one socket; found by an SSRF probe).
  const mapped = network({ allow: [{ cidr: '::ffff:127.0.0.1/128', ports: [8080] }, { cidr: '::ffff:10.9.0.0/112' }] })
  for (const address of ['127.0.0.1', '::ffff:127.0.0.1', '::ffff:7f00:1']) t.equal(mapped.check(address, 8080).allowed, true, `${address}: opened by the mapped allow`)
  t.equal(mapped.check('127.0.0.1', 8081).allowed, false, 'its port only')
  t.equal(mapped.check('10.9.3.4', 443).allowed, true, 'a mapped /112 opens the IPv4 /16')
  t.equal(mapped.check('10.8.3.4', 443).allowed, false, 'and nothing beside it')
  for (const address of ['64:ff9b::7f00:1', '2002:7f00:1::', '::7f00:1', '::127.0.0.1']) t.equal(mapped.check(address, 8080).allowed, false, `${address}: embeds it, dials elsewhere: not opened`)
})

t.test('numeric spellings reach the classifier as the address they mean', async (t) => {
  for (const spelling of ['2130706433', '0x7f.1', '0177.0.0.1', '127.1', '0x7f.0.0.1', '[::ffff:7f00:1]']) {
    const target = parseAbsoluteTarget(`http://${spelling}/`)
    t.equal(classifyAddress(target.host), 'loopback', spelling)
  }
  t.equal(classifyAddress(parseAbsoluteTarget('http://0xa9fea9fe/').host), 'metadata')
})

t.test('resolver', async (t) => {
  await t.test('real DNS: localhost is loopback, denied by default, allowed when opened', async (t) => {
    const denied = await new DnsResolver(network(), { cacheMs: 0 }).resolve(parseAbsoluteTarget('http://localhost:9/'))
    t.match(denied, { denied: { action: 'deny', rule: 'network:loopback', enforced: true } })
    const viaOs = await new DnsResolver(network({ allow: [{ cidr: '127.0.0.0/8' }, { cidr: '::1/128' }] }), { cacheMs: 0 }).resolve(parseAbsoluteTarget('http://localhost:9/'))
    t.match(viaOs, { address: { cls: 'loopback' } })
  })

  // Faults below use an injected lookup: a DNS server answering these ways cannot be stood up
  // on this machine (its resolver is the system's), so the answers are supplied directly.
  const answers = (map: Record<string, string[]>) => {
    const calls: string[] = []
    const fn: LookupFn = async (host) => {
      calls.push(host)
      await new Promise((r) => setTimeout(r, 5))
      const list = map[host]
      if (!list) throw Object.assign(new Error('nope'), { code: 'ENOTFOUND' })
      if (list[0] === 'TIMEOUT') throw Object.assign(new Error('slow'), { code: 'ETIMEOUT' })
      return list.map((address) => ({ address, family: address.includes(':') ? 6 : 4 }))
    }
    return { fn, calls }
  }

  await t.test('a mixed answer is refused whole', async (t) => {
    const { fn } = answers({ 'rebind.example': ['93.184.216.34', '10.0.0.5'] })
    const r = await new DnsResolver(network(), { cacheMs: 0, lookup: fn }).resolve(parseAbsoluteTarget('http://rebind.example/'))
    t.same(r, { denied: { action: 'deny', rule: 'network:private', reason: 'rebind.example resolves to 10.0.0.5, a private address', enforced: true } })
  })
  await t.test('the first allowed address is the one to dial', async (t) => {
    const { fn } = answers({ 'ok.example': ['93.184.216.34', '2606:2800:220:1::1'] })
    const r = await new DnsResolver(network(), { cacheMs: 0, lookup: fn }).resolve(parseAbsoluteTarget('http://ok.example/'))
    t.same(r, { address: { address: '93.184.216.34', family: 4, cls: 'public', answer: [{ address: '93.184.216.34', family: 4 }, { address: '2606:2800:220:1::1', family: 6 }] } }, 'with the whole answer, which deny rules by address are matched against')
  })
  await t.test('lookup failures are coded and say why', async (t) => {
    const { fn } = answers({ 'slow.example': ['TIMEOUT'] })
    const resolver = new DnsResolver(network(), { cacheMs: 0, lookup: fn })
    await t.rejects(async () => resolver.resolve(parseAbsoluteTarget('http://missing.example/')), { code: 'LK_DNS_FAILED', reason: 'missing.example: name not found' })
    await t.rejects(async () => resolver.resolve(parseAbsoluteTarget('http://slow.example/')), { code: 'LK_DNS_TIMEOUT', status: 504, reason: 'slow.example: DNS lookup timed out' })
  })
  await t.test('answers are cached for their time, and concurrent lookups share one', async (t) => {
    let now = 1_000
    const { fn, calls } = answers({ 'c.example': ['93.184.216.34'] })
    const resolver = new DnsResolver(network(), { cacheMs: 30_000, lookup: fn, now: () => now })
    const target = parseAbsoluteTarget('http://c.example/')
    await Promise.all(Array.from({ length: 10 }, () => resolver.resolve(target)))
    t.equal(calls.length, 1, '10 concurrent resolutions, one lookup')
    now += 29_999
    await resolver.resolve(target)
    t.equal(calls.length, 1, 'served from cache within its time')
    now += 2
    await resolver.resolve(target)
    t.equal(calls.length, 2, 'looked up again after expiry')
    const { fn: fn2, calls: calls2 } = answers({})
    const failing = new DnsResolver(network(), { cacheMs: 30_000, negativeCacheMs: 0, lookup: fn2 })
    await t.rejects(async () => failing.resolve(parseAbsoluteTarget('http://x.example/')))
    await t.rejects(async () => failing.resolve(parseAbsoluteTarget('http://x.example/')))
    t.equal(calls2.length, 2, 'failures are not cached with negativeCacheMs 0 (dns-faults.test.ts: they are by default)')
  })
  await t.test('*.localhost never asks DNS', async (t) => {
    const { fn, calls } = answers({})
    const r = await new DnsResolver(network(), { cacheMs: 0, lookup: fn }).resolve(parseAbsoluteTarget('http://app.localhost/'))
    t.match(r, { denied: { rule: 'network:loopback' } })
    t.equal(calls.length, 0)
  })
})
