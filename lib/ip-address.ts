// IP address and CIDR parsing, everywhere an address is judged: ipaddr.js, except for one spelling.
// ipaddr.js reads `::a.b.c.d` as the IPv4-mapped `::ffff:a.b.c.d` (its "deprecated transitional"
// form). That is the IPv4-compatible address `::a.b.c.d`, another destination: getaddrinfo hands
// `::a14:5` back as `::10.20.0.5`, so a name resolving there was judged as the mapped 10.20.0.5
// ("as dialled", where an IPv4 allow opens it) and dialled as IPv6. An address with a dotted tail
// is read by the WHATWG URL parser (RFC 4291's reading, as the kernel's), then handed to ipaddr.js.
import ipaddr from 'ipaddr.js'

export type IpAddress = ipaddr.IPv4 | ipaddr.IPv6

/** Throws, as ipaddr.parse does, on anything that is not an IP address (no brackets, no zone). */
export function parseIp(text: string): IpAddress {
  if (text.includes(':') && text.includes('.')) {
    let canonical: string
    try {
      canonical = new URL(`http://[${text}]/`).hostname.slice(1, -1)
    } catch {
      return ipaddr.parse(text) // throws its own error for what is no address
    }
    return ipaddr.parse(canonical)
  }
  return ipaddr.parse(text)
}

/** As ipaddr.process: an IPv4-mapped IPv6 address is its IPv4 (the socket destination is). */
export function processIp(text: string): IpAddress {
  const addr = parseIp(text)
  return addr.kind() === 'ipv6' && (addr as ipaddr.IPv6).isIPv4MappedAddress() ? (addr as ipaddr.IPv6).toIPv4Address() : addr
}

/** A CIDR range (`10.0.0.0/8`, `::a00:0/104`); throws on anything else, as ipaddr.parseCIDR does. */
export function parseCidr(text: string): [IpAddress, number] {
  const [, bits] = ipaddr.parseCIDR(text)
  return [parseIp(text.slice(0, text.lastIndexOf('/'))), bits]
}
