import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseConfig, ConfigError, loadConfigFile } from '../lib/config/load.js'
import { CLI } from './helpers/cli.js'
import { CANARY } from './helpers/harness.js'
import { checkConfig } from '../cli/check-config.js'
import { describeFailure } from '../cli/describe-failure.js'

// `latchkey check-config` in-process: what it would exit with and print, for the table of files
// judged below (a CLI start is ~0.25 s of CPU, and this file checked ~30). A few cases still run
// the CLI itself, proving its wiring: exit 0 and 1, stdout and stderr, the environment read.
const check = async (file: string, env: NodeJS.ProcessEnv = process.env) => {
  const { code, stdout, stderr } = await checkConfig(file, env)
  return { status: code, stdout, stderr }
}

/**
 * `latchkey sidecar --config <file>` in-process, as cli/latchkey.ts runs it (the config loaded
 * with the environment's overrides, then started): the code it would exit with and its stderr,
 * the failure said as the CLI says it. For configs refused before anything listens; the cases
 * that prove the command's wiring (a port in use, an unreadable secrets file) start the CLI.
 */
const sidecarStart = async (file: string, env: NodeJS.ProcessEnv = process.env) => {
  const { startSidecar } = await import('../proxy/sidecar.js')
  const logs: string[] = []
  try {
    const sidecar = await startSidecar(loadConfigFile(file, env), { env, logDestination: { write: (line: string) => void logs.push(line) } })
    await sidecar.close()
    return { status: 0, stdout: logs.join(''), stderr: '' }
  } catch (err) {
    return { status: 1, stdout: logs.join(''), stderr: `${describeFailure(err)}\n` }
  }
}

const problems = (text: string, env: NodeJS.ProcessEnv = {}) => {
  try {
    parseConfig(text, 'test.yaml', env)
  } catch (err) {
    if (err instanceof ConfigError) return err.problems.map((p) => `${p.path}: ${p.message}`)
    throw err
  }
  return []
}

t.test('defaults fill a minimal file', async (t) => {
  const c = parseConfig('version: 1\n')
  t.equal(c.sidecar.listen.port, 15001)
  t.equal(c.sidecar.listen.host, '127.0.0.1')
  t.equal(c.policy.default, 'deny', 'the default policy is deny')
  t.ok(c.network.deny.includes('metadata') && c.network.deny.includes('loopback'), 'safe network defaults')
})

