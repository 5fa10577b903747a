// The network floor, compiled once: which resolved addresses may be dialled. `deny` names
// address classes or CIDRs; `allow` entries are exceptions (optionally per port). Fail closed
// both ways: an IPv6 form carrying an IPv4 address is denied by that IPv4 too (64:ff9b::a00:1 is
// 10.0.0.1 to a NAT64 network), but an allow opens only the address as dialled, which for an
// IPv4-mapped address (::ffff:10.0.0.1) is its IPv4; a 6to4 or Teredo address whose embedded
// IPv4 happens to be allowed is not.
import ipaddr from 'ipaddr.js'
import { parseCidr, parseIp, processIp } from '../../lib/ip-address.js'
import { ADDRESS_CLASSES, type AddressClass, type Config } from '../../lib/config/schema.js'
import { addressForms, classifyParsed } from './classify.js'

export type NetworkVerdict =
  | { allowed: true; cls: AddressClass }
  | { allowed: false; cls: AddressClass; rule: string; reason: string; /** e.g. "a private address" */ what: string }

type Cidr = [ipaddr.IPv4 | ipaddr.IPv6, number]

const ARTICLE: Partial<Record<AddressClass, string>> = { unspecified: 'an', 'unique-local': 'a' }
const DESCRIBE: Record<AddressClass, string> = {
  unspecified: 'unspecified address',
  loopback: 'loopback address',
  private: 'private address',
  'link-local': 'link-local address',
  metadata: 'cloud metadata address',
  cgnat: 'carrier-grade NAT address',
  multicast: 'multicast address',
  broadcast: 'broadcast address',
  reserved: 'reserved address',
  documentation: 'documentation address',
  benchmarking: 'benchmarking address',
  'unique-local': 'unique-local address',
  'site-local': 'site-local address',
  public: 'public address',
}

function inCidr(addr: ipaddr.IPv4 | ipaddr.IPv6, [base, bits]: Cidr): boolean {
  return addr.kind() === base.kind() && addr.match(base, bits)
}

export class NetworkPolicy {
  private readonly deniedClasses: Set<AddressClass>
  private readonly deniedCidrs: [Cidr, string][]
  private readonly allowed: { cidr: Cidr; ports: Set<number> | null }[]

  constructor(network: Config['network']) {
    this.deniedClasses = new Set(network.deny.filter((d): d is AddressClass => (ADDRESS_CLASSES as readonly string[]).includes(d)))
    this.deniedCidrs = network.deny.filter((d) => d.includes('/')).map((d) => [parseCidr(d), d])
    this.allowed = network.allow.map((a) => ({ cidr: parseCidr(a.cidr), ports: a.ports ? new Set(a.ports) : null }))
  }

  /**
   * Verdicts are pure functions of (address, port): remembered by address, then port (no key
   * string built per call), bounded, cleared when full.
   */
  private readonly verdicts = new Map<string, Map<number, NetworkVerdict>>()
  private remembered = 0

  /** The sidecar's own ports (listener, admin) and this host's addresses: see protectSelf and judge. */
  private selfPorts: ReadonlySet<number> = new Set()
  private localAddresses: ReadonlySet<string> = new Set()

  /**
   * Never dial the sidecar itself on its own ports, whatever `allow` opens: its admin API (tasks,
   * metrics) is not an upstream, and its listener reached by an address the route check does not
   * spell (`[::ffff:127.0.0.1]`) would be a loop. Any loopback or unspecified address counts, and
   * every address of this host's interfaces.
   */
  protectSelf(ports: readonly number[], localAddresses: readonly string[]): void {
    this.selfPorts = new Set(ports)
    this.localAddresses = new Set(localAddresses.flatMap((a) => (ipaddr.isValid(a) ? [processIp(a).toNormalizedString()] : [])))
    this.forget()
  }

  check(address: string, port: number): NetworkVerdict {
    return this.verdicts.get(address)?.get(port) ?? this.remember(address, port)
  }

  private remember(address: string, port: number): NetworkVerdict {
    if (this.remembered >= 4096) this.forget()
    const verdict = this.judge(address, port)
    let byPort = this.verdicts.get(address)
    if (byPort === undefined) this.verdicts.set(address, (byPort = new Map()))
    byPort.set(port, verdict)
    this.remembered++
    return verdict
  }

  private forget(): void {
    this.verdicts.clear()
    this.remembered = 0
  }

  private judge(address: string, port: number): NetworkVerdict {
    const addr = parseIp(address)
    const cls = classifyParsed(addr)
    const { dialled, all } = addressForms(addr)
    // Judged as a deny is, by every address it carries: `[64:ff9b::<this host's IPv4>]` is this
    // host to a NAT64 network, as `[::ffff:<it>]` is to the kernel.
    const thisHost = all.some((f) => this.localAddresses.has(f.toNormalizedString()))
    if (this.selfPorts.has(port) && (cls === 'loopback' || cls === 'unspecified' || thisHost)) {
      const what = "the sidecar's own port on this host"
      return { allowed: false, cls, rule: 'network:self', reason: `${address}:${port} is ${what}`, what }
    }
    for (const a of this.allowed) {
      if ((a.ports === null || a.ports.has(port)) && dialled.some((f) => inCidr(f, a.cidr))) return { allowed: true, cls }
    }
    // An address of this host's own interfaces reaches whatever listens on 0.0.0.0 here, as
    // loopback does: denied with it, whatever class the address has (a public IP on eth0).
    if (thisHost && cls !== 'loopback' && this.deniedClasses.has('loopback')) {
      const what = dialled.some((f) => this.localAddresses.has(f.toNormalizedString()))
        ? "an address of the sidecar's own host (as good as loopback)"
        : "an IPv6 address carrying an address of the sidecar's own host (as good as loopback)"
      return { allowed: false, cls, rule: 'network:loopback', reason: `${address} is ${what}`, what }
    }
    if (this.deniedClasses.has(cls)) {
      const what = `${ARTICLE[cls] ?? 'a'} ${DESCRIBE[cls]}`
      return { allowed: false, cls, rule: `network:${cls}`, reason: `${address} is ${what}`, what }
    }
    for (const [cidr, text] of this.deniedCidrs) {
      if (all.some((f) => inCidr(f, cidr))) {
        const what = `in the denied range ${text}`
        return { allowed: false, cls, rule: `network:${text}`, reason: `${address} is ${what}`, what }
      }
    }
    return { allowed: true, cls }
  }
}

export function compileNetworkPolicy(network: Config['network']): NetworkPolicy {
  return new NetworkPolicy(network)
}
