// Server addresses as errors and logs show them: userinfo removed in every spelling.
import t from 'tap'
import { withoutUserinfo } from '../lib/without-userinfo.js'
import { CLI } from './helpers/cli.js'

t.test('userinfo is removed, whatever else the address holds', async (t) => {
  const cases: [string, string][] = [
    ['nats://user:secret@127.0.0.1:4222', 'nats://***@127.0.0.1:4222'],
    ['nats://token@nats.example:4222', 'nats://***@nats.example:4222'],
    ['tls://u:p%40ss@host', 'tls://***@host'],
    ['nats://u:p@ss@host:4222', 'nats://***@host:4222'],
    ['u:secret@127.0.0.1:4222', '***@127.0.0.1:4222'],
    ['http://a:b@host/path?x=y@z', 'http://***@host/path?x=y@z'],
    ['nats://127.0.0.1:4222', 'nats://127.0.0.1:4222'],
    ['127.0.0.1:4222', '127.0.0.1:4222'],
    ['http://host/path@x', 'http://host/path@x'],
  ]
  for (const [address, shown] of cases) t.equal(withoutUserinfo(address), shown, address)
})

t.test('latchkey audit --url with userinfo names the collector without it', async (t) => {
  const { spawnSync } = await import('node:child_process')
  const r = spawnSync(process.execPath, [CLI, 'audit', '--agent', 'agent:a:b:c', '--url', 'http://reader:PASSWORD-CANARY@127.0.0.1:1'], { encoding: 'utf8', timeout: 15_000 })
  t.equal(r.status, 1)
  t.equal(r.stderr, 'collector at http://***@127.0.0.1:1 unreachable: ECONNREFUSED\n')
  t.notMatch(r.stdout + r.stderr, /PASSWORD-CANARY/)
})

t.test('latchkey revoke refuses a broker URL with userinfo, from --broker or LATCHKEY_BROKER_URL, without printing it', async (t) => {
  const { spawnSync } = await import('node:child_process')
  const run = (args: string[], env: NodeJS.ProcessEnv = {}) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 15_000, env: { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: 'x', ...env } })
  const flag = run(['revoke', '--broker', 'http://u:BROKERURLPASS@127.0.0.1:23203', 'agent:x'])
  t.same([flag.status, flag.stderr], [2, 'revoke: --broker http://***@127.0.0.1:23203: must not carry userinfo (user:password@): the broker takes the admin token from LATCHKEY_BROKER_ADMIN_TOKEN\n'])
  const fromEnv = run(['unrevoke', 'agent:x'], { LATCHKEY_BROKER_URL: 'http://u:BROKERURLPASS@127.0.0.1:23203' })
  t.same([fromEnv.status, fromEnv.stderr], [2, 'unrevoke: LATCHKEY_BROKER_URL http://***@127.0.0.1:23203: must not carry userinfo (user:password@): the broker takes the admin token from LATCHKEY_BROKER_ADMIN_TOKEN\n'])
  // Read as userinfo by the URL parser, however spelt.
  const bare = run(['revoke', '--broker', 'http:u:BROKERURLPASS@127.0.0.1:23203', 'agent:x'])
  t.same([bare.status, bare.stderr], [2, 'revoke: --broker http://***@127.0.0.1:23203: must not carry userinfo (user:password@): the broker takes the admin token from LATCHKEY_BROKER_ADMIN_TOKEN\n'])
  const notUrl = run(['revoke', '--broker', 'http://u:BROKERURLPASS@[bad', 'agent:x'])
  t.same([notUrl.status, notUrl.stderr], [2, 'revoke: --broker is not a URL (http://host:port expected)\n'])
  // --help prints the option's default: the environment's URL is not it.
  const help = run(['revoke', '--help'], { LATCHKEY_BROKER_URL: 'http://u:BROKERURLPASS@127.0.0.1:23203' })
  t.match(help.stdout, /--broker <url>/)
  for (const r of [flag, fromEnv, bare, notUrl, help]) t.notMatch(r.stdout + r.stderr, /BROKERURLPASS/)
})
