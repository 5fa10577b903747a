// `latchkey revoke` of an ID no sidecar serves: a mistyped instance or type is revoked as readily
// as the right one, and printed "revoked", exit 0, while the agent meant ran on. The broker now
// says what it knows of the value (a registry type that can have such an instance, sidecars of it
// connected to its control stream) and the CLI warns. All real: the broker and its control
// stream, a sidecar connected to it, the CLI as a process.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { startApi, startControlBroker, startControlSidecar, until } from './rig.js'
import { CLI } from '../helpers/cli.js'

const run = promisify(execFile)

t.test('latchkey revoke warns when the ID names no registry type, or no connected sidecar', async (t) => {
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const agent = 'agent:summarizer:prod:reach'
  const sidecar = await startControlSidecar(broker, api, agent)
  t.teardown(sidecar.close)
  await until('the sidecar connected', () => sidecar.sidecar.control!.connected)

  const env: NodeJS.ProcessEnv = { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: broker.adminToken }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'NO_PROXY']) delete env[k]
  const admin = { authorization: `Bearer ${broker.adminToken}`, 'content-type': 'application/json' }
  // Lifted through the admin API (the CLI's unrevoke is tested elsewhere): one process per case.
  const unrevoke = (value: string) => fetch(`${broker.url}/v1/revocations/agent/${encodeURIComponent(value)}`, { method: 'DELETE', headers: admin }).then((r) => t.equal(r.status, 200, `${value} lifted`))
  const revoke = async (value: string) => {
    const r = await run(process.execPath, [CLI, 'revoke', value, '--broker', broker.url], { env })
    await unrevoke(value)
    return r
  }
  // The admin API's own answer, for other clients, and what the CLI's warnings are made from.
  const answer = async (value: string) => {
    const res = await fetch(`${broker.url}/v1/revocations`, { method: 'POST', headers: admin, body: JSON.stringify({ kind: 'agent', value }) })
    const body = (await res.json()) as Record<string, unknown>
    await unrevoke(value)
    return body
  }

  const right = await revoke(agent)
  t.match(right.stdout, `agent ${agent} revoked`)
  t.equal(right.stderr, '', 'the connected agent: no warning')

  const instanceTypo = await revoke('agent:summarizer:prod:raech')
  t.match(instanceTypo.stdout, 'agent agent:summarizer:prod:raech revoked', 'the revocation is still made')
  t.match(instanceTypo.stderr, /warning: no sidecar of agent:summarizer:prod:raech has a control stream open to this broker/, 'a mistyped instance is said to reach no sidecar')

  const typeTypo = await revoke('agent:sumarizer:prod:reach')
  t.match(typeTypo.stderr, /warning: no agent type in the broker's registry has instances like agent:sumarizer:prod:reach/, 'a mistyped type is said to be in no registry')

  // A task ID upper-cased on its way to the operator: revoked as given, matching no task.
  const liftTask = (value: string) => fetch(`${broker.url}/v1/revocations/task/${value}`, { method: 'DELETE', headers: admin }).then((r) => t.equal(r.status, 200, `task ${value} lifted`))
  const upper = '3F2504E0-4F89-41D3-9A0C-0305E82C3301'
  const upperTask = await run(process.execPath, [CLI, 'revoke', '--task', upper, '--broker', broker.url], { env })
  await liftTask(upper)
  t.match(upperTask.stdout, `task ${upper} revoked`, 'the revocation is still made')
  t.match(upperTask.stderr, `warning: ${upper} has upper-case letters; task IDs are matched exactly and a sidecar's are lower-case (${upper.toLowerCase()})`, 'an upper-cased task UUID is warned of')
  const lowerTask = await run(process.execPath, [CLI, 'revoke', '--task', upper.toLowerCase(), '--broker', broker.url], { env })
  await liftTask(upper.toLowerCase())
  t.equal(lowerTask.stderr, '', 'a task UUID as a sidecar writes it: no warning')

  t.match(await answer('agent:summarizer:dev:reach'), { created: true, registered: false }, 'an env the type does not have is in no registry either')
  t.match(await answer('agent:summarizer:*:*'), { created: true, registered: true, connected: 1 }, 'a pattern matching the connected agent reaches it')
  t.match(await answer(agent), { created: true, registered: true, connected: 1 })
})
