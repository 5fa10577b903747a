// Start-up errors of `latchkey broker`, and check-config on the same files (see helpers.ts).
import t from 'tap'
import { copyFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exportJWK, generateKeyPair } from 'jose'
import { writeYaml } from '../collector/process-helpers.js'
import { dir, latchkey, refuses, checkRefuses, checkWarns, re } from './helpers.js'

t.test('broker: key files, the policy file, TLS files and the registry, each named', async (t) => {
  const { publicKey } = await generateKeyPair('ES256')
  const jwks = join(dir, 'jwks.json')
  writeFileSync(jwks, JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: 'k1', alg: 'ES256' }] }))
  const registry = join(dir, 'agents.yaml')
  copyFileSync('deploy/examples/agents.yaml', registry)
  const badRegistry = join(dir, 'bad-agents.yaml')
  writeFileSync(badRegistry, 'version: 1\nagents:\n  demo:\n    env: dev\n    colour: blue\n')
  const garbage = join(dir, 'garbage.pem')
  writeFileSync(garbage, 'this is not PEM\n')
  const notJson = join(dir, 'not-json.json')
  writeFileSync(notJson, '{ keys: nope')
  const badPolicy = join(dir, 'bad-policy.yaml')
  writeFileSync(badPolicy, 'default: deny\nrules: [\n')
  const missing = (name: string) => join(dir, `missing-${name}`)
  const broker = (name: string, extra: Record<string, unknown>, listen: Record<string, unknown> = {}) =>
    writeYaml(join(dir, `${name}.yaml`), {
      version: 1,
      broker: {
        issuer: 'http://127.0.0.1:19701',
        listen: { host: '127.0.0.1', port: 19701, ...listen },
        keys: { dir: join(dir, `keys-${name}`) },
        registry_file: registry,
        store: { sqlite: { path: join(dir, `${name}.db`) } },
        attestors: { local: { keys_file: jwks } },
        ...extra,
      },
    })

  const localMissing = broker('local-missing', { attestors: { local: { keys_file: missing('keys.json') } } })
  refuses(t, latchkey(['broker', '-c', localMissing]), [re(`broker.attestors.local.keys_file ${missing('keys.json')}: cannot read (ENOENT)`)], 'local attestor keys_file missing')
  await checkWarns(t, localMissing, re(`warning: broker.attestors.local.keys_file: ${missing('keys.json')}: cannot read (ENOENT) (the broker would not start on this machine)`))

  const usersMissing = broker('users-missing', { users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_file: missing('users.json') } })
  refuses(t, latchkey(['broker', '-c', usersMissing]), [re(`broker.users.jwks_file ${missing('users.json')}: cannot read (ENOENT)`)], 'users.jwks_file missing')
  await checkWarns(t, usersMissing, /^warning: broker\.users\.jwks_file: .*missing-users\.json: cannot read \(ENOENT\)/m)

  const usersBad = broker('users-bad', { users: { issuer: 'https://idp.example', audience: 'latchkey', jwks_file: notJson } })
  refuses(t, latchkey(['broker', '-c', usersBad]), [re(`broker.users.jwks_file ${notJson}: not valid JSON`)], 'users.jwks_file not JSON')
  await checkRefuses(t, usersBad, re(`  broker.users.jwks_file: ${notJson}: not valid JSON`))

  const policyMissing = broker('policy-missing', { control: { host: '127.0.0.1', port: 19702, policy_file: missing('policy.yaml') } })
  refuses(t, latchkey(['broker', '-c', policyMissing]), [re(`broker.control.policy_file ${missing('policy.yaml')}: cannot read (ENOENT)`)], 'control.policy_file missing')
  await checkWarns(t, policyMissing, /^warning: broker\.control\.policy_file: .*missing-policy\.yaml: cannot read \(ENOENT\)/m)

  const policyBad = broker('policy-bad', { control: { host: '127.0.0.1', port: 19702, policy_file: badPolicy } })
  refuses(t, latchkey(['broker', '-c', policyBad]), [/^broker\.control\.policy_file .*bad-policy\.yaml: policy bundle is not valid YAML\/JSON/], 'control.policy_file that does not compile')
  await checkRefuses(t, policyBad, /^ {2}broker\.control\.policy_file: .*bad-policy\.yaml: policy bundle is not valid YAML\/JSON/m)

  const tlsGarbage = broker('tls-garbage', {}, { tls: { cert_file: garbage, key_file: garbage } })
  refuses(
    t,
    latchkey(['broker', '-c', tlsGarbage]),
    [re(`broker.listen.tls.cert_file ${garbage}: not a usable PEM certificate (no start line)`), /^broker\.listen\.tls\.key_file .*garbage\.pem: not a usable PEM private key/],
    'listen.tls not PEM',
  )
  await checkRefuses(t, tlsGarbage, re(`  broker.listen.tls.cert_file: ${garbage}: not a usable PEM certificate (no start line)`))

  const registryBad = broker('registry-bad', { registry_file: badRegistry })
  refuses(t, latchkey(['broker', '-c', registryBad]), [/^broker\.registry_file .*bad-agents\.yaml: .*colour/], 'registry that does not validate')
  await checkRefuses(t, registryBad, /^ {2}broker\.registry_file: .*bad-agents\.yaml: .*colour/m)
  const registryMissing = broker('registry-missing', { registry_file: missing('agents.yaml') })
  refuses(t, latchkey(['broker', '-c', registryMissing]), [/^broker\.registry_file .*missing-agents\.yaml: cannot read file: ENOENT$/], 'registry missing')
  await checkWarns(t, registryMissing, /^warning: broker\.registry_file: .*missing-agents\.yaml: cannot read \(ENOENT\)/m)
})
