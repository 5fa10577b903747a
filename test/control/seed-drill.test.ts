// The seed checklist's drill: kill an agent process mid-task; its tokens die with the task (the
// sidecar drops them when the task ends) and at the broker within their short lifetime
// (expired for any API after exp). The agent is a real curl process, killed with SIGKILL.
import t from 'tap'
import { spawn } from 'node:child_process'
import { createRemoteJWKSet, jwtVerify } from 'jose'
import { API } from '../helpers/broker.js'
import { startApi, startControlBroker, startControlSidecar, until } from './rig.js'

t.test('an agent killed mid-task: its token dies with the task and within its lifetime', async (t) => {
  // A 1 s floor so the token's life follows the 3 s task (the default floor is 60 s).
  const broker = await startControlBroker({ broker: { tokens: { floor_s: 1 } } })
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:killed', { sidecar: { broker: { url: broker.url, timeout_ms: 2000, min_remaining_ms: 200 } } })
  t.teardown(s.close)
  const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose: 'short task', duration_s: 3 }) })
  const task = (await res.json()) as { task: string; id: string; proxy_url: string }
  t.equal(res.status, 201)

  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete env[k]
  const agent = spawn('curl', ['-sS', '-N', '-x', task.proxy_url, `${api.origin}/stream`], { env, stdio: ['ignore', 'pipe', 'ignore'] })
  let got = 0
  agent.stdout.on('data', () => got++)
  await until('agent mid-task', () => got > 1)
  t.equal(s.sidecar.brokerTokens!.describe(task.id).length, 1, 'the task holds a token')
  const token = api.tokens.at(-1)!
  agent.kill('SIGKILL')
  await new Promise((r) => agent.once('exit', r))

  const introspect = async () => {
    const r = await fetch(`${broker.url}/oauth2/introspect`, {
      method: 'POST',
      headers: { authorization: 'Basic ' + Buffer.from(`api-server:${broker.introspectionSecret}`).toString('base64') },
      body: new URLSearchParams({ token }),
    })
    return (await r.json()) as { active: boolean; exp?: number }
  }
  const live = await introspect()
  t.equal(live.active, true, 'right after the kill the token is still within its short life')
  t.ok(live.exp! - Date.now() / 1000 <= 4, `its life is bounded by the task (exp in ${(live.exp! - Date.now() / 1000).toFixed(1)} s)`)
  await until('the task ended and its tokens dropped', () => s.sidecar.brokerTokens!.describe(task.id).length === 0 && s.sidecar.tasks.size === 0, 6000)
  // Past exp, an API verifying strictly (no clock tolerance) refuses it. (The broker's own
  // introspection allows 30 s of skew on top, so it turns inactive that much later.)
  await new Promise((r) => setTimeout(r, Math.max(0, live.exp! * 1000 - Date.now() + 50)))
  const jwks = createRemoteJWKSet(new URL(`${broker.url}/.well-known/jwks.json`))
  const verified = await jwtVerify(token, jwks, { issuer: broker.issuer, audience: API }).then(() => 'valid', (e: Error) => e.constructor.name)
  t.equal(verified, 'JWTExpired', 'the killed agent\'s token is dead after its short lifetime')
})