t.test('errors name the path and the problem', async (t) => {
  t.same(problems('version: 2\n'), ['version: must be 1'])
  t.same(problems('version: 1\nsidecar: { listen: { prot: 1 } }\n'), ['sidecar.listen.prot: unknown key'])
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: allow, ports: [70000] } ] }\n'), ['policy.rules[0].ports[0]: must be <= 65535'])
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: maybe } ] }\n'), ['policy.rules[0].action: must be one of "allow", "deny"'])
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: allow }, { id: a, action: deny } ] }\n'), ['policy.rules[1].id: duplicate rule id "a"'])
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: allow, cidrs: [10.0.0.0/33] } ] }\n'), ['policy.rules[0].cidrs[0]: not a CIDR range: "10.0.0.0/33"'])
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: allow, hosts: ["a.*.com"] } ] }\n'), ['policy.rules[0].hosts[0]: wildcards are only allowed as a leading "*." label'])
  // A path glob's wildcards are bounded: 32 pass (judged in under a millisecond on a 16 KB path), 33 are refused.
  t.same(problems(`version: 1\npolicy: { rules: [ { id: a, action: allow, hosts: [a.com], paths: ["/${'?*'.repeat(16)}", "/${'**/'.repeat(32)}"] } ] }\n`), [])
  t.same(problems(`version: 1\npolicy: { rules: [ { id: a, action: allow, hosts: [a.com], paths: ["/x", "/${'*a'.repeat(33)}"] } ] }\n`), [
    "policy.rules[0].paths[1]: has 33 wildcards (*, ** and ?), more than 32: each makes every request's path slower to judge",
  ])
  t.same(problems('version: 1\nnetwork: { deny: [bogus] }\n').length, 1)
  t.same(problems('version: 1\nroutes: { gh: "https://api.github.com/repos" }\n'), ['routes.gh: must be an origin (scheme://host[:port]) with no path, query or fragment'])
  t.same(problems('version: 1\nsidecar: { listen: { host: 0.0.0.0 } }\n'), ['sidecar.listen.host: must be a loopback address (set sidecar.allow_remote_clients to override)'])
  t.same(problems(`version: 1\nsidecar: { agent_id: "agent:x:prod:${'a'.repeat(600)}" }\n`), ['sidecar.agent_id: must NOT have more than 512 characters'])
  t.same(problems('version: 1\ntasks: { required: true, default: { enabled: true } }\n'), ['tasks.required: contradicts tasks.default.enabled: a default task names every call'])
  t.same(problems('version: 1\nsidecar: { admin: { host: 0.0.0.0 } }\n'), ['sidecar.admin.host: must be a loopback address (set sidecar.allow_remote_clients to override)'], 'the admin port too')
  t.same(problems('version: 1\nsidecar: { listen: { host: 127.attacker.example } }\n').length, 1, 'a name that merely starts with 127. is not loopback')
  // Config probe: `127.1` was refused as "must be a loopback address", which it is.
  t.same(problems('version: 1\nsidecar: { listen: { host: "127.1" }, admin: { host: "0177.0.0.1" } }\n'), [
    'sidecar.listen.host: write an IPv4 address as four decimal parts without leading zeros (010 is 8 to some parsers, 10 to others)',
    'sidecar.admin.host: write an IPv4 address as four decimal parts without leading zeros (010 is 8 to some parsers, 10 to others)',
  ], 'a loopback address written ambiguously is refused for that')
  for (const host of ['127.0.0.2', '::1', '"0:0:0:0:0:0:0:1"', '"::ffff:127.0.0.1"', 'localhost']) t.same(problems(`version: 1\nsidecar: { listen: { host: ${host} }, admin: { host: ${host} } }\n`), [], `${host} is loopback`)
  const AMBIGUOUS = 'write an IPv4 address as four decimal parts without leading zeros (010 is 8 to some parsers, 10 to others)'
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: deny, cidrs: ["127.000.000.010/32"], hosts: ["010.0.0.1", "2130706433", "cafe.beef"] } ] }\nnetwork: { allow: [ { cidr: 010.0.0.0/8 } ] }\n'), [
    `policy.rules[0].cidrs[0]: ${AMBIGUOUS}`,
    `policy.rules[0].hosts[0]: ${AMBIGUOUS}`,
    `policy.rules[0].hosts[1]: ${AMBIGUOUS}`,
    `network.allow[0].cidr: ${AMBIGUOUS}`,
  ], 'an address some parsers read as octal is refused, not guessed')
  const leaky = problems('version: 1\ncredentials: [ { id: a, audience: "https://user:S3CRET-IN-URL@api ex.com", source: static, secret: S, inject: { type: bearer } } ]\n')
  t.same(leaky, ['credentials[0].audience: not a URL (scheme://host[:port] expected)'], 'a mistyped URL is not repeated: it can carry a credential')
  t.same(
    problems('version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: bearer } }, { id: b, audience: "https://X.com:443", source: static, secret: S, inject: { type: bearer } } ]\n'),
    ['credentials[1].audience: audience https://x.com:443 already bound by credential "a"'],
  )
  t.same(
    problems('version: 1\nroutes: { any: "https://*.example.com" }\ncredentials: [ { id: a, audience: "http://*.test:8080", source: static, secret: S, inject: { type: bearer } } ]\n'),
    ['routes.any: must name one host: a wildcard (*) matches nothing here, origins are compared exactly', 'credentials[0].audience: must name one host: a wildcard (*) matches nothing here, origins are compared exactly'],
    'a wildcard audience is refused: compared exactly, it would bind its credential to nothing',
  )
  // Two spellings of one origin (host-policy probe): one credential was silently dropped, its strip list with it.
  t.same(
    problems('version: 1\ncredentials: [ { id: a, audience: "http://api.example:8080", source: static, secret: S, inject: { type: bearer } }, { id: b, audience: "http://API.EXAMPLE.:8080", source: static, secret: S, inject: { type: bearer } } ]\n'),
    ['credentials[1].audience: audience http://api.example:8080 already bound by credential "a"'],
  )
  // A host no request can name: the deny silently matched nothing (`api.example..`, `a..b`), or another host (`twin\lk.test` read as `twin`).
  const EMPTY_LABEL = 'has an empty label (a leading dot, two dots in a row, or more than one trailing dot): no request names it, and the rule would match nothing or another host'
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: deny, hosts: ["api.example..", "a..b", "*.x..y", ".lead.example", "twin\\\\lk.test", "%61pi.example", "ok.example.", "*.Fine.Example", "bücher.example"] } ] }\nroutes: { r: "http://api.example..:8080" }\n'), [
    `policy.rules[0].hosts[0]: "api.example.." ${EMPTY_LABEL}`,
    `policy.rules[0].hosts[1]: "a..b" ${EMPTY_LABEL}`,
    `policy.rules[0].hosts[2]: "*.x..y" ${EMPTY_LABEL}`,
    `policy.rules[0].hosts[3]: ".lead.example" ${EMPTY_LABEL}`,
    'policy.rules[0].hosts[4]: "twin\\\\lk.test" holds a character no host name has (\\, %, /, @, ?, # or a space): no request names it, and the rule would match nothing or another host',
    'policy.rules[0].hosts[5]: "%61pi.example" holds a character no host name has (\\, %, /, @, ?, # or a space): no request names it, and the rule would match nothing or another host',
    'routes.r: its host has an empty label (a leading dot, two dots in a row, or more than one trailing dot)',
  ], 'one trailing dot, case and IDN are the same host, and pass')
  t.same(problems('version: 1\npolicy: { rules: [ { id: a, action: allow, hosts: ["::1", "[::1]", "fd00::2"] }, { id: b, action: allow, hosts: ["::1:80", "http://x"] } ] }\n'), [
    'policy.rules[1].hosts[1]: must be a host name or address, without scheme, port or path',
  ], 'an IPv6 address is a host bare or bracketed (::1:80 is one too: an address, not ::1 with a port)')
  const attestors = (k8s: string, spiffe: string) =>
    `version: 1\nbroker: { issuer: "https://broker.example", registry_file: /agents.yaml, attestors: { kubernetes: { issuer: k8s, jwks_file: /k.json${k8s} }, spiffe: { trust_domain: example.org, jwks_file: /s.json${spiffe} } } }\n`
  t.same(problems(attestors(', max_token_age_s: 30', ', max_lifetime_s: 1d')), ['broker.attestors.kubernetes.max_token_age_s: must be >= 60', 'broker.attestors.spiffe.max_lifetime_s: must be integer'])
  const evidence = parseConfig(attestors('', '')).broker!.attestors
  t.same([evidence.kubernetes!.max_token_age_s, evidence.spiffe!.max_lifetime_s], [86_400, 86_400], 'workload evidence older (k8s) or longer-lived (SPIFFE) than a day is refused by default')
  t.same(problems('version: 1\nversion: 1\n'), ['line 2: duplicate key "version"'], 'duplicate YAML keys are refused, by name')
  t.same(problems('version: 1\nsidecar:\n  listen: { port: 1, port: 2 }\n'), ['line 3: duplicate key "port"'])
  // A mapping of 30,000 keys (yaml's own check compared each with all before it: 2.3 s at 20,000).
  const many = Array.from({ length: 30_000 }, (_, i) => `  k${i}: 1\n`).join('')
  t.same(problems(`version: 1\nextra:\n${many}  k17: 2\n`), ['line 30003: duplicate key "k17"'], 'found in a large mapping, by line')
  // Different keys to yaml, one key in the data: the second's value replaced the first's.
  t.same(problems('version: 1\nroutes: { 1: "http://a.example", "1": "http://b.example" }\n'), ['line 2: duplicate key "\\"1\\""'], 'a number key and a string key that become one key')
  t.same(problems('version: 1\nroutes: { ~: "http://a.example", "": "http://b.example" }\n'), ['line 2: duplicate key "\\"\\""'], 'null and "" become one key')
  t.same(problems('version: 1\n---\nversion: 1\n'), ['line 2: a config file holds one YAML document; remove the second (after ---)'])
  t.same(problems('['.repeat(20_000)), [': the YAML nests too deeply'], 'deep nesting is one clear line, not a stack overflow per level')
  t.same(problems('version: 1\nsidecar:\n  admin: { <<: { host: x } }\n'), ['sidecar.admin.<<: unknown key (YAML merge keys are not supported: repeat the keys)'])
  t.ok(problems('version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: header } } ]\n').length > 0, 'header injector needs a name')
})

t.test('a mistake under inject is one line, about the injector its type names', async (t) => {
  // Judged against every branch of the oneOf, one unknown key was eleven lines that contradicted
  // each other (`type: must be "header"`, `missing "username"`, ...).
  const inject = (value: string) => problems(`version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: ${value} } ]\n`)
  t.same(inject('{ type: bearer, bogus: 1 }'), ['credentials[0].inject.bogus: unknown key'])
  t.same(inject('{ type: header, name: X-Key, format: "Key" }'), ['credentials[0].inject.format: must match pattern "\\{token\\}"'])
  t.same(inject('{ type: basic }'), ['credentials[0].inject: missing required key "username"'])
  t.same(inject('{ type: cookie }'), ['credentials[0].inject.type: must be one of "bearer", "header", "query", "basic"'])
  t.same(inject('{ name: X-Key }'), ['credentials[0].inject: missing required key "type"'])
  t.same(inject('{ type: query, name: key }'), [], 'and a right one passes')
})

