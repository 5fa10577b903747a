// A file read whole at start-up (the config, the collector's config, secrets.file, a policy file,
// the agent registry) is read with a cap: over it is refused naming the file and the limit, and
// /dev/zero or a pipe fed without end is read no further than the cap (check-config of /dev/zero
// grew to 7 GB).
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI } from './helpers/cli.js'
import { loadConfigFile, ConfigError } from '../lib/config/load.js'
import { loadCollectorConfig } from '../collector/config.js'
import { loadRegistryFile } from '../broker/registry.js'
import { StaticSecretSource } from '../proxy/credentials/static-source.js'
import { readPolicyText } from '../proxy/policy/file.js'

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
