// Every link that carries a credential or decides what a sidecar enforces must be TLS off
// loopback, or say insecure_plaintext by name: the control stream (token one way, policy and
// revocations the other), the token exchange (workload evidence, user tokens, minted tokens),
// the collector (its token, the audit trail), OAuth token endpoints and JWKS. Loopback, as
// `latchkey up` runs, stays plaintext.
import t from 'tap'
import { validateConfig, ConfigError } from '../lib/config/load.js'

function problems(cfg: Record<string, unknown>): string[] {
  try {
    validateConfig(cfg)
    return []
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err
    return err.problems.map((p) => `${p.path}: ${p.message}`)
  }
}

const agent = { agent_id: 'agent:x:dev:1' }
const sidecar = (extra: Record<string, unknown>, rest: Record<string, unknown> = {}) => ({ version: 1, sidecar: { ...agent, ...extra }, ...rest })
const broker = (extra: Record<string, unknown>) => ({ version: 1, broker: { issuer: 'https://broker.example', registry_file: '/etc/latchkey/agents.yaml', attestors: { local: { keys_file: '/k.json' } }, ...extra } })
const LOOPBACK = ['127.0.0.1', 'localhost', '[::1]', '127.3.2.1']

t.test('sidecar.control', async (t) => {
  const control = (c: Record<string, unknown>) => sidecar({ control: { token_secret: 'CONTROL', ...c } })
  t.match(problems(control({ url: 'grpc://latchkey-broker:15004' })), [/^sidecar\.control\.tls: required off loopback \(latchkey-broker\).*insecure_plaintext: true/])
  t.match(problems(control({ url: 'grpc://10.0.0.7:15004' })), [/^sidecar\.control\.tls: required off loopback/])
  t.same(problems(control({ url: 'grpc://latchkey-broker:15004', tls: { ca_file: '/etc/latchkey/ca.pem' } })), [])
  t.same(problems(control({ url: 'grpc://latchkey-broker:15004', insecure_plaintext: true })), [], 'accepted when asked for by name')
  for (const host of LOOPBACK) t.same(problems(control({ url: `grpc://${host}:15004` })), [], `${host} is loopback`)
  t.match(problems(control({ url: 'grpc://b:1', tls: { ca_file: '/ca.pem', cert_file: '/c.pem' } })), [/^sidecar\.control\.tls: cert_file and key_file go together/])
  t.match(problems(control({ url: 'grpc://b:1', tls: { ca_file: '/ca.pem' }, insecure_plaintext: true })), [/^sidecar\.control\.insecure_plaintext: contradicts tls/])
})

t.test('broker.control and broker.listen', async (t) => {
  t.same(problems(broker({})), [], 'the default listeners are on loopback')
  t.match(problems(broker({ control: { host: '0.0.0.0' } })), [/^broker\.control\.tls: required off loopback \(0\.0\.0\.0\)/])
  t.same(problems(broker({ control: { host: '0.0.0.0', tls: { cert_file: '/c.pem', key_file: '/k.pem' } } })), [])
  t.same(problems(broker({ control: { host: '0.0.0.0', insecure_plaintext: true } })), [])
  t.match(problems(broker({ listen: { host: '0.0.0.0' } })), [/^broker\.listen\.tls: required off loopback \(0\.0\.0\.0\): .*workload evidence/])
  t.same(problems(broker({ listen: { host: '10.1.2.3', tls: { cert_file: '/c.pem', key_file: '/k.pem' } } })), [])
  t.same(problems(broker({ listen: { host: '0.0.0.0', insecure_plaintext: true } })), [])
})