t.test('a header injector names a header a credential can ride in', async (t) => {
  const named = (name: string) => problems(`version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: header, name: ${name} } } ]\n`)
  // Host put the secret where front ends log it; Content-Length and Transfer-Encoding made every
  // call a retryable 502; Connection sent no credential at all, silently.
  t.same(named('Host'), ['credentials[0].inject.name: Host routes, frames or is dropped with the request\'s hop (the upstream routes by it, and front ends log it): a credential cannot be injected there'])
  for (const name of ['content-length', 'Transfer-Encoding', 'Connection', 'Keep-Alive', 'Upgrade', 'TE', 'Trailer', 'Expect', 'Proxy-Authorization', 'Proxy-Connection']) {
    t.match(named(name), [new RegExp(`^credentials\\[0\\]\\.inject\\.name: ${name} routes, frames or is dropped`)], name)
  }
  for (const name of ['X-Api-Key', 'Cookie', 'Authorization', 'X-Host', 'Private-Token']) t.same(named(name), [], `${name} is fine`)
})

t.test('a header injector\'s format holds {token} once, in text a header can carry', async (t) => {
  const formatted = (format: string) => problems(`version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: header, name: X-Key, format: ${format} } } ]\n`)
  // Two placeholders passed and sent the header cut short at the second: `{token}-{token}` was `SECRET-`.
  t.same(formatted('"{token}-{token}"'), ['credentials[0].inject.format: must hold {token} exactly once: it holds it 2 times, and the credential is written only where the first is (the header would be cut short at the second)'])
  // Text a header cannot carry passed check-config and start-up, then failed every call (502, retryable).
  const cannot = 'credentials[0].inject.format: holds characters outside printable ASCII (a line break, NUL, tab or text beyond ASCII): a header carries printable ASCII, as the secret must be'
  for (const [name, format] of [
    ['Cyrillic', '"Ключ {token}"'],
    ['a NUL', '"{token}\\0"'],
    ['a header of its own', '"K\\r\\nX-Evil: 1 {token}"'],
    ['a tab', '"K\\t{token}"'],
    ['Latin-1', '"Clé {token}"'],
  ]) t.same(formatted(format!), [cannot], name!)
  t.same(formatted('"Key {token} "'), ['credentials[0].inject.format: starts or ends with a space, which a header cannot carry (a server trims it): remove it'])
  for (const format of ['"{token}"', '"Key {token}"', '"Token token={token}, realm=api"', '"{token}:x"']) t.same(formatted(format), [], `${format} is fine`)
  // The name is a token (RFC 9110 §5.1) already: the schema refuses any other.
  for (const name of ['"X Key"', '"X-Key:"', '"Ключ"', '"X\\r\\nY"']) {
    t.match(problems(`version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: header, name: ${name} } } ]\n`), [/^credentials\[0\]\.inject\.name: must match pattern/], `name ${name} is refused`)
  }
  // As check-config says it, naming the setting.
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  const file = join(dir, 'format.yaml')
  writeFileSync(file, `version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: header, name: X-Key, format: "{token}-{token}" } }, { id: b, audience: "https://y.com", source: static, secret: S, inject: { type: header, name: X-Key, format: "K\\r\\nX-Evil: 1 {token}" } } ]\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const r = await check(file, { ...process.env, LATCHKEY_SECRET_S: 'x' })
  t.equal(r.status, 1, 'check-config refuses it')
  t.match(r.stderr, /credentials\[0\]\.inject\.format: must hold \{token\} exactly once/)
  t.match(r.stderr, /credentials\[1\]\.inject\.format: holds characters outside printable ASCII/)
  t.notMatch(r.stderr, /X-Evil/, 'the format is not quoted')
})

t.test('environment overrides apply before validation', async (t) => {
  const c = parseConfig('version: 1\n', 'x', { LATCHKEY__SIDECAR__LISTEN__PORT: '16001', LATCHKEY__POLICY__DEFAULT: 'allow' })
  t.equal(c.sidecar.listen.port, 16001)
  t.equal(c.policy.default, 'allow')
  t.same(problems('version: 1\n', { LATCHKEY__SIDECAR__LISTEN__PORT: 'abc' }), ['sidecar.listen.port: must be integer (set by LATCHKEY__SIDECAR__LISTEN__PORT)'], 'the variable is named, not the file')
  t.same(problems('version: 1\n', { LATCHKEY__SIDECAR__NOPE: '1' }), ['sidecar.nope: unknown key (set by LATCHKEY__SIDECAR__NOPE)'])
  t.same(
    problems('version: 1\ncredentials: [ { id: a, audience: "https://x.com", source: static, secret: S, inject: { type: bearer } } ]\n', { LATCHKEY__CREDENTIALS__0__AUDIENCE: 'ftp://x' }),
    ['credentials[0].audience: must match pattern "^https?://" (set by LATCHKEY__CREDENTIALS__0__AUDIENCE)'],
    'into a list element too',
  )
  t.same(
    problems('version: 1\nroutes: { "a/b": "http://127.0.0.1:1", "": "http://127.0.0.1:2" }\n'),
    ['routes."a/b": not a valid name: must match pattern "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"', 'routes."": not a valid name: must match pattern "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"'],
    'a bad key is named, once',
  )
  t.same(problems('version: 1\npolicy: { default: nope }\n', { LATCHKEY__SIDECAR__LISTEN__PORT: '16001' }), ['policy.default: must be one of "allow", "deny"'], "the file's own problems stay the file's")
  t.throws(() => parseConfig('version: 1\n', 'x', { LATCHKEY____PROTO____X: '1' }), { code: 'LK_CONFIG_INVALID' })
})

t.test('an override reaches into a list only by an index it has', async (t) => {
  const file = 'version: 1\npolicy:\n  rules:\n    - { id: a, action: allow, hosts: [x.com] }\n'
  t.equal(parseConfig(file, 'x', { LATCHKEY__POLICY__RULES__0__ACTION: 'deny' }).policy.rules[0]!.action, 'deny', 'an index works')
  // `length` used to empty the list (the whole network floor, with NETWORK__DENY__LENGTH=0) and
  // any other name was set on the array and ignored, both passing as a valid config.
  t.same(problems(file + 'network: { deny: [metadata, loopback, private] }\n', { LATCHKEY__NETWORK__DENY__LENGTH: '0' }), ['LATCHKEY__NETWORK__DENY__LENGTH: network.deny is a list of 3: "length" is not one of its indexes (override the whole list with LATCHKEY__NETWORK__DENY)'])
  t.same(problems(file, { LATCHKEY__POLICY__RULES__X: '1' }), ['LATCHKEY__POLICY__RULES__X: policy.rules is a list of 1: "x" is not one of its indexes (override the whole list with LATCHKEY__POLICY__RULES)'])
  t.same(problems(file, { LATCHKEY__POLICY__RULES__3__ACTION: 'deny' }), ['LATCHKEY__POLICY__RULES__3__ACTION: policy.rules is a list of 1: "3" is not one of its indexes (override the whole list with LATCHKEY__POLICY__RULES)'])
  t.same(problems(file, { LATCHKEY__POLICY__RULES__00__ACTION: 'deny' }).length, 1, '00 is not an index')
  t.same(problems(file, { LATCHKEY__POLICY__RULES__0__HOSTS__LENGTH: '0' }), ['LATCHKEY__POLICY__RULES__0__HOSTS__LENGTH: policy.rules.0.hosts is a list of 1: "length" is not one of its indexes (override the whole list with LATCHKEY__POLICY__RULES__0__HOSTS)'])
  t.same(parseConfig(file, 'x', { LATCHKEY__NETWORK__DENY: '[metadata]' }).network.deny, ['metadata'], 'the whole list can still be replaced')
})

t.test('the shipped configs are valid', async (t) => {
  for (const f of ['deploy/examples/up.yaml', 'deploy/latchkey.reference.yaml']) {
    t.doesNotThrow(() => loadConfigFile(f), f)
  }
})

t.test('latchkey check-config exits 0 on valid and 1 naming the problem', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  const bad = join(dir, 'bad.yaml')
  writeFileSync(bad, 'version: 1\npolicy: { default: sometimes }\n')
  const ok = spawnSync(process.execPath, [CLI, 'check-config', 'deploy/examples/up.yaml'], { encoding: 'utf8' })
  t.equal(ok.status, 0)
  t.match(ok.stdout, /valid/)
  // Its registry_file (agents.yaml) is beside it, where `latchkey up` reads it: checked there, not
  // warned about as missing from this directory.
  t.notMatch(ok.stderr, /warning: broker\.registry_file/, 'no false warning that the broker would not start')
  t.match(ok.stderr, /note: broker\.registry_file agents\.yaml: not in this directory, .*checked beside the config \(.*deploy\/examples\/agents\.yaml\)/)
  // And checked there: a registry that does not parse, beside a config that names it, is refused.
  const beside = join(dir, 'up.yaml')
  writeFileSync(beside, readFileSync('deploy/examples/up.yaml', 'utf8'))
  writeFileSync(join(dir, 'agents.yaml'), 'version: 1\nagents: [\n')
  const brokenBeside = await check(beside)
  t.equal(brokenBeside.status, 1, 'a broken registry beside the config is found and refused')
  t.match(brokenBeside.stderr, /broker\.registry_file/)
  const r = spawnSync(process.execPath, [CLI, 'check-config', bad], { encoding: 'utf8' })
  t.equal(r.status, 1)
  t.match(r.stderr, /policy\.default: must be one of "allow", "deny"/)
  // What the sidecar reads at start besides the config is checked too: a config called valid starts.
  const pointsAtBad = join(dir, 'points.yaml')
  writeFileSync(join(dir, 'policy.yaml'), 'default: deny\nrules: [\n')
  writeFileSync(pointsAtBad, `version: 1\nsidecar: { policy_file: ${join(dir, 'policy.yaml')} }\naudit: { jsonl: { path: ${join(dir, 'no-such-dir', 'a.jsonl')} } }\n`)
  const pb = await check(pointsAtBad)
  t.equal(pb.status, 1, 'a policy file that does not compile makes the config invalid')
  t.match(pb.stderr, /sidecar\.policy_file: .*policy\.yaml: policy bundle is not valid YAML\/JSON: .* at line 3, column 1$/m, 'naming where')
  // Not UTF-8 (a Latin-1 `/café/` rule would load and never match): refused, naming the line, as the config itself is.
  writeFileSync(join(dir, 'policy.yaml'), Buffer.from('default: deny\nrules: [ { id: c, action: deny, paths: ["/caf\u00e9/**"] } ]\n', 'latin1'))
  const latin1 = await check(pointsAtBad)
  t.equal(latin1.status, 1)
  t.match(latin1.stderr, `sidecar.policy_file: ${join(dir, 'policy.yaml')}: line 2: not valid UTF-8 (save the file as UTF-8)`)
  writeFileSync(join(dir, 'policy.yaml'), 'default: deny\nrules: []\n')
  const pw = await check(pointsAtBad)
  t.equal(pw.status, 0, 'a directory missing on this machine is not held against the config')
  t.match(pw.stderr, /^warning: audit\.jsonl\.path: .*a\.jsonl: its directory .*no-such-dir does not exist \(the sidecar would not start on this machine\)$/m)
  const started = spawnSync(process.execPath, [CLI, 'sidecar', '--config', pointsAtBad], { encoding: 'utf8', timeout: 10_000 })
  t.same([started.status, started.stderr.trim()], [1, `audit.jsonl.path ${join(dir, 'no-such-dir', 'a.jsonl')}: its directory ${join(dir, 'no-such-dir')} does not exist`], 'and the sidecar says the same in one line, not a stack trace')
  writeFileSync(pointsAtBad, `version: 1\nsidecar: { policy_file: ${join(dir, 'gone.yaml')} }\naudit: { jsonl: { path: ${dir} } }\n`)
  const dirAsFile = await check(pointsAtBad)
  t.match(dirAsFile.stderr, /warning: sidecar\.policy_file: .*gone\.yaml: cannot read \(ENOENT\)/)
  t.match(dirAsFile.stderr, /warning: audit\.jsonl\.path: .* is a directory/)
  // A secret in neither the environment nor secrets.file: the sidecar would refuse to start, and
  // check-config said "valid" without a word.
  const needsSecret = join(dir, 'secret.yaml')
  writeFileSync(needsSecret, `version: 1\ncredentials: [ { id: api, audience: "https://api.example.com", source: static, secret: NO_SUCH_TOKEN_X, inject: { type: bearer } } ]\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const env = { ...process.env }
  delete env.LATCHKEY_SECRET_NO_SUCH_TOKEN_X
  const noSecret = await check(needsSecret, env)
  t.same([noSecret.status, noSecret.stderr.trim()], [0, 'warning: credentials[0].secret: secret NO_SUCH_TOKEN_X is neither in env LATCHKEY_SECRET_NO_SUCH_TOKEN_X nor in secrets.file (the sidecar would not start on this machine)'], 'a missing secret is said, naming where it was looked for')
  const withSecret = await check(needsSecret, { ...env, LATCHKEY_SECRET_NO_SUCH_TOKEN_X: 'x'.repeat(32) })
  t.same([withSecret.status, withSecret.stderr], [0, ''], 'and nothing is said once it is there')
  // Set but empty, in the environment or the file: said so, as the sidecar says it, not "in neither place".
  const secretsFile = join(dir, 'secrets.yaml')
  writeFileSync(secretsFile, 'NO_SUCH_TOKEN_X: canaryFILESECRET0014\n')
  writeFileSync(needsSecret, `version: 1\nsecrets: { file: ${secretsFile} }\ncredentials: [ { id: api, audience: "https://api.example.com", source: static, secret: NO_SUCH_TOKEN_X, inject: { type: bearer } } ]\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const emptyEnv = await check(needsSecret, { ...env, LATCHKEY_SECRET_NO_SUCH_TOKEN_X: '' })
  t.same([emptyEnv.status, emptyEnv.stderr.trim()], [0, 'warning: credentials[0].secret: secret NO_SUCH_TOKEN_X: env LATCHKEY_SECRET_NO_SUCH_TOKEN_X is set but empty (it is read before secrets.file: unset it, or set it to the secret) (the sidecar would not start on this machine)'])
  const refused = await sidecarStart(needsSecret, { ...env, LATCHKEY_SECRET_NO_SUCH_TOKEN_X: '' })
  t.same([refused.status, refused.stderr.trim()], [1, 'credential "api": secret NO_SUCH_TOKEN_X: env LATCHKEY_SECRET_NO_SUCH_TOKEN_X is set but empty (it is read before secrets.file: unset it, or set it to the secret)'], 'the sidecar refuses it in the same words')
  writeFileSync(secretsFile, 'NO_SUCH_TOKEN_X: ""\n')
  const emptyInFile = await check(needsSecret, env)
  t.same([emptyInFile.status, emptyInFile.stderr.trim()], [0, 'warning: credentials[0].secret: secret NO_SUCH_TOKEN_X is empty in secrets.file (the sidecar would not start on this machine)'])
  // `policy` beside a policy file did nothing: an error, naming the variable when the environment set it.
  const both = join(dir, 'both.yaml')
  writeFileSync(both, `version: 1\nsidecar: { policy_file: ${join(dir, 'policy.yaml')} }\npolicy: { default: allow }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const bothRun = await check(both)
  t.same([bothRun.status, bothRun.stderr.trim()], [1, `${both}: invalid configuration:\n  policy: set beside sidecar.policy_file, whose rules replace it: remove one of them`])
  const byEnv = await check(pointsAtBad, { ...process.env, LATCHKEY__POLICY__DEFAULT: 'allow' })
  t.same([byEnv.status, byEnv.stderr.trim()], [1, `${pointsAtBad}: invalid configuration:\n  policy: set beside sidecar.policy_file, whose rules replace it: remove one of them (set by LATCHKEY__POLICY__DEFAULT)`])
  // What the environment changed is said, by variable and setting: a widened default is not silent.
  const plain = join(dir, 'plain.yaml')
  writeFileSync(plain, `version: 1\npolicy: { default: deny, rules: [ { id: a, action: deny, methods: [POST] } ] }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const widened = spawnSync(process.execPath, [CLI, 'check-config', plain], { encoding: 'utf8', env: { ...process.env, LATCHKEY__POLICY__DEFAULT: 'allow', LATCHKEY__POLICY__RULES__0__ACTION: 'allow' } })
  t.same([widened.status, widened.stderr.trim()], [0, 'note: set by the environment, not the file: LATCHKEY__POLICY__DEFAULT (policy.default), LATCHKEY__POLICY__RULES__0__ACTION (policy.rules[0].action)'])
  // The rules counted are those the sidecar starts with: a policy file's replace the config's.
  writeFileSync(join(dir, 'policy.yaml'), 'default: deny\nrules: [ { id: a, action: allow, hosts: [a.com] }, { id: b, action: allow, hosts: [b.com] } ]\n')
  writeFileSync(pointsAtBad, `version: 1\nsidecar: { policy_file: ${join(dir, 'policy.yaml')} }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const counted = await check(pointsAtBad)
  t.match(counted.stdout, /: valid \(version 1, 2 rules \(sidecar\.policy_file\), 0 credentials, 0 routes\)$/m, 'a policy file\'s rules are counted')
  // A port in use is one line naming the setting, for every listener: no stack trace.
  const { createServer: netServer } = await import('node:net')
  const taken = netServer().listen(0, '127.0.0.1')
  await new Promise((r) => taken.once('listening', r))
  const takenPort = (taken.address() as { port: number }).port
  const clash = join(dir, 'clash.yaml')
  for (const [where, expected] of [
    [`grpc: { host: 127.0.0.1, port: ${takenPort} }\n  http: { host: 127.0.0.1, port: 0 }`, `collector.grpc: cannot listen on 127.0.0.1:${takenPort}: the address is already in use`],
    [`grpc: { host: 127.0.0.1, port: 0 }\n  http: { host: 127.0.0.1, port: ${takenPort} }`, `collector.http: cannot listen on 127.0.0.1:${takenPort}: the address is already in use`],
  ] as const) {
    writeFileSync(clash, `version: 1\ncollector:\n  ${where}\n  store: { kind: sqlite, path: ${join(dir, 'c.db')} }\n  sidecars: [{ id: s, token_sha256: "${'0'.repeat(64)}" }]\n`)
    const r = spawnSync(process.execPath, [CLI, 'collector', '--config', clash], { encoding: 'utf8', timeout: 20_000 })
    // That line alone: grpc-js's own 'E No address added…' came before it (GRPC_VERBOSITY, cli/latchkey.ts).
    t.same([r.status, r.stderr], [1, `${expected}\n`], expected)
  }
  taken.close()
  // The shipped collector example is checked by the collector's own schema.
  const collector = await check('deploy/examples/collector.yaml')
  t.same([collector.status, collector.stdout.trim()], [0, 'deploy/examples/collector.yaml: valid collector config (version 1, 1 sidecars, sqlite store)'])
  const badCollector = join(dir, 'collector.yaml')
  writeFileSync(badCollector, 'version: 1\ncollector: { store: { kind: mongo } }\n')
  const rc = await check(badCollector)
  t.equal(rc.status, 1)
  t.match(rc.stderr, /collector\.store/, 'a collector config is judged as one')
  // The broker's agent registry (deploy/examples/agents.yaml) is judged by its own schema, not as a sidecar config.
  const registry = await check('deploy/examples/agents.yaml')
  t.same([registry.status, registry.stdout.trim()], [0, 'deploy/examples/agents.yaml: valid agent registry (version 1, 1 agent types)'])
  const badRegistry = join(dir, 'agents.yaml')
  writeFileSync(badRegistry, 'version: 1\nagents:\n  demo: { env: dev, match: { local: true }, audiences: { "http://a": [x] }, max_lifetime_s: soon }\n')
  const rr = await check(badRegistry)
  t.same([rr.status, rr.stderr.trim()], [1, `${badRegistry}: invalid agent registry:\n  agents.demo.max_lifetime_s: must be integer`])
  // unrevoke has no --reason (the broker records none for it): refused, not silently dropped; revoke's is kept.
  const unrevoke = spawnSync(process.execPath, [CLI, 'unrevoke', 'agent:demo:dev:local', '--reason', 'done'], { encoding: 'utf8', env: { ...process.env, LATCHKEY_BROKER_URL: 'http://127.0.0.1:1' } })
  t.same([unrevoke.status, unrevoke.stderr.split('\n')[0]], [1, "error: unknown option '--reason'"])
  t.match(spawnSync(process.execPath, [CLI, 'revoke', '--help'], { encoding: 'utf8' }).stdout, /--reason <text>/)
  // A broker that is not there is named with why, not fetch's bare "fetch failed".
  const { createServer } = await import('node:net')
  const probe = createServer().listen(0, '127.0.0.1')
  await new Promise((ok) => probe.once('listening', ok))
  const freePort = (probe.address() as import('node:net').AddressInfo).port
  await new Promise((ok) => probe.close(ok))
  const away = spawnSync(process.execPath, [CLI, 'revoke', 'agent:demo:dev:local', '--broker', `http://127.0.0.1:${freePort}`], { encoding: 'utf8', env: { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: 'not-a-real-token' } })
  t.same([away.status, away.stderr.trim()], [1, `revoke: cannot reach the broker at http://127.0.0.1:${freePort}: ECONNREFUSED`])
  // Something else answering 200 at --broker (another service, a proxy's page) is no success.
  const { createServer: createHttpServer } = await import('node:http')
  const { promisify } = await import('node:util')
  const { execFile } = await import('node:child_process')
  const other = createHttpServer((_req, res) => void res.writeHead(200, { 'content-type': 'text/html' }).end('<html>welcome</html>')).listen(0, '127.0.0.1')
  await new Promise((ok) => other.once('listening', ok))
  const at = `http://127.0.0.1:${(other.address() as import('node:net').AddressInfo).port}`
  for (const op of ['revoke', 'unrevoke']) {
    const r = await promisify(execFile)(process.execPath, [CLI, op, 'agent:demo:dev:local', '--broker', at], { encoding: 'utf8', env: { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: 'not-a-real-token' } }).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }),
    )
    t.same([r.code, r.stderr.trim()], [1, `${op}: the answer from ${at} (HTTP 200) is not a Latchkey broker's: nothing is known to be ${op}d; check --broker`], `${op}: a 200 that is not the broker's fails`)
  }
  other.close()
  // `up` runs what README says npm start runs: broker + collector + sidecar + a demo upstream.
  t.match(spawnSync(process.execPath, [CLI, 'up', '--help'], { encoding: 'utf8' }).stdout.replace(/\s+/g, ' '), /start the local system: broker, collector, a sidecar/)
  const v = spawnSync(process.execPath, [CLI, '--version'], { encoding: 'utf8' })
  t.same([v.status, v.stdout.trim()], [0, (JSON.parse(readFileSync('package.json', 'utf8')) as { version: string }).version])
})

