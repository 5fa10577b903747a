// The compiled policy: rules in order, first match wins, else the default. Compiled once at
// start-up (and on reload) so a decision is a few set lookups and glob tests, with no I/O.
import { domainToASCII } from 'node:url'
import { isIP } from 'node:net'
import ipaddr from 'ipaddr.js'
import { parseCidr, parseIp } from '../../lib/ip-address.js'
import type { Config, RuleConfig, Mode } from '../../lib/config/schema.js'
import type { Decider, Decision, ResolvedAddress, Target } from '../context.js'
import { compileGlob, pathReadings, MAX_READINGS, type PathMatcher } from './paths.js'
import { addressForms, type AddressForms } from '../resolve/classify.js'

interface CompiledRule {
  id: string
  deny: boolean
  exactHosts: Set<string> | null
  wildcardSuffixes: string[] | null
  cidrs: [ipaddr.IPv4 | ipaddr.IPv6, number][] | null
  ports: Set<number> | null
  methods: Set<string> | null
  paths: PathMatcher[] | null
  schemes: Set<string> | null
  decision: Decision
}

/** Normalises a host the way targets are normalised, so rules and requests compare equal. */
export function normaliseHost(host: string): string {
  let h = host.trim().toLowerCase()
  if (h.startsWith('[') && h.endsWith(']')) h = h.slice(1, -1)
  if (h.endsWith('.')) h = h.slice(0, -1)
  if (isIP(h) === 6) return parseIp(h).toString()
  if (isIP(h) === 4) return h
  try {
    // Gives numeric spellings their dotted meaning and IDN its punycode, as for targets.
    const parsed = new URL(`http://${h}/`).hostname
    return parsed.startsWith('[') ? parsed.slice(1, -1) : parsed
  } catch {
    return domainToASCII(h) || h
  }
}

/**
 * A rule's methods. A deny of GET holds HEAD too: Express, Flask, Django and Rails answer HEAD
 * with the GET handler, which runs (side effects and all) and sends its headers back.
 */
function methodSet(methods: readonly string[], deny: boolean): Set<string> {
  const set = new Set(methods.map((m) => m.toUpperCase()))
  if (deny && set.has('GET')) set.add('HEAD')
  return set
}

function compileRule(rule: RuleConfig, mode: Mode): CompiledRule {
  const deny = rule.action === 'deny'
  const enforced = (rule.mode ?? mode) === 'enforce'
  let exactHosts: Set<string> | null = null
  let wildcardSuffixes: string[] | null = null
  for (const h of rule.hosts ?? []) {
    if (h.startsWith('*.')) (wildcardSuffixes ??= []).push('.' + normaliseHost(h.slice(2)))
    else (exactHosts ??= new Set()).add(normaliseHost(h))
  }
  return {
    id: rule.id,
    deny,
    exactHosts,
    wildcardSuffixes,
    cidrs: rule.cidrs ? rule.cidrs.map((c) => parseCidr(c)) : null,
    ports: rule.ports ? new Set(rule.ports) : null,
    methods: rule.methods ? methodSet(rule.methods, deny) : null,
    // Deny globs ignore case: some upstreams do, and a deny must not be dodged by /ADMIN.
    paths: rule.paths ? rule.paths.map((p) => compileGlob(p, deny)) : null,
    schemes: rule.schemes ? new Set(rule.schemes) : null,
    decision: {
      action: rule.action,
      rule: rule.id,
      reason: deny ? `denied by rule ${rule.id}` : `allowed by rule ${rule.id}`,
      enforced: deny ? enforced : true,
    },
  }
}

function hostMatches(r: CompiledRule, t: Target, address: AddressForms | null): boolean {
  if (!r.exactHosts && !r.wildcardSuffixes && !r.cidrs) return true
  if (r.exactHosts?.has(t.host)) return true
  if (r.wildcardSuffixes) for (const s of r.wildcardSuffixes) if (t.host.endsWith(s)) return true
  // A name's resolved address is matched by deny rules only: an allow opens what it names.
  if (address && (r.cidrs || (r.deny && r.exactHosts)) && (r.deny || t.hostIsIp)) {
    // Fail closed both ways: a deny matches the target by every IPv4 address it carries
    // (64:ff9b::7f00:1 is 127.0.0.1 to a NAT64 network), an allow only as it would be dialled.
    for (const f of r.deny ? address.all : address.dialled) {
      if (r.deny && r.exactHosts?.has(f.toString())) return true
      if (r.cidrs) for (const [range, bits] of r.cidrs) if (range.kind() === f.kind() && f.match(range, bits)) return true
    }
  }
  return false
}

/** A resolved name's readings: allows match the address dialled, denies every address of the answer. */
function answerForms(resolved: Pick<ResolvedAddress, 'address' | 'answer'>): AddressForms {
  const dialled = addressForms(parseIp(resolved.address))
  if (resolved.answer.length <= 1) return dialled
  return { dialled: dialled.dialled, all: resolved.answer.flatMap((a) => addressForms(parseIp(a.address)).all) }
}

