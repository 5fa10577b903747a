// A file read whole at start-up (the config, the collector's config, secrets.file, a policy file,
// the agent registry) is read with a cap: over it is refused naming the file and the limit, and
// /dev/zero or a pipe fed without end is read no further than the cap (check-config of /dev/zero
// grew to 7 GB).
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI } from './helpers/cli.js'
import { loadConfigFile, ConfigError } from '../lib/config/load.js'
import { loadCollectorConfig } from '../collector/config.js'
import { loadRegistryFile } from '../broker/registry.js'
import { StaticSecretSource } from '../proxy/credentials/static-source.js'
import { readPolicyText } from '../proxy/policy/file.js'
import { readCaFile } from '../proxy/tls-trust.js'
import { readSettingFile } from '../lib/setting-file.js'
import { checkServerTls } from '../lib/tls-files.js'
import { readStateFile } from '../proxy/control/persist.js'
import { jwksFileProblem } from '../broker/jwt.js'
import { loadLocalAttestorKey } from '../lib/local-attestor.js'
import { KubernetesTokenFile } from '../proxy/attest/kubernetes-token.js'
import { KeyRing } from '../broker/keys.js'
import { Spool } from '../proxy/audit/spool.js'

const dir = mkdtempSync(join(tmpdir(), 'lk-size-'))
const MiB = 1024 * 1024
/** A file of `bytes` that is otherwise a valid start: `version: 1` and a comment to fill it. */
const big = (name: string, bytes: number, head = 'version: 1\n') => {
  const file = join(dir, name)
  writeFileSync(file, head + '#'.repeat(bytes - head.length) + '\n')
  return file
}
const problems = (f: () => unknown) => {
  try {
    f()
  } catch (err) {
    return err instanceof ConfigError ? err.problems.map((p) => `${p.path}: ${p.message}`) : [(err as Error).message]
  }
  return []
}
const check = (file: string, env: NodeJS.ProcessEnv = {}) => spawnSync(process.execPath, [CLI, 'check-config', file], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL', env: { ...process.env, ...env } })

t.test('over the cap is refused naming the file and the limit: 4 MiB a config, 1 MiB secrets.file, max_bundle_bytes a policy file', async (t) => {
  const config = big('config.yaml', 4 * MiB + 10)
  t.same(problems(() => loadConfigFile(config)), [': larger than 4 MiB, the most a config file may be'])
  t.same(problems(() => loadCollectorConfig(config)), [': larger than 4 MiB, the most a config file may be'], "the collector's config")
  t.same(problems(() => loadRegistryFile(config)), [`${config}: invalid agent registry:\n  larger than 4 MiB, the most a config file may be`], 'the agent registry')
  const r = check(config)
  t.same([r.status, r.stderr.trim()], [1, `${config}: invalid configuration:\n  (root): larger than 4 MiB, the most a config file may be`])
  t.same(problems(() => loadConfigFile(big('just-under.yaml', 4 * MiB - 1))), [], '4 MiB is read')

  const secrets = big('secrets.yaml', MiB + 10, 'S: a-secret-long-enough-1\n')
  t.same(problems(() => new StaticSecretSource({ file: secrets, env_prefix: 'LK_T_' }, ['S'], {})), [`secrets.file ${secrets}: larger than 1 MiB, the most a secrets file may be`])
  const withSecrets = join(dir, 'with-secrets.yaml')
  writeFileSync(withSecrets, `version: 1\nsecrets: { file: ${secrets}, env_prefix: NOPE_ }\ncredentials: [{ id: c, audience: "http://127.0.0.1:1", source: static, secret: S, inject: { type: bearer } }]\naudit: { jsonl: { path: ${join(dir, 'a.jsonl')} } }\n`)
  const s = check(withSecrets)
  t.same([s.status, s.stderr.trim()], [1, `${withSecrets}: invalid configuration:\n  secrets.file: ${secrets}: larger than 1 MiB, the most a secrets file may be`], 'check-config says it of secrets.file')

  const policy = big('policy.yaml', 300 * 1024, 'default: deny\n')
  const read = readPolicyText(policy, 262_144)
  t.same(read, { ok: false, unreadable: false, reason: `${policy}: policy bundle is over the limit of 262144 bytes` })
})

t.test('/dev/zero and a pipe without end are read no further than the cap', async (t) => {
  const started = Date.now()
  const zero = check('/dev/zero')
  t.same([zero.status, zero.stderr.trim()], [1, '/dev/zero: invalid configuration:\n  (root): larger than 4 MiB, the most a config file may be'])
  // A pipe (process substitution): read as a file is, and cut at the cap; `yes` ends on SIGPIPE.
  const endless = spawnSync('bash', ['-c', `${process.execPath} ${CLI} check-config <(yes)`], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL' })
  t.equal(endless.status, 1)
  t.match(endless.stderr, /^\/dev\/fd\/\d+: invalid configuration:\n {2}\(root\): larger than 4 MiB, the most a config file may be$/m)
  const withZero = join(dir, 'zero-secrets.yaml')
  writeFileSync(withZero, `version: 1\nsecrets: { file: /dev/zero }\nsidecar: { policy_file: /dev/zero }\ncredentials: [{ id: c, audience: "http://127.0.0.1:1", source: static, secret: S, inject: { type: bearer } }]\naudit: { jsonl: { path: ${join(dir, 'b.jsonl')} } }\n`)
  const z = check(withZero)
  t.equal(z.status, 1)
  t.match(z.stderr, 'secrets.file: /dev/zero: larger than 1 MiB, the most a secrets file may be')
  t.match(z.stderr, 'sidecar.policy_file: /dev/zero: policy bundle is over the limit of 262144 bytes')
  t.ok(Date.now() - started < 15_000, 'and promptly')
})

t.test('every other file a setting names (certificates, CA bundles, keys, JWK sets, tokens, state) is read no further than 16 MiB', async (t) => {
  const started = Date.now()
  // Sparse: 17 MiB on paper, nothing on disk.
  const sparse = (name: string) => {
    const file = join(dir, name)
    writeFileSync(file, '')
    truncateSync(file, 17 * MiB)
    return file
  }
  const message = async (f: () => unknown) => {
    try {
      await f()
    } catch (err) {
      return (err as Error).message
    }
    return 'no error'
  }
  for (const file of ['/dev/zero', sparse('huge.pem')]) {
    t.equal(await message(() => readCaFile(file)), `${file}: cannot read (larger than 16 MiB)`, `${file}: a CA file`)
    t.equal(await message(() => readSettingFile('audit.collector.tls.cert_file', file)), `audit.collector.tls.cert_file: cannot read ${file} (larger than 16 MiB)`, `${file}: a client certificate`)
    const tls = checkServerTls('collector.grpc.tls', { cert_file: file, key_file: file })
    t.same('problems' in tls && tls.problems.map((p) => `${p.path}: ${p.message}`).slice(0, 2), [`collector.grpc.tls.cert_file: ${file}: cannot read (larger than 16 MiB)`, `collector.grpc.tls.key_file: ${file}: cannot read (larger than 16 MiB)`], `${file}: a server's certificate and key`)
    t.match(await message(() => readStateFile(file, Date.now())), `sidecar.control.state_file ${file}: cannot read (larger than 16 MiB); the sidecar will not start`, `${file}: the revocation state`)
    t.equal(jwksFileProblem(file, 'attestors.spiffe.jwks_file')?.message, `attestors.spiffe.jwks_file ${file}: larger than 16 MiB`, `${file}: a JWK set`)
    t.equal(await message(() => loadLocalAttestorKey(file)), `${file}: larger than 16 MiB`, `${file}: the local attestor's key`)
  }
  t.equal(await message(() => new KubernetesTokenFile('/dev/zero').get()), 'service-account token file /dev/zero: not a regular file', 'a service-account token that is a device')
  const token = sparse('token')
  t.equal(await message(() => new KubernetesTokenFile(token).get()), `service-account token file ${token}: ${17 * MiB} bytes, more than a token (65536)`, 'or far too large to be one')

  const keys = mkdtempSync(join(tmpdir(), 'lk-size-keys-'))
  truncateSync((writeFileSync(join(keys, 'k1.json'), ''), join(keys, 'k1.json')), 17 * MiB)
  t.match(await message(() => KeyRing.open({ dir: keys, alg: 'ES256', rotateAfterS: 3600 })), `${join(keys, 'k1.json')} is not a signing key this broker wrote: cannot read it (larger than 16 MiB)`, "a file in the broker's key directory")
  const spool = mkdtempSync(join(tmpdir(), 'lk-size-spool-'))
  truncateSync((writeFileSync(join(spool, 'spool.json'), ''), join(spool, 'spool.json')), 17 * MiB)
  t.match(await message(() => new Spool(spool, 'sidecar-1', MiB)), `${join(spool, 'spool.json')} cannot be read (larger than 16 MiB): it names the sidecar`, "the audit spool's owner file")

  const withCa = join(dir, 'zero-ca.yaml')
  writeFileSync(withCa, `version: 1\nsidecar: { upstream_ca_file: /dev/zero }\naudit: { jsonl: { path: ${join(dir, 'c.jsonl')} } }\n`)
  const c = check(withCa)
  // Said of this machine (the file a container mounts may be another), as a file that cannot be read is.
  t.match([c.status, c.stderr], [0, 'warning: sidecar.upstream_ca_file: /dev/zero: cannot read (larger than 16 MiB) (the sidecar would not start on this machine)'], 'check-config says it, one line')
  t.ok(Date.now() - started < 15_000, 'and promptly')
})