t.test('hostile YAML and overrides get a config error, never a stack trace or an echoed value', async (t) => {
  const bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nversion: 1\n'
  t.match(problems(bomb), [/cannot expand YAML aliases: Excessive alias count/])
  t.same(problems('version: 1\n', { LATCHKEY__SIDECAR__AGENT_ID: '"SECRETISH-unterminated' }), ['LATCHKEY__SIDECAR__AGENT_ID: not a valid YAML value'], 'the value is not repeated')
  t.same(problems('version: 1\n', { LATCHKEY__SIDECAR__LISTEN__PORT: '*nothing' }), ['LATCHKEY__SIDECAR__LISTEN__PORT: not a valid YAML value'])
  t.same(problems('version: 1\n', { LATCHKEY__SIDECAR__AGENT_ID: '!env agent:a:b:c' }), ['LATCHKEY__SIDECAR__AGENT_ID: not a valid YAML value'], 'a tag yaml does not resolve: the value was read as the text after it')
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  const file = join(dir, 'bomb.yaml')
  writeFileSync(file, bomb)
  const r = spawnSync(process.execPath, [CLI, 'check-config', file], { encoding: 'utf8' })
  t.equal(r.status, 1)
  t.match(r.stderr, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: invalid configuration:`))
  t.notMatch(r.stderr, /\n\s+at /, 'no stack trace')
})

t.test('a value yaml reads as an alias, a tag or a block header is refused naming the line, never quoting it: in every file read as YAML', async (t) => {
  const { compileBundle } = await import('../proxy/policy/bundle.js')
  const { parseRegistry } = await import('../broker/registry.js')
  const { parseCollectorConfig } = await import('../collector/config.js')
  const { StaticSecretSource } = await import('../proxy/credentials/static-source.js')
  const { UNRESOLVED_ALIAS, YAML_1_1 } = await import('../lib/yaml-document.js')
  const said = (f: () => unknown) => {
    try {
      f()
    } catch (err) {
      return (err as Error).message
    }
    return '(accepted)'
  }
  // A password pasted in: to yaml, `*…` is an alias, `!…!…` a tag, `|…` a block scalar header.
  t.same(problems('version: 1\nsidecar:\n  agent_id: *Hunter2PastedPassword!\n'), [`line 3: ${UNRESOLVED_ALIAS}`], 'the alias is not named: it is the value')
  t.same(problems('version: 1\nx: &a 1\nsidecar: { agent_id: [*a, *CanaryB] }\n'), [`line 3: ${UNRESOLVED_ALIAS}`], 'an alias after another that resolves')
  t.same(problems('version: 1\nsidecar: { agent_id: *CanaryC }\nx: &CanaryC 1\n'), [`line 2: ${UNRESOLVED_ALIAS}`], 'an anchor set after it does not resolve it')
  t.same(problems('version: 1\nsidecar: { agent_id: !Canary!D }\n'), ['line 2: a tagged value (!…) this reader does not take: quote a value that begins with !'])
  // A tag yaml did not resolve was a warning, the value read as the text after it; yaml's 1.1
  // tags made a Map or Set, which passed as an object with none of its keys (the defaults loaded).
  const TAG = 'a tagged value (!…) this reader does not take: quote a value that begins with !'
  for (const tagged of ['agent_id: !env AGENT', 'agent_id: !!binary aGVsbG8=', 'agent_id: !!timestamp 2001-12-14', 'listen: !!omap [ { port: 1 } ]', 'listen: !!set { port: null }', 'listen: !!pairs [ { port: 1 } ]']) {
    t.same(problems(`version: 1\nsidecar:\n  ${tagged}\n`), [`line 3: ${TAG}`], tagged)
  }
  t.same(problems('version: 1\nsidecar: { listen: !!map { port: !!int 1 }, agent_id: !!str "agent:a:b:c" }\n'), [], "YAML 1.2's own tags are read")
  t.same(problems('%YAML 1.1\n---\nversion: 1\nsidecar: { listen: { port: 017 } }\n'), [`line 1: ${YAML_1_1}`], '017 is 15 in YAML 1.1, 17 in 1.2: one reading')
  t.same(problems('%YAML 1.3\n---\nversion: 1\n'), ['line 1: a directive (a line beginning with %) this reader does not take: quote a value that begins with %'], 'a version yaml does not know (read as 1.2, with a warning)')
  t.match(said(() => compileBundle('default: deny\nrules:\n  - { id: a, action: deny, paths: !!set { /admin/**: null } }\n', '/etc/policy.yaml')), /policy bundle is not valid YAML\/JSON: a tagged value/, 'a policy file')
  t.same(problems('version: 1\nsidecar:\n  agent_id: |CanaryE\n'), ['line 3: a block scalar header (| or >) followed by other characters: quote a value that begins with | or >'])
  t.same(problems('version: 1\nsidecar: { agent_id: "Canary\\qF" }\n'), ['line 2: an escape sequence a double-quoted string does not have: write \\\\ for a backslash, or single-quote the value'])
  t.same(problems('version: 1\nx: &a [1]\ny: *a\n'), ['x: unknown key', 'y: unknown key'], 'an alias that resolves is read (and its keys judged)')
  const bundle = said(() => compileBundle('default: deny\nrules:\n  - { id: a, action: allow, hosts: [*PolicyCanary1] }\n', '/etc/policy.yaml'))
  t.equal(bundle, `/etc/policy.yaml: policy bundle is not valid YAML/JSON: ${UNRESOLVED_ALIAS} at line 3, column 37`, 'a policy file: the line, not the name')
  t.equal(said(() => parseRegistry('version: 1\nagents:\n  a: *RegistryCanary\n', 'agents.yaml')), `agents.yaml: invalid agent registry:\n  line 3: ${UNRESOLVED_ALIAS}`, 'the agent registry')
  t.match(said(() => parseCollectorConfig('version: 1\ncollector:\n  store: { kind: postgres, url: *CollectorCanary }\n', 'collector.yaml')), `collector.yaml: invalid configuration:\n  line 3: ${UNRESOLVED_ALIAS}`, "the collector's config")
  const dir = mkdtempSync(join(tmpdir(), 'lk-alias-'))
  const secretsFile = join(dir, 'secrets.yaml')
  writeFileSync(secretsFile, 'A: ok\nB: *SecretCanary\n')
  t.equal(
    said(() => new StaticSecretSource({ file: secretsFile, env_prefix: 'LK_T_' }, ['A', 'B'], {})),
    `secrets.file ${secretsFile}: not YAML this sidecar reads (BAD_ALIAS at line 2; the line is not quoted: it may hold a secret): ${UNRESOLVED_ALIAS}`,
    'the secrets file',
  )
  // And through the CLI: check-config prints nothing of it.
  const file = join(dir, 'c.yaml')
  writeFileSync(file, 'version: 1\nsidecar:\n  agent_id: *Hunter2PastedPassword!\n')
  const r = await check(file)
  t.same([r.status, r.stderr.trim()], [1, `${file}: invalid configuration:\n  line 3: ${UNRESOLVED_ALIAS}`])
  // yaml's own texts that would quote a value: none gets through, whatever the file.
  for (const text of ['a: !<!> CanaryG\n', 'a: !CanaryH!\n', '%CanaryI x\n---\na: 1\n', 'a: 1\n...\nCanaryJ\n', 'a: "\\xZZCanaryL"\n']) {
    for (const [what, message] of [
      ['config', problems(text).join('\n')],
      ['bundle', said(() => compileBundle(text, 'b.yaml'))],
      ['registry', said(() => parseRegistry(text, 'r.yaml'))],
      ['collector', said(() => parseCollectorConfig(text, 'c.yaml'))],
    ]) {
      t.notMatch(message, /Canary|ZZ/, `${what}: ${JSON.stringify(text)} → ${message}`)
    }
  }
  // A key that is a collection: yaml's toJS warned of it on stderr (process warnings), quoting it.
  const warnings: string[] = []
  const onWarning = (w: Error) => warnings.push(w.message)
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  problems('version: 1\n? [CanaryK]\n: 1\n')
  await new Promise((r) => setImmediate(r))
  t.same(warnings, [], 'nothing of the file goes to process warnings')
})

t.test('a config file that is not UTF-8 is refused naming the line, not read with U+FFFD in it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  const latin1 = (text: string) => Buffer.from(text, 'latin1')
  // A deny rule saved as Latin-1: read leniently, "/caf\uFFFD/**" would load and never match.
  const sidecar = join(dir, 'sidecar.yaml')
  writeFileSync(sidecar, latin1('version: 1\npolicy:\n  rules:\n    - { id: no-cafe, action: deny, hosts: ["api.example.com"], paths: ["/café/**"] }\n'))
  t.throws(() => loadConfigFile(sidecar), { code: 'LK_CONFIG_INVALID', problems: [{ path: 'line 4', message: 'not valid UTF-8 (save the file as UTF-8)' }] })
  const r = await check(sidecar)
  t.same([r.status, r.stderr.trim()], [1, `${sidecar}: invalid configuration:\n  line 4: not valid UTF-8 (save the file as UTF-8)`])
  const collector = join(dir, 'collector.yaml')
  writeFileSync(collector, latin1('version: 1\ncollector:\n  sidecars: [ { id: "sidecar-é", token_sha256: "' + 'a'.repeat(64) + '" } ]\n'))
  const { loadCollectorConfig } = await import('../collector/config.js')
  t.throws(() => loadCollectorConfig(collector), { code: 'LK_CONFIG_INVALID', problems: [{ path: 'line 3', message: 'not valid UTF-8 (save the file as UTF-8)' }] })
  // UTF-8 of the same text, a BOM-less file with U+FFFD written as UTF-8 itself, and an empty file: all read.
  writeFileSync(sidecar, 'version: 1\npolicy:\n  rules:\n    - { id: no-cafe, action: deny, hosts: ["api.example.com"], paths: ["/café/\uFFFD/**"] }\n')
  t.equal(loadConfigFile(sidecar).policy.rules[0]!.paths![0], '/café/\uFFFD/**')
})

t.test('start-up failures are one line naming the setting: a port in use, an unreadable secrets file', async (t) => {
  const { createServer } = await import('node:net')
  const { once } = (await import('node:events')).EventEmitter
  const taken = createServer().listen(0, '127.0.0.1')
  await once(taken, 'listening')
  t.teardown(() => void taken.close())
  const port = (taken.address() as import('node:net').AddressInfo).port
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  const write = (yaml: string) => {
    const file = join(dir, `c${Math.random()}.yaml`)
    writeFileSync(file, yaml)
    return file
  }
  const run = (yaml: string) => spawnSync(process.execPath, [CLI, 'sidecar', '--config', write(yaml)], { encoding: 'utf8', timeout: 10_000, env: { ...process.env, LATCHKEY_SECRET_S: 'x' } })
  const inUse = run(`version: 1\nsidecar: { listen: { port: ${port} }, admin: { port: 0 } }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  t.equal(inUse.status, 1, 'exits, does not hang')
  t.match(inUse.stderr, `sidecar.listen: cannot listen on 127.0.0.1:${port}: the address is already in use`)
  t.notMatch(inUse.stderr, /\n\s+at /, 'no stack trace')
  const badSecrets = join(dir, 'secrets.yaml')
  writeFileSync(badSecrets, 'S: "unterminated\n')
  const secrets = run(`version: 1\nsidecar: { listen: { port: 0 }, admin: { port: 0 } }\nsecrets: { file: ${badSecrets}, env_prefix: NOPE_ }\ncredentials: [{ id: c, audience: "http://127.0.0.1:1", source: static, secret: S, inject: { type: bearer } }]\naudit: { jsonl: { path: ${join(dir, 'b.jsonl')} } }\n`)
  t.equal(secrets.status, 1)
  t.match(secrets.stderr, /secrets\.file .*: not YAML this sidecar reads \(\w+ at line \d+;/)
  t.notMatch(secrets.stderr, /\n\s+at /, 'no stack trace')
  t.notMatch(secrets.stderr, /unterminated/, "the file's content is not echoed")
  for (const [content, why] of [['S: 9837465', /secret S is not a string \(quote it\)/], ['- S', /must be a mapping of name to secret/]] as const) {
    writeFileSync(badSecrets, content + '\n')
    // The same refusal as above, of other content: in-process.
    const r = await sidecarStart(write(`version: 1\nsidecar: { listen: { port: 0 }, admin: { port: 0 } }\nsecrets: { file: ${badSecrets}, env_prefix: NOPE_ }\ncredentials: [{ id: c, audience: "http://127.0.0.1:1", source: static, secret: S, inject: { type: bearer } }]\naudit: { jsonl: { path: ${join(dir, 'c.jsonl')} } }\n`), { ...process.env, LATCHKEY_SECRET_S: 'x' })
    t.equal(r.status, 1)
    t.match(r.stderr, why, `${JSON.stringify(content)}: says what is wrong with it`)
    t.notMatch(r.stderr, /9837465/, 'and never what it held')
  }
})

t.test('a config the sidecar would refuse at start, whatever the machine, is invalid to check-config too', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-agree-'))
  const env = { ...process.env, LATCHKEY_SECRET_COL: CANARY }
  const collector = (extra: string) => `version: 1\nsidecar: { listen: { port: 0 }, admin: { port: 0 } }\naudit: { collector: { address: "127.0.0.1:1", sidecar_id: s1, spool_dir: ${join(dir, 'spool')}${extra} } }\n`
  const cases: [string, string, string][] = [
    ['no-auth', collector(''), 'audit.collector: needs token_secret, tls, or both, to authenticate to the collector'],
    ['spool', collector(', token_secret: COL, spool_max_bytes: 65536, segment_bytes: 65536'), 'audit.collector.spool_max_bytes: must be at least twice segment_bytes (65536): acked segments are deleted only once a newer one exists'],
    // A restart reads each segment whole, and Node reads no file past 2 GiB: 3 GiB segments made every restart fail.
    ['spool-sizes', collector(', token_secret: COL, spool_max_bytes: 1e300, segment_bytes: 3221225472'), 'audit.collector.spool_max_bytes: must be <= 1099511627776\n  audit.collector.segment_bytes: must be <= 268435456'],
    [
      'evidence',
      `version: 1\nsidecar: { listen: { port: 0 }, admin: { port: 0 }, broker: { url: "http://127.0.0.1:1" } }\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`,
      'sidecar.attestation: required when sidecar.broker is set: the broker is asked with workload evidence (kubernetes, spiffe or local)',
    ],
  ]
  for (const [name, text, problem] of cases) {
    const file = join(dir, `${name}.yaml`)
    writeFileSync(file, text)
    const checked = await check(file, env)
    t.same([checked.status, checked.stderr.trim()], [1, `${file}: invalid configuration:\n  ${problem}`], `${name}: check-config says it, naming the setting`)
    const started = await sidecarStart(file, env)
    t.same([started.status, started.stderr.trim()], [1, `${file}: invalid configuration:\n  ${problem}`], `${name}: the sidecar refuses it in the same words`)
    t.notOk((checked.stderr + started.stderr + started.stdout).includes(CANARY), `${name}: the collector token is in neither`)
  }
  // Twice segment_bytes is enough, and a broker credential's own line is not said twice.
  t.same(problems(collector(', token_secret: COL, spool_max_bytes: 131072, segment_bytes: 65536')), [])
  t.same(problems(collector(', token_secret: COL, spool_max_bytes: 1099511627776, segment_bytes: 268435456')), [], 'the largest of each is taken')
  t.same(problems('version: 1\nsidecar: { broker: { url: "http://127.0.0.1:1" } }\ncredentials: [{ id: b, audience: "https://api.example", source: broker, token_audience: x, inject: { type: bearer } }]\n'), [
    'sidecar.attestation: required: credential "b" needs workload evidence for the broker (kubernetes, spiffe or local)',
  ])
})

t.test('the longest client_headers_ms the schema allows starts a sidecar whose admin port answers', async (t) => {
  const { startChild, writeYaml } = await import('./collector/process-helpers.js')
  const dir = mkdtempSync(join(tmpdir(), 'lk-cfg-'))
  // Above 30 s, node:http used to refuse the admin server's options: RangeError ERR_OUT_OF_RANGE and a stack trace.
  const file = writeYaml(join(dir, 'c.yaml'), { version: 1, sidecar: { listen: { port: 0 }, admin: { port: 0 }, timeouts: { client_headers_ms: 3_600_000 } }, audit: { jsonl: { path: join(dir, 'a.jsonl') } } })
  t.match(execFileSync(process.execPath, [CLI, 'check-config', file], { encoding: 'utf8' }), /valid/)
  const child = await startChild(['sidecar', '--config', file], /sidecar listening/)
  t.teardown(() => child.kill('SIGTERM'))
  const adminPort = Number(/"adminPort":(\d+)/.exec(child.output())![1])
  const res = await fetch(`http://127.0.0.1:${adminPort}/healthz`)
  t.same([res.status, await res.json()], [200, { ok: true }])
})

t.test('secrets.reload_interval_ms: 2000 by default, 0 for SIGHUP only, a whole number of ms up to an hour', async (t) => {
  t.equal(parseConfig('version: 1\n').secrets.reload_interval_ms, 2000, 'checked every 2 s unless said')
  t.equal(parseConfig('version: 1\nsecrets: { reload_interval_ms: 0 }\n').secrets.reload_interval_ms, 0, '0: reloaded on SIGHUP only')
  t.same(problems('version: 1\nsecrets: { reload_interval_ms: -1 }\n'), ['secrets.reload_interval_ms: must be >= 0'])
  t.same(problems('version: 1\nsecrets: { reload_interval_ms: 1.5 }\n'), ['secrets.reload_interval_ms: must be integer'])
  t.same(problems('version: 1\nsecrets: { reload_interval_ms: 3600001 }\n'), ['secrets.reload_interval_ms: must be <= 3600000'])
  t.same(problems('version: 1\nsecrets: { reload_interval_ms: soon }\n'), ['secrets.reload_interval_ms: must be integer'])
})

t.test('check-config says a broker-only file is a broker config, not a sidecar one with nothing in it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-broker-only-'))
  const registry = join(process.cwd(), 'deploy/examples/agents.yaml')
  const jwks = join(dir, 'k8s.jwks.json')
  writeFileSync(jwks, '{"keys":[]}')
  const broker = (control: string) => `version: 1\nbroker:\n  issuer: https://broker.example\n  registry_file: ${registry}\n  keys: { dir: ${join(dir, 'keys')} }\n  attestors: { kubernetes: { issuer: https://k8s.example, jwks_file: ${jwks} } }\n${control}`
  writeFileSync(join(dir, 'broker.yaml'), broker(''))
  writeFileSync(join(dir, 'broker-control.yaml'), broker('  control: { port: 0 }\n'))
  writeFileSync(join(dir, 'both.yaml'), `${broker('')}policy: { default: deny }\n`)
  t.match(await check(join(dir, 'broker.yaml')), { status: 0, stdout: `${join(dir, 'broker.yaml')}: valid broker config (version 1, issuer https://broker.example, no control stream)\n` })
  t.match(await check(join(dir, 'broker-control.yaml')), { status: 0, stdout: /valid broker config \(version 1, issuer https:\/\/broker\.example, control stream on\)\n$/ })
  t.match(await check(join(dir, 'both.yaml')), { status: 0, stdout: /: valid \(version 1, 0 rules, 0 credentials, 0 routes\)\n$/ }, 'with a sidecar part, judged as a sidecar config as before')
})
