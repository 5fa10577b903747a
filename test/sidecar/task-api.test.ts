// The local task API answers every mistake with a status and a reason that say what was wrong,
// bounds what one caller can make it hold, and records each task's life in the log (by its ID,
// never its handle). The proxy credential is read from one field, never guessed.
import t from 'tap'
import { startBearerRig, rawRequest, assertNoCanary } from '../helpers/harness.js'
import { MAX_OPEN_TASKS } from '../../proxy/tasks/api.js'

t.test('task API: clear refusals, a cap on open tasks, lifecycle in the log', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const admin = s.sidecar.adminUrl
  const open = (body: unknown) => fetch(`${admin}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body) })

  const big = await open({ purpose: 'x'.repeat(70_000), duration_s: 60 })
  t.equal(big.status, 413, 'a body over 64 KiB is 413')
  t.match(await big.json(), { error: 'too_large', reason: 'body exceeds 65536 bytes' })

  const user = await open({ purpose: 'for alice', duration_s: 60, user_token: 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.' })
  t.equal(user.status, 400, 'a user token nobody would use is refused, not dropped')
  t.match((await user.json()).reason, /no broker credential is configured/)

  const emoji = '\u{1F600}'
  t.equal((await open({ purpose: emoji.repeat(256), duration_s: 60 })).status, 201, '256 characters, counted as a person counts them')
  t.equal((await open({ purpose: emoji.repeat(257), duration_s: 60 })).status, 400)

  const post404 = await fetch(`${admin}/v1/task`, { method: 'POST' })
  t.equal(post404.status, 404, 'an unknown admin path is 404 whatever the method')

  const task = (await (await open({ purpose: 'probe', duration_s: 60 })).json()) as { task: string; id: string }
  const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`
  const via = (auth: string) => rawRequest(s.sidecar.port, `GET ${upstream.origin}/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: ${auth}\r\nConnection: close\r\n\r\n`)
  t.equal((await via(basic('task', task.task))).status, 200, 'task:<handle> is the task')
  t.equal((await via(basic(task.task, ''))).status, 200, '<handle>@ is the task')
  const wrong = await via(basic(task.task, 'lkt_wrong'))
  t.equal(wrong.status, 407, 'a wrong password is wrong, even when the user field holds a handle')

  t.equal((await fetch(`${admin}/v1/tasks/${task.task}`, { method: 'DELETE' })).status, 204)
  t.ok(s.logs.some((l) => l.includes('"msg":"task opened"') && l.includes(`"task":"${task.id}"`) && l.includes('"purpose":"probe"')), 'opening is logged by ID and purpose')
  t.ok(s.logs.some((l) => l.includes('"msg":"task ended"') && l.includes(`"task":"${task.id}"`) && l.includes('"why":"ended"')), 'ending is logged with why')
  t.notOk(s.logs.some((l) => l.includes(task.task)), 'the handle, a proxy credential, is never logged')

  // Fill the registry to its cap directly (10,000 POSTs would only slow the test), then ask once more.
  while (s.sidecar.tasks.size < MAX_OPEN_TASKS) s.sidecar.tasks.open({ purpose: 'filler', durationS: 60 })
  const full = await open({ purpose: 'one too many', duration_s: 60 })
  t.equal(full.status, 429)
  t.match(await full.json(), { error: 'too_many_tasks', reason: /10000 tasks are open; end one/ })
  assertNoCanary(t, s, wrong.raw)
})

t.test('tasks.required: a call that names no task gets no credential, so a task end ends its egress', async (t) => {
  const { upstream, s } = await startBearerRig(t, { fragment: () => ({ tasks: { required: true } }) })
  const call = (auth: string | null) =>
    rawRequest(s.sidecar.port, `GET ${upstream.origin}/x HTTP/1.1\r\nHost: x\r\n${auth ? `Proxy-Authorization: ${auth}\r\n` : ''}Connection: close\r\n\r\n`)
  const none = await call(null)
  t.equal(none.status, 407)
  t.match(JSON.parse(none.body), { code: 'LK_PROXY_AUTH', reason: 'this sidecar requires a task: open one with POST /v1/tasks and use its proxy_url' })
  const task = (await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"purpose":"p","duration_s":60}' })).json()) as { task: string }
  t.equal((await call(`Bearer ${task.task}`)).status, 200, 'with a task, the call is made')
  await fetch(`${s.sidecar.adminUrl}/v1/tasks/${task.task}`, { method: 'DELETE' })
  t.equal((await call(`Bearer ${task.task}`)).status, 407, 'the ended task is refused')
  t.equal((await call(null)).status, 407, 'and no fallback to the agent with no task')
  t.equal(upstream.requests.length, 1, 'the credential went out once, for the task')
  assertNoCanary(t, s, none.raw)
})
