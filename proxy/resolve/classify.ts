// Address classification for the SSRF floor. One explicit table per family, most specific
// first, so a reviewer can read exactly what is judged internal. IPv6 forms that carry an IPv4
// address (mapped, compatible, translated, NAT64, 6to4, Teredo) are judged by that IPv4.
import ipaddr from 'ipaddr.js'
import { parseCidr, parseIp } from '../../lib/ip-address.js'
import type { AddressClass } from '../../lib/config/schema.js'

type Range = [ipaddr.IPv4 | ipaddr.IPv6, number, AddressClass]

const range = (cidr: string, cls: AddressClass): Range => {
  const [addr, bits] = parseCidr(cidr)
  return [addr, bits, cls]
}

/**
 * Cloud metadata endpoints: AWS (IMDS, ECS, EKS pod identity, time, DNS), GCP, Azure, Alibaba,
 * Oracle. Azure's WireServer, 168.63.129.16, is a public address every Azure VM reaches: its host
 * agent hands out extension settings (protected ones included) to whoever on the VM asks.
 */
const V4: Range[] = [
  range('169.254.169.254/32', 'metadata'),
  range('168.63.129.16/32', 'metadata'),
  range('169.254.170.2/32', 'metadata'),
  range('169.254.170.23/32', 'metadata'),
  range('169.254.169.123/32', 'metadata'),
  range('169.254.169.253/32', 'metadata'),
  range('100.100.100.200/32', 'metadata'),
  range('192.0.0.192/32', 'metadata'),
  range('255.255.255.255/32', 'broadcast'),
  range('0.0.0.0/8', 'unspecified'),
  range('127.0.0.0/8', 'loopback'),
  range('10.0.0.0/8', 'private'),
  range('172.16.0.0/12', 'private'),
  range('192.168.0.0/16', 'private'),
  range('169.254.0.0/16', 'link-local'),
  range('100.64.0.0/10', 'cgnat'),
  range('192.0.2.0/24', 'documentation'),
  range('198.51.100.0/24', 'documentation'),
  range('203.0.113.0/24', 'documentation'),
  range('198.18.0.0/15', 'benchmarking'),
  range('192.0.0.0/24', 'reserved'),
  range('192.88.99.0/24', 'reserved'),
  range('224.0.0.0/4', 'multicast'),
  range('240.0.0.0/4', 'reserved'),
]

const V6: Range[] = [
  range('fd00:ec2::254/128', 'metadata'),
  range('fd00:ec2::23/128', 'metadata'),
  range('fd20:ce::254/128', 'metadata'),
  range('::/128', 'unspecified'),
  range('::1/128', 'loopback'),
  range('64:ff9b:1::/48', 'private'),
  range('100::/64', 'reserved'),
  range('2001:db8::/32', 'documentation'),
  range('3fff::/20', 'documentation'),
  range('2001:2::/48', 'benchmarking'),
  range('2001::/23', 'reserved'),
  range('fe80::/10', 'link-local'),
  range('fec0::/10', 'site-local'),
  range('fc00::/7', 'unique-local'),
  range('ff00::/8', 'multicast'),
]
const GLOBAL_UNICAST = parseCidr('2000::/3')
const NAT64 = parseCidr('64:ff9b::/96')
const SIX_TO_FOUR = parseCidr('2002::/16')
const TEREDO = parseCidr('2001::/32')
const TRANSLATED = parseCidr('::ffff:0:0:0/96')
const COMPATIBLE = parseCidr('::/96')

function v4FromParts(hi: number, lo: number): ipaddr.IPv4 {
  return new ipaddr.IPv4([hi >> 8, hi & 0xff, lo >> 8, lo & 0xff])
}

/** The IPv4 addresses an IPv6 address carries, by every embedding a network might honour. */
export function embeddedIPv4(addr: ipaddr.IPv6): ipaddr.IPv4[] {
  const p = addr.parts
  if (addr.isIPv4MappedAddress()) return [addr.toIPv4Address()]
  if (addr.match(NAT64) || addr.match(TRANSLATED)) return [v4FromParts(p[6]!, p[7]!)]
  if (addr.match(SIX_TO_FOUR)) return [v4FromParts(p[1]!, p[2]!)]
  if (addr.match(TEREDO)) return [v4FromParts(p[2]!, p[3]!), v4FromParts(p[6]! ^ 0xffff, p[7]! ^ 0xffff)]
  // IPv4-compatible (deprecated, but some stacks still route it); :: and ::1 are classified as themselves.
  if (addr.match(COMPATIBLE) && (p[6]! !== 0 || p[7]! > 1)) return [v4FromParts(p[6]!, p[7]!)]
  return []
}

type Address = ipaddr.IPv4 | ipaddr.IPv6

/**
 * An address's readings for address rules (the network floor's, a policy rule's). Allows match
 * `dialled`, denies match `all`: fail closed both ways.
 */
export interface AddressForms {
  /**
   * As dialled: itself, and its other spelling as the same socket destination (an IPv4-mapped
   * IPv6 address's IPv4, an IPv4's mapped form), so an allow written either way opens both.
   */
  dialled: Address[]
  /**
   * Those plus every IPv4 it embeds (NAT64, 6to4, Teredo, IPv4-compatible, IPv4-translated), each
   * also in its mapped form; for IPv4, its mapped form. A deny written `::ffff:10.0.0.1` is
   * 10.0.0.1, so it denies 10.0.0.1 and every IPv6 address carrying it, as a deny written
   * `10.0.0.1` does (it missed `[64:ff9b::10.0.0.1]`, `[::10.0.0.1]`, 6to4 and Teredo).
   */
  all: Address[]
}

export function addressForms(addr: Address): AddressForms {
  if (addr.kind() === 'ipv4') {
    const both = [addr, (addr as ipaddr.IPv4).toIPv4MappedAddress()]
    return { dialled: both, all: both }
  }
  const v6 = addr as ipaddr.IPv6
  const embedded = embeddedIPv4(v6)
  if (v6.isIPv4MappedAddress()) {
    const both = [v6, ...embedded]
    return { dialled: both, all: both }
  }
  return { dialled: [v6], all: [v6, ...embedded.flatMap((v4) => [v4, v4.toIPv4MappedAddress()])] }
}

function lookup(table: Range[], addr: ipaddr.IPv4 | ipaddr.IPv6): AddressClass | null {
  for (const [base, bits, cls] of table) if (addr.match(base, bits)) return cls
  return null
}

export function classifyParsed(addr: ipaddr.IPv4 | ipaddr.IPv6): AddressClass {
  if (addr.kind() === 'ipv4') return lookup(V4, addr) ?? 'public'
  const v6 = addr as ipaddr.IPv6
  // Specific IPv6 ranges first (metadata, loopback), then whatever IPv4 it carries.
  const direct = lookup(V6.slice(0, 5), v6)
  if (direct) return direct
  for (const v4 of embeddedIPv4(v6)) {
    const cls = lookup(V4, v4)
    if (cls) return cls
  }
  if (embeddedIPv4(v6).length > 0) return 'public'
  return lookup(V6, v6) ?? (v6.match(GLOBAL_UNICAST) ? 'public' : 'reserved')
}

/** Classifies an IP literal (no brackets). Throws on anything that is not an address. */
export function classifyAddress(address: string): AddressClass {
  return classifyParsed(parseIp(address))
}