t.test('sidecar.broker: the token exchange', async (t) => {
  // With workload evidence, which a sidecar asking a broker needs (config.test.ts): only the URL is judged here.
  const withBroker = (b: Record<string, unknown>) => sidecar({ broker: b, attestation: { local: { key_file: '/k.json' } } })
  t.match(problems(withBroker({ url: 'http://latchkey-broker:15003' })), [/^sidecar\.broker\.url: must be TLS off loopback \(latchkey-broker\).*use https:\/\//])
  t.same(problems(withBroker({ url: 'https://latchkey-broker:15003' })), [])
  t.same(problems(withBroker({ url: 'http://latchkey-broker:15003', insecure_plaintext: true })), [])
  for (const host of LOOPBACK) t.same(problems(withBroker({ url: `http://${host}:15003` })), [], `${host} is loopback`)
  t.match(problems(withBroker({ url: 'https://latchkey-broker:15003', insecure_plaintext: true })), [/^sidecar\.broker\.insecure_plaintext: contradicts an https:\/\/ url/])
})

t.test('audit.collector', async (t) => {
  const withCollector = (c: Record<string, unknown>) => sidecar({}, { audit: { collector: { sidecar_id: 'sc-1', token_secret: 'COLLECTOR', ...c } } })
  t.match(problems(withCollector({ address: 'collector.internal:15100' })), [/^audit\.collector\.tls: required off loopback \(collector\.internal\)/])
  t.same(problems(withCollector({ address: 'collector.internal:15100', insecure_plaintext: true })), [])
  t.same(problems(withCollector({ address: 'collector.internal:15100', tls: { ca_file: '/ca.pem', cert_file: '/c.pem', key_file: '/k.pem' } })), [])
  for (const host of LOOPBACK) t.same(problems(withCollector({ address: `${host}:15100` })), [], `${host} is loopback`)
  t.match(problems(withCollector({ address: '::1:15100' })), [/^audit\.collector\.address: an IPv6 address is written in brackets: \[::1\]:15100/])
  t.match(problems(withCollector({ address: 'fd00::5:15100' })), [/^audit\.collector\.address: an IPv6 address is written in brackets/])
})

t.test('OAuth token endpoints and JWKS are https:// off loopback', async (t) => {
  const oauth = (url: string) =>
    sidecar({}, { credentials: [{ id: 'cc', audience: 'https://api.example.com', source: 'client_credentials', oauth: { token_url: url, client_id: 'c', client_secret: 'SECRET' }, inject: { type: 'bearer' } }] })
  t.match(problems(oauth('http://auth.example.com/oauth/token')), [/^credentials\[0\]\.oauth\.token_url: must be https:\/\/ off loopback \(RFC 6749/])
  t.same(problems(oauth('https://auth.example.com/oauth/token')), [])
  t.same(problems(oauth('http://127.0.0.1:9000/token')), [])
  t.match(problems(broker({ users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_url: 'http://idp.example/jwks.json' } })), [/^broker\.users\.jwks_url: must be https:\/\/ off loopback/])
  t.match(problems(broker({ attestors: { kubernetes: { issuer: 'https://k8s', jwks_url: 'http://k8s.internal/openid/v1/jwks' } } })), [/^broker\.attestors\.kubernetes\.jwks_url: must be https:\/\//])
  t.same(problems(broker({ users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_url: 'https://idp.example/jwks.json' } })), [])
  t.same(problems(broker({ users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_url: 'http://localhost:8080/jwks.json' } })), [])
})

t.test('userinfo in a URL or address the sidecar dials is refused by setting, the password never quoted', async (t) => {
  // The clients drop it (the broker's and the token endpoint's dial the origin, the control
  // stream and the collector a host:port): a password written there was never sent, and a
  // problem about the address quoted it.
  const pw = 'pw-CANARY-7f3a'
  const notSent = 'must not carry userinfo (user:password@): it is not sent as a credential, and'
  const cases: [string, Record<string, unknown>, string][] = [
    ['sidecar.broker.url', sidecar({ broker: { url: `http://u:${pw}@127.0.0.1:15003` }, attestation: { local: { key_file: '/k.json' } } }), `${notSent} the broker takes workload evidence (sidecar.attestation)`],
    ['sidecar.control.url', sidecar({ control: { url: `grpc://u:${pw}@127.0.0.1:15004`, token_secret: 'CONTROL' } }), `${notSent} the broker takes the control token (token_secret)`],
    [
      'credentials[0].oauth.token_url',
      sidecar({}, { credentials: [{ id: 'cc', audience: 'https://api.example.com', source: 'client_credentials', oauth: { token_url: `https://c:${pw}@auth.example.com/token`, client_id: 'c', client_secret: 'SECRET' }, inject: { type: 'bearer' } }] }),
      `${notSent} the token endpoint takes oauth.client_id and oauth.client_secret`,
    ],
  ]
  const address = 'must be host:port, without userinfo (user:password@): a gRPC address has none, and the collector takes token_secret or tls'
  // Loopback and not (the plaintext line quoted the host), IPv6 (the brackets line quoted it whole), a password alone.
  for (const a of [`u:${pw}@127.0.0.1:15100`, `u:${pw}@collector.internal:15100`, `u:${pw}@[::1]:15100`, `${pw}@localhost:15100`]) {
    cases.push(['audit.collector.address', sidecar({}, { audit: { collector: { address: a, sidecar_id: 'sc-1', token_secret: 'COLLECTOR', insecure_plaintext: true } } }), address])
  }
  for (const [path, config, message] of cases) {
    const got = problems(config)
    t.same(got, [`${path}: ${message}`], `${path}: refused, naming the setting`)
    t.notOk(got.join('\n').includes(pw), `${path}: the password is not quoted`)
  }
})