/** A path with more readings than are judged (paths.ts MAX_READINGS): denied whatever the mode or default, as the network floor is. */
const UNJUDGEABLE_PATH: Decision = {
  action: 'deny',
  rule: 'policy:path-readings',
  reason: `the path combines dot segments, doubled slashes, ;params or trailing dots and spaces into more than ${MAX_READINGS} readings a server might act on; it is not judged on some of them`,
  enforced: true,
}

export class Policy implements Decider {
  private readonly rules: CompiledRule[]
  private readonly needsPaths: boolean
  private readonly defaultDecision: Decision
  readonly decidesByAddress: boolean
  readonly methods: ReadonlySet<string>

  constructor(policy: Config['policy']) {
    this.rules = policy.rules.map((r) => compileRule(r, policy.mode))
    this.needsPaths = this.rules.some((r) => r.paths)
    this.decidesByAddress = this.rules.some((r) => r.deny && (r.cidrs || [...(r.exactHosts ?? [])].some((h) => isIP(h) !== 0)))
    this.methods = new Set(this.rules.flatMap((r) => [...(r.methods ?? [])]))
    const deny = policy.default === 'deny'
    this.defaultDecision = {
      action: policy.default,
      rule: 'default',
      reason: deny ? 'no rule allows this request and the default is deny' : 'no rule matched; the default is allow',
      enforced: deny ? policy.mode === 'enforce' : true,
    }
  }

  decide(method: string, target: Target, resolved?: Pick<ResolvedAddress, 'address' | 'answer'>): Decision {
    const tunnel = method === 'CONNECT'
    const judgesPaths = this.needsPaths && !tunnel
    const readings = judgesPaths ? pathReadings(target.path) : null
    if (judgesPaths && readings === null) return UNJUDGEABLE_PATH
    const scheme = tunnel ? 'https' : target.scheme
    let address: AddressForms | null | undefined
    // CONNECT: an allow, or a deny, on this host that depends on method or path was passed over.
    let conditionalAllow: CompiledRule | null = null
    let conditionalDeny: CompiledRule | null = null
    for (const r of this.rules) {
      if (r.ports && !r.ports.has(target.port)) continue
      // A tunnel may carry plain HTTP, each request in it judged as http: an allow of http alone
      // is one more condition TLS cannot meet (Node's fetch tunnels http:// on any port).
      let plainOnly = false
      if (r.schemes && !r.schemes.has(scheme)) {
        if (!(tunnel && !r.deny && r.schemes.has('http'))) continue
        plainOnly = true
      }
      if (address === undefined && (r.cidrs || (r.deny && r.exactHosts))) {
        if (target.hostIsIp) address = addressForms(parseIp(target.host))
        else if (resolved !== undefined) address = answerForms(resolved)
      }
      if (!hostMatches(r, target, address ?? null)) continue
      if (tunnel && (plainOnly || r.methods || r.paths)) {
        // A TLS tunnel's requests cannot be seen: an allow that depends on method or path cannot
        // be proven, and a deny that depends on them might apply, so the deny wins. A tunnel of
        // plain HTTP can be seen: it may open, and each request in it is decided on its own. Both
        // are passed over to see what the rules after them say of this host and port: when
        // nothing could ever be allowed in the tunnel, it is a plain denial by what denies it.
        if (r.deny) conditionalDeny ??= r
        else conditionalAllow ??= r
        continue
      }
      if (r.methods && !r.methods.has(method)) continue
      if (r.paths && readings) {
        const matches = (glob: PathMatcher) => readings.some((p) => glob.test(p))
        const all = (glob: PathMatcher) => readings.every((p) => glob.test(p))
        if (r.deny ? !r.paths.some(matches) : !r.paths.some(all)) continue
      }
      return this.tunnelDecision(r.decision, conditionalAllow, conditionalDeny)
    }
    return this.tunnelDecision(this.defaultDecision, conditionalAllow, conditionalDeny)
  }

  /**
   * `d`, what the first rule without method or path conditions (or the default) decides, made
   * inspectable when rules passed over for a CONNECT could decide otherwise for some request in
   * it: an allow before a deny (the tunnel then opens for plain HTTP only), or a deny before an
   * allow (it might apply). A deny with only denies passed over stays a plain denial.
   */
  private tunnelDecision(d: Decision, conditionalAllow: CompiledRule | null, conditionalDeny: CompiledRule | null): Decision {
    if (d.action === 'deny') return conditionalAllow ? this.inspectableDeny(d, conditionalAllow) : d
    if (!conditionalDeny) return d
    const r = conditionalDeny
    return { action: 'deny', rule: r.id, reason: `rule ${r.id} restricts methods or paths on this host, which a TLS tunnel cannot show`, enforced: r.decision.enforced, inspectable: true }
  }

  /** A tunnel denied only because an earlier allow's method or path rules cannot be seen in TLS. */
  private inspectableDeny(d: Decision, passedOver: CompiledRule): Decision {
    const reason = passedOver.methods || passedOver.paths ? `rule ${passedOver.id} allows only some methods or paths on this host, which a TLS tunnel cannot show` : `rule ${passedOver.id} allows only plain http on this host, which a TLS tunnel is not`
    return { action: 'deny', rule: d.rule, reason, enforced: d.enforced, inspectable: true }
  }
}
