// One agent type, one attestor: instance IDs carry no attestor, so a type matched by two would
// make a pod named w1 and the SPIFFE ID …/w1 (or a local key's agent:…:w1) one agent: one
// revocation, one audit identity, one user's consent. The registry refuses such a type, saying
// why, and the broker does not start on it.
import t from 'tap'
import { stringify } from 'yaml'
import { parseRegistry } from '../../broker/registry.js'
import { brokerCliStart } from '../helpers/broker.js'

const MATCH = { kubernetes: { namespace: 'agents', service_account: 'summarizer' }, local: true, spiffe: { path_prefix: '/agents/summarizer/' } }
const WHO = { kubernetes: 'a pod named w1', local: 'a local attestation of agent:summarizer:prod:w1', spiffe: 'the SPIFFE ID …/agents/summarizer/w1' }
const registry = (match: Record<string, unknown>) =>
  stringify({ version: 1, agents: { summarizer: { env: 'prod', match, audiences: { 'https://api.example.com': ['read'] }, max_lifetime_s: 600 } } })

t.test('a type whose match names two or three attestors is refused, naming them and why', async (t) => {
  const cases: [string[], string][] = [
    [['kubernetes', 'local'], `names kubernetes and local: instance names from two attestors share one ID space (${WHO.kubernetes} and ${WHO.local} would be one agent, agent:summarizer:prod:w1)`],
    [['kubernetes', 'spiffe'], `names kubernetes and spiffe: instance names from two attestors share one ID space (${WHO.kubernetes} and ${WHO.spiffe} would be one agent, agent:summarizer:prod:w1)`],
    [['local', 'spiffe'], `names local and spiffe: instance names from two attestors share one ID space (${WHO.local} and ${WHO.spiffe} would be one agent, agent:summarizer:prod:w1)`],
    [['kubernetes', 'local', 'spiffe'], `names kubernetes, local and spiffe: instance names from three attestors share one ID space (${WHO.kubernetes}, ${WHO.local} and ${WHO.spiffe} would be one agent, agent:summarizer:prod:w1)`],
  ]
  for (const [kinds, why] of cases) {
    const match = Object.fromEntries(kinds.map((k) => [k, MATCH[k as keyof typeof MATCH]]))
    t.throws(
      () => parseRegistry(registry(match), 'agents.yaml'),
      { code: 'LK_REGISTRY_INVALID', message: `agents.yaml: invalid agent registry:\n  agents.summarizer.match: ${why}: give each attestor its own agent type` },
      kinds.join(' + '),
    )
  }
  for (const kind of Object.keys(MATCH)) t.ok(parseRegistry(registry({ [kind]: MATCH[kind as keyof typeof MATCH] })), `${kind} alone is a type`)
  t.ok(parseRegistry(registry({ local: false, spiffe: MATCH.spiffe })), '`local: false` names no attestor')
  t.ok(parseRegistry(registry({ local: false })), 'a type no attestor matches is still allowed (never attested)')
})

t.test('`latchkey broker` on such a registry: exit 1, one line naming the setting, the file and the reason', async (t) => {
  const r = await brokerCliStart(registry({ kubernetes: MATCH.kubernetes, spiffe: MATCH.spiffe }))
  t.equal(r.status, 1)
  t.equal(
    r.stderr,
    `broker.registry_file ${r.registryFile}: agents.summarizer.match: names kubernetes and spiffe: instance names from two attestors share one ID space (${WHO.kubernetes} and ${WHO.spiffe} would be one agent, agent:summarizer:prod:w1): give each attestor its own agent type\n`,
  )
})

t.test("a YAML problem in the registry is said as in the sidecar's config: a duplicated key named", async (t) => {
  t.throws(() => parseRegistry('version: 1\nagents:\n  a: {}\n  a: {}\n', 'agents.yaml'), { code: 'LK_REGISTRY_INVALID', message: 'agents.yaml: invalid agent registry:\n  line 4: duplicate key "a"' })
})
