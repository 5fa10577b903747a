// The local task API answers every mistake with a status and a reason that say what was wrong,
// bounds what one caller can make it hold, and records each task's life in the log (by its ID,
// never its handle). The proxy credential is read from one field, never guessed.
import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { readFileSync } from 'node:fs'
import { randomUUID } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { startBearerRig, rawRequest, assertNoCanary, startUpstream, startTestSidecar, loopbackPolicy, openTask, CANARY } from '../helpers/harness.js'
import { MAX_OPEN_TASKS } from '../../proxy/tasks/api.js'
import { DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT } from '../../proxy/tasks/listing.js'
import { TestIssuer } from '../helpers/issuer.js'

const run = promisify(execFile)

t.test('task API: clear refusals, a cap on open tasks, lifecycle in the log', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const admin = s.sidecar.adminUrl
  const open = (body: unknown) => fetch(`${admin}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : body instanceof Uint8Array ? new Uint8Array(body) : JSON.stringify(body) })

  const big = await open({ purpose: 'x'.repeat(70_000), duration_s: 60 })
  t.equal(big.status, 413, 'a body over 64 KiB is 413')
  t.same(await big.json(), { error: 'too_large', reason: 'body exceeds 65536 bytes', retryable: false }, 'saying it is not worth repeating')
  t.equal(big.headers.get('x-should-retry'), 'false', 'where SDKs look too')
  // Declared over 64 KiB, and only 10 bytes sent: refused at once, not once 64 KiB have come.
  const declared = await rawRequest(s.sidecar.adminPort, `POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"purpose"`)
  t.equal(declared.status, 413, 'a declared Content-Length over 64 KiB is 413 before the body arrives')
  t.match(await (await open({ purpose: ' \t\n ', duration_s: 60 })).json(), { error: 'bad_request', reason: 'purpose must say what the task is for: it is only whitespace' })

  const user = await open({ purpose: 'for alice', duration_s: 60, user_token: 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.' })
  t.equal(user.status, 400, 'a user token nobody would use is refused, not dropped')
  t.match((await user.json()).reason, /no broker credential is configured/)

  const emoji = '\u{1F600}'
  t.equal((await open({ purpose: emoji.repeat(256), duration_s: 60 })).status, 201, '256 characters, counted as a person counts them')
  t.equal((await open({ purpose: emoji.repeat(257), duration_s: 60 })).status, 400)

  // An audience that is no URL may be a token put in its place: not quoted back (an agent's error
  // text often lands in its model's context). One spelled as audiences are is named.
  const tokenAsAudience = await open({ purpose: 'p', duration_s: 60, audiences: [`ghp_${CANARY}`] })
  t.equal(tokenAsAudience.status, 400)
  const said = await tokenAsAudience.text()
  t.match(said, /no broker credential is configured for audience \(not repeated: it is no http\(s\) URL, and may be a token/)
  t.notOk(said.includes(CANARY), 'the token is not echoed')
  t.match(await (await open({ purpose: 'p', duration_s: 60, audiences: ['https://unknown.example.com'] })).json(), { reason: 'no broker credential is configured for audience "https://unknown.example.com"' })

  // RFC 8259 §8.1: JSON is UTF-8. Other bytes were read as U+FFFD: a task opened with a purpose never sent.
  for (const bytes of [[0xff], [0xc0, 0xaf], [0xed, 0xa0, 0x80]]) {
    const notUtf8 = await open(Buffer.concat([Buffer.from('{"purpose":"p'), Buffer.from(bytes), Buffer.from('","duration_s":60}')]))
    t.equal(notUtf8.status, 400, `bytes ${bytes.join(' ')}`)
    t.match(await notUtf8.json(), { error: 'bad_request', reason: 'body is not valid UTF-8' })
  }
  t.match(await (await open('\ufeff{"purpose":"p","duration_s":60}')).json(), { reason: 'body is not JSON' }, 'a byte order mark is still no JSON')
  // The body is read as UTF-8 as it came: a declared charset or compression that says otherwise is
  // refused, where a gzip body was "not valid UTF-8" and a plain one labelled gzip opened a task.
  const labelled = (contentType: string, headers: Record<string, string> = {}) => fetch(`${admin}/v1/tasks`, { method: 'POST', headers: { 'content-type': contentType, ...headers }, body: '{"purpose":"p","duration_s":60}' })
  for (const charset of ['utf-16', 'iso-8859-1', '"utf-16le"']) {
    const r = await labelled(`application/json; charset=${charset}`)
    t.same([r.status, ((await r.json()) as { reason: string }).reason], [415, 'send the task as application/json in UTF-8: no other charset is read'], `charset=${charset}`)
  }
  t.equal((await labelled('application/json; Charset="UTF-8"')).status, 201, 'UTF-8 said in any case is read')
  const plainAsGzip = await labelled('application/json', { 'content-encoding': 'gzip' })
  t.same([plainAsGzip.status, ((await plainAsGzip.json()) as { reason: string }).reason], [415, 'send the task uncompressed: no Content-Encoding is read'], 'a plain body labelled gzip')
  const gz = await run('sh', ['-c', `printf '%s' '{"purpose":"p","duration_s":60}' | gzip | curl -s -w ' %{http_code}' -X POST -H 'content-type: application/json' -H 'content-encoding: gzip' --data-binary @- ${admin}/v1/tasks`])
  t.match(gz.stdout, /"reason":"send the task uncompressed: no Content-Encoding is read".* 415$/, 'curl sending a gzip body')
  // A member named twice: JSON.parse takes the last, another reader the first. A token as the name is not quoted.
  t.match(await (await open('{"purpose":"p","duration_s":60,"purpose":"q"}')).json(), { error: 'bad_request', reason: 'body names "purpose" twice (which one counts is ambiguous)' })
  t.match(await (await open('{"purpose":"p","duration_s":60,"\\u0064uration_s":3600}')).json(), { reason: 'body names "duration_s" twice (which one counts is ambiguous)' }, 'an escaped spelling is the same name')
  const tokenTwice = await (await open(`{"purpose":"p","duration_s":60,"x":{"ghp_${CANARY}":1,"ghp_${CANARY}":2}}`)).text()
  t.match(tokenTwice, /body names a member twice/)
  t.notOk(tokenTwice.includes(CANARY), 'a name that may be a token is not echoed')
  t.match(await (await open({ purpose: 'p', duration_s: 60, audience: ['https://x.example'] })).json(), { reason: 'unknown field "audience"; the fields are purpose, duration_s, user_token, audiences' }, 'a misspelt field is named, and the right ones')
  const tokenField = await (await open({ purpose: 'p', duration_s: 60, [`ghp_${CANARY}`]: 1 })).text()
  t.match(tokenField, /unknown field \(not repeated: it is no field name, and may be a token\)/)
  t.notOk(tokenField.includes(CANARY), 'an unknown name that may be a token is not echoed')

  const post404 = await fetch(`${admin}/v1/task`, { method: 'POST' })
  t.equal(post404.status, 404, 'an unknown admin path is 404 whatever the method')

  const task = (await (await open({ purpose: 'probe', duration_s: 60 })).json()) as { task: string; id: string }
  const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`
  const via = (auth: string) => rawRequest(s.sidecar.port, `GET ${upstream.origin}/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: ${auth}\r\nConnection: close\r\n\r\n`)
  t.equal((await via(basic('task', task.task))).status, 200, 'task:<handle> is the task')
  t.equal((await via(basic(task.task, ''))).status, 200, '<handle>@ is the task')
  const wrong = await via(basic(task.task, 'lkt_wrong'))
  t.equal(wrong.status, 407, 'a wrong password is wrong, even when the user field holds a handle')
  const other = (await (await open({ purpose: 'other', duration_s: 60 })).json()) as { task: string }
  const both = await via(basic(task.task, other.task))
  t.equal(both.status, 407, "two tasks' handles, as user and password, are neither task")
  t.match(both.raw, /"code":"LK_PROXY_AUTH".*names two task handles \(user and password\): which task the call runs under would be a guess/)
  t.equal((await via(basic(task.task, task.task))).status, 200, 'one handle as both is that task')

  // What an operator at 2 am asks first: which tasks are open here, by the ID a revocation takes.
  const listed = await fetch(`${admin}/v1/tasks`)
  t.equal(listed.status, 200)
  const listing = await listed.text()
  const open1 = (JSON.parse(listing) as { tasks: { id: string; purpose: string; state: string; expires_at: string }[] }).tasks
  t.match(open1.find((x) => x.id === task.id), { purpose: 'probe', state: 'open', expires_at: /^\d{4}-/ }, 'GET /v1/tasks lists the open task by its ID')
  t.notOk(listing.includes(task.task), 'never by its handle, a proxy credential')
  const put = await fetch(`${admin}/v1/tasks`, { method: 'PUT' })
  t.same([put.status, put.headers.get('allow')], [405, 'GET, POST'])
  t.equal((await fetch(`${admin}/v1/tasks/${task.task}`, { method: 'DELETE' })).status, 204)
  const after = (await (await fetch(`${admin}/v1/tasks`)).json()) as { tasks: { id: string }[] }
  t.notOk(after.tasks.some((x) => x.id === task.id), 'an ended task is no longer listed')
  t.ok(s.logs.some((l) => l.includes('"msg":"task opened"') && l.includes(`"task":"${task.id}"`) && l.includes('"purpose":"probe"')), 'opening is logged by ID and purpose')
  t.ok(s.logs.some((l) => l.includes('"msg":"task ended"') && l.includes(`"task":"${task.id}"`) && l.includes('"why":"ended"')), 'ending is logged with why')
  t.notOk(s.logs.some((l) => l.includes(task.task)), 'the handle, a proxy credential, is never logged')

  // Fill the registry to its cap directly (10,000 POSTs would only slow the test), then ask once more.
  while (s.sidecar.tasks.size < MAX_OPEN_TASKS) s.sidecar.tasks.open({ purpose: 'filler', durationS: 60 })
  // Listed a page at a time: all 10,000 in one answer were 12 MB, written holding the event loop half a second.
  const byDefault = await (await fetch(`${admin}/v1/tasks`)).text()
  const page1 = JSON.parse(byDefault) as { tasks: unknown[]; next: string | null }
  t.equal(page1.tasks.length, DEFAULT_LIST_LIMIT, `10,000 open: an answer without limit holds ${DEFAULT_LIST_LIMIT}`)
  t.ok(byDefault.length < 100_000 && page1.next !== null, `in ${byDefault.length} bytes, with a next page`)
  t.equal(((await (await fetch(`${admin}/v1/tasks?limit=${MAX_LIST_LIMIT}`)).json()) as { tasks: unknown[] }).tasks.length, MAX_LIST_LIMIT, `limit=${MAX_LIST_LIMIT} is the most one answer holds`)
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
  const pooled = async () => Number(/^latchkey_open_upstream_connections\{kind="pooled"\} (\d+)$/m.exec(await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text())?.[1])
  t.equal(await pooled(), 1, 'its upstream connection is kept alive for the task')
  await fetch(`${s.sidecar.adminUrl}/v1/tasks/${task.task}`, { method: 'DELETE' })
  for (let i = 0; i < 100 && (await pooled()) !== 0; i++) await new Promise((r) => setTimeout(r, 10))
  t.equal(await pooled(), 0, 'and closed when the task ends, not upstream_idle_ms later')
  t.equal((await call(`Bearer ${task.task}`)).status, 407, 'the ended task is refused')
  t.equal((await call(null)).status, 407, 'and no fallback to the agent with no task')
  t.equal(upstream.requests.length, 1, 'the credential went out once, for the task')
  assertNoCanary(t, s, none.raw)
})

t.test('a task handle in Authorization (the proxy_url used as a base URL) is refused, never sent upstream', async (t) => {
  // An upstream no credential is bound to: whatever Authorization the agent sends would be passed on.
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar({ ...loopbackPolicy([upstream.port]), routes: { open: upstream.origin } })
  t.teardown(s.close)
  const task = (await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"purpose":"p","duration_s":60}' })).json()) as { task: string; proxy_url: string }
  // A client given the proxy URL as its base URL sends the userinfo as Authorization: Basic.
  const base = `${task.proxy_url}/open/x`
  const viaCurl = await run('curl', ['-sS', '-i', base], { env: { PATH: process.env.PATH } })
  const status = Number(/^HTTP\/1\.1 (\d+)/.exec(viaCurl.stdout)?.[1])
  const headerSpellings = [
    `Basic ${Buffer.from(`task:${task.task}`).toString('base64')}`,
    `Basic ${Buffer.from(`${task.task}:`).toString('base64')}`,
    `bearer ${task.task}`,
  ]
  const raws = await Promise.all(headerSpellings.map((auth) => rawRequest(s.sidecar.port, `GET ${upstream.origin}/y HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\nAuthorization: ${auth}\r\nConnection: close\r\n\r\n`)))
  t.same(
    upstream.requests.filter((r) => JSON.stringify(r.rawHeaders).includes(task.task) || headerSpellings.some((h) => JSON.stringify(r.rawHeaders).includes(h.split(' ')[1]!))).map((r) => r.url),
    [],
    'no request carrying the handle reached the upstream',
  )
  t.equal(status, 400, 'the route call is refused')
  t.match(viaCurl.stdout, /x-latchkey-error: LK_BAD_REQUEST/i)
  t.match(viaCurl.stdout, /"reason":"the Authorization header carries a task handle/)
  t.same(raws.map((r) => r.status), [400, 400, 400], 'and so is an absolute-form call carrying it, in each spelling')
  t.notOk(viaCurl.stdout.includes(task.task) || raws.some((r) => r.raw.includes(task.task)), 'the refusal does not echo the handle')
  t.notOk(s.logs.some((l) => l.includes(task.task)), 'nor is it logged')
  const other = await rawRequest(s.sidecar.port, `GET ${upstream.origin}/z HTTP/1.1\r\nHost: 127.0.0.1:${upstream.port}\r\nAuthorization: Bearer lkt_is-not-quite-a-handle\r\nConnection: close\r\n\r\n`)
  t.equal(other.status, 200, 'an upstream token that merely starts like one is the agent\'s to send')
})

t.test('an agent with HTTP_PROXY set reaches the admin API through the proxy, as if directly: in absolute-form and through a tunnel, not audited', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const admin = new URL(s.sidecar.adminUrl)
  const post = (body: string, extra = '') =>
    rawRequest(s.sidecar.port, `POST ${admin.origin}/v1/tasks HTTP/1.1\r\nHost: ${admin.host}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n${extra}Connection: close\r\n\r\n${body}`)
  const opened = await post('{"purpose":"via the proxy","duration_s":60}')
  t.equal(opened.status, 201, 'POST /v1/tasks in absolute-form, as Python requests sends it with HTTP_PROXY set')
  const task = JSON.parse(opened.body) as { task: string; proxy_url: string }
  t.match(task.proxy_url, /^http:\/\/task:lkt_/)
  t.match((await rawRequest(s.sidecar.port, `GET ${admin.origin}/healthz HTTP/1.1\r\nHost: ${admin.host}\r\nConnection: close\r\n\r\n`)).raw, /^HTTP\/1\.1 200 OK\r\n[^]*\{"ok":true\}/, '/healthz too')
  // The admin API's own checks hold: a web page gets no task through the proxy either.
  const page = await post('{"purpose":"x","duration_s":60}', 'Origin: https://evil.example\r\n')
  t.equal(page.status, 403)
  t.equal(page.headers['x-latchkey-error'], 'LK_FOREIGN_ORIGIN')
  // Node's fetch with EnvHttpProxyAgent tunnels http:// through CONNECT.
  const script = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const res = await fetch(process.argv[1], { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"purpose":"fetch","duration_s":60}', dispatcher: new EnvHttpProxyAgent() })
    console.log(res.status, (await res.json()).proxy_url.slice(0, 16))`
  const env = { ...process.env, HTTP_PROXY: `http://127.0.0.1:${s.sidecar.port}`, NO_PROXY: '' }
  const fetched = await run(process.execPath, ['--input-type=module', '-e', script, `${admin.origin}/v1/tasks`], { env })
  t.equal(fetched.stdout.trim(), '201 http://task:lkt_', "Node's fetch through HTTP_PROXY opens a task")
  // The task works, and nothing of the admin calls is in the trail: they are no egress.
  t.equal((await rawRequest(s.sidecar.port, `GET ${upstream.origin}/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic ${Buffer.from(`task:${task.task}`).toString('base64')}\r\nConnection: close\r\n\r\n`)).status, 200)
  const audit = await s.audit()
  t.same(audit.map((e) => e.path), ['/x'], 'only the egress call is audited')
  t.equal(s.sidecar.tasks.size, 2, 'two tasks opened through the proxy')
})

t.test('a task handle an agent writes into a path or a route name is never audited or logged', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const { handle: task } = await openTask(s, 'p')
  const get = (target: string) => rawRequest(s.sidecar.port, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  // The task API by a spelling the sidecar does not take for its own: an ordinary upstream call here.
  t.equal((await get(`${upstream.origin}/v1/tasks/${task}`)).status, 200)
  t.equal((await get(`${upstream.origin}/v1/tasks/%6Ckt%5F${task.slice(4)}`)).status, 200, 'percent-encoded')
  t.equal((await get(`${upstream.origin}/v2/tasks/%256Ckt_${task.slice(4)}`)).status, 200, 'percent-encoded twice')
  t.equal((await rawRequest(s.sidecar.port, `GET /${task}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)).status, 404, 'a route named by the handle')
  // A host name made of it (lower-cased by the URL parser: still most of the handle), as a call and as a tunnel.
  t.equal((await get(`http://${task}.example.invalid/x`)).status, 403, 'a host named by the handle')
  t.equal((await rawRequest(s.sidecar.port, `CONNECT ${task}.example.invalid:443 HTTP/1.1\r\nHost: ${task}.example.invalid:443\r\n\r\n`)).status, 403, 'a tunnel to it')
  await new Promise((r) => setTimeout(r, 100))
  const audit = readFileSync(s.auditPath, 'utf8')
  const secretPart = task.slice(4).toLowerCase()
  t.notOk(audit.toLowerCase().includes(secretPart), 'no audit event holds the handle, plain, encoded or lower-cased')
  t.notOk(s.logs.some((l) => l.toLowerCase().includes(secretPart)), 'no log line does')
  const events = audit.trim().split('\n').map((l) => JSON.parse(l) as { host: string | null; path: string | null; reason: string | null })
  t.equal(events.filter((e) => e.host === 'lkt_[removed].example.invalid').length, 2, 'the host is kept, the handle removed')
  t.ok(events.some((e) => e.path === '/v1/tasks/lkt_[removed]'), 'the path is kept, the handle removed')
  t.ok(events.some((e) => e.reason?.startsWith("the path's first segment names no route (it is not repeated")), 'the reason for the route it named does not quote it')
})

t.test('a path holding an encoded handle is recorded as it was sent, the handle alone removed', async (t) => {
  const { upstream, s } = await startBearerRig(t)
  const { handle: task } = await openTask(s, 'p')
  const get = (target: string) => rawRequest(s.sidecar.port, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  // Anything handle-shaped made the whole path recorded decoded: `%2F` as `/`, an encoded
  // Cyrillic `а` as the letter, which reads as "admin"; never what the upstream got.
  const fake = `/x%2F..%2Fy/%6Ckt_${'A'.repeat(22)}/%D0%B0dmin`
  t.equal((await get(`${upstream.origin}${fake}`)).status, 200)
  // A second handle, encoded three times: the decoding that found the first left it encoded twice.
  t.equal((await get(`${upstream.origin}/a/%6Ckt_${task.slice(4)}/b/%25256Ckt_${task.slice(4)}/c%3F`)).status, 200)
  await new Promise((r) => setTimeout(r, 100))
  const audit = readFileSync(s.auditPath, 'utf8')
  const paths = audit.trim().split('\n').map((l) => (JSON.parse(l) as { path: string | null }).path)
  t.same(paths, ['/x%2F..%2Fy/lkt_[removed]/%D0%B0dmin', '/a/lkt_[removed]/b/lkt_[removed]/c%3F'], 'each path as sent, its handles removed')
  t.notOk(audit.toLowerCase().includes(task.slice(4).toLowerCase()), 'no event holds the handle')
})

t.test("a task handle an agent writes into another task's purpose is neither listed nor logged", async (t) => {
  const { s } = await startBearerRig(t)
  const { handle: parent } = await openTask(s, 'parent')
  // An agent naming the task a subtask belongs to by what it has of it: its handle, plain or encoded.
  await openTask(s, `subtask of ${parent}`)
  await openTask(s, `subtask of %6Ckt_${parent.slice(4)}`)
  const secretPart = parent.slice(4)
  const listed = await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`)).text()
  t.notOk(listed.includes(secretPart), 'GET /v1/tasks lists tasks, never a handle')
  t.same((JSON.parse(listed) as { tasks: { purpose: string }[] }).tasks.map((x) => x.purpose), ['parent', 'subtask of lkt_[removed]', 'subtask of lkt_[removed]'])
  t.notOk(s.logs.some((l) => l.includes(secretPart)), 'no log line holds it')
})

t.test('GET /v1/tasks pages: a sane default, a maximum, a cursor that neither doubles nor skips a task opened or ended between pages', async (t) => {
  const { s } = await startBearerRig(t)
  const admin = s.sidecar.adminUrl
  type Page = { tasks: { id: string }[]; next_cursor: string | null; next: string | null }
  const get = async (query: string) => {
    const res = await fetch(`${admin}/v1/tasks${query}`)
    return { status: res.status, text: await res.text() }
  }
  const opened = [] as { handle: string; id: string }[]
  for (let i = 0; i < 5; i++) opened.push(await openTask(s, `task ${i}`))
  const handles = () => opened.map((o) => o.handle.slice(4))

  const first = await get('?limit=2')
  t.equal(first.status, 200)
  const p1 = JSON.parse(first.text) as Page
  t.same(p1.tasks.map((x) => x.id), [opened[0]!.id, opened[1]!.id], 'limit=2: the first two, in the order they were opened')
  t.equal(p1.next, `/v1/tasks?limit=2&cursor=${p1.next_cursor}`, 'next is the request for the rest, as it is')
  // Between pages: one already shown and one not yet shown end, a pending task is confirmed (it
  // was opened before the first page), and a new task opens.
  const pending = s.sidecar.tasks.open({ purpose: 'pending', durationS: 60, pending: true })
  s.sidecar.tasks.end(opened[0]!.handle)
  s.sidecar.tasks.end(opened[3]!.handle)
  s.sidecar.tasks.confirm(pending)
  const late = await openTask(s, 'late')
  const rest: Page[] = []
  for (let next = p1.next; next !== null; next = rest.at(-1)!.next) {
    const r = await get(next.slice('/v1/tasks'.length))
    t.notOk(handles().some((h) => r.text.includes(h)) || r.text.includes(late.handle.slice(4)), 'no page holds a handle')
    rest.push(JSON.parse(r.text) as Page)
  }
  t.same(rest.map((r) => r.tasks.length), [2, 2], 'pages of two, the last saying there is no next')
  t.same(rest.flatMap((r) => r.tasks.map((x) => x.id)), [opened[2]!.id, opened[4]!.id, pending.id, late.id], 'the rest once each: no task shown twice, none still open skipped, the one ended unshown not listed')
  t.notOk(handles().some((h) => first.text.includes(h) || String(p1.next_cursor).includes(h)), 'nor does the first page or its cursor')

  // What is refused, naming the parameter; never repeating a value (a cursor may be anything pasted).
  const refusals: [string, RegExp][] = [
    [`?limit=${MAX_LIST_LIMIT + 1}`, /^limit must be a whole number from 1 to 1000, in decimal digits$/],
    ['?limit=0', /^limit must be/],
    ['?limit=1e2', /^limit must be/],
    ['?limit=', /^limit must be/],
    [`?cursor=${opened[1]!.handle}`, /^cursor is not one this API gave: pass the next_cursor of the previous answer as it is$/],
    ['?cursor=', /^cursor is not one this API gave/],
    [`?cursor=${Buffer.from('t1:AAAAAAAA:5').toString('base64url')}`, /^cursor is from before the sidecar restarted .* list again without cursor$/],
    ['?limt=5', /^unknown query parameter "limt"; the parameters are limit, cursor$/],
    [`?${opened[1]!.handle}=1`, /^unknown query parameter \(not repeated\)/],
    ['?limit=5&limit=6', /^query parameter "limit" is given twice/],
  ]
  for (const [query, reason] of refusals) {
    const r = await get(query)
    t.equal(r.status, 400, query)
    t.match(JSON.parse(r.text), { error: 'bad_request', reason, retryable: false })
    t.notOk(r.text.includes(opened[1]!.handle.slice(4)), 'the value is not repeated')
  }
})

t.test('a purpose holding text shaped as a credential is refused, never answered, listed or logged; words, IDs and hashes open', async (t) => {
  const { s } = await startBearerRig(t)
  const issuer = await TestIssuer.create('https://idp.example', 'EdDSA')
  // Short enough for a purpose (256 characters): no iss, exp or jti.
  const jwt = await issuer.sign({ sub: 'alice', iss: null, exp: null, jti: null })
  // Real signatures (ES256, EdDSA: 86 characters each), fixed: the shape is a judgement a random one passes once in 10,000.
  const es256 = 'iVuLx2Yu0_N3ndVz1zhXtyyzuaqKqZDAfZGlGk5ZAp6SwmVj6JQtPAJtS4S8_6JR1dCwvzHXofFsMpOZGYwO6w'
  const eddsa = 'm95DY8_fYHqjapUdxM-qoVftjlnNky_qnrKtI6bVAF8kHK_ri2WhR94sRE_DFqAvMzdoV9-_IZ655LNBInr4AA'
  const apiKey = 'ghp_R7kQ2mXv9LpT4wZs8NbYc3HdJf6GaE1uVo0i'
  const tokenShaped: [string, string][] = [
    ['a JWT', `act for ${jwt}`],
    ['an ES256 signature', `checking sig ${es256}`],
    ['an EdDSA signature', eddsa],
    ['an API key', `use ${apiKey} for the repo`],
    ['an API key, percent-encoded', `key ${encodeURIComponent(apiKey).replace('_', '%5F')}`],
    // The sidecar's own secret, in a spelling no shape gives away (hex is one case): found by value.
    ["the sidecar's static secret, in hex", `x ${Buffer.from(CANARY).toString('hex')}`],
  ]
  const secrets = [jwt.split('.')[2]!, es256, eddsa, apiKey.slice(4), CANARY, Buffer.from(CANARY).toString('hex')]
  const said: string[] = []
  for (const [what, purpose] of tokenShaped) {
    const res = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ purpose, duration_s: 60 }) })
    const text = await res.text()
    said.push(text)
    t.equal(res.status, 400, `${what}: refused`)
    t.match(JSON.parse(text), { error: 'bad_request', reason: /^purpose holds text shaped as a credential .* refused and not repeated/ }, `${what}: saying why`)
  }
  // Not refused: what a purpose names that only looks technical.
  const fine = ['review commit 5ff0ebd3a1c2b9e8f7d6c5b4a3928170fedcba98', `subtask of ${randomUUID()}`, 'refactor migrateUserAccounts2024Q3ToNewSchema', 'getHTTP2ConnectionID4Pool in X509CertificateV3Parser4TLS13', 'sha256 2188833f4c20dd1047dfd0968fb8424a47e32e696570e1db57dc25a373d88aed']
  for (const purpose of fine) await openTask(s, purpose)
  const listed = await (await fetch(`${s.sidecar.adminUrl}/v1/tasks`)).text()
  t.same((JSON.parse(listed) as { tasks: { purpose: string }[] }).tasks.map((x) => x.purpose), fine, 'only the plain purposes are open')
  const everything = [...said, listed, ...s.logs].join('\n')
  t.same(secrets.filter((x) => everything.includes(x)), [], 'no answer, listing or log line holds any of them')
  assertNoCanary(t, s, ...said)
})

t.test('a task body that stops short or trickles is answered 408 within timeouts.client_headers_ms, and its connection closed', async (t) => {
  const s = await startTestSidecar({ sidecar: { timeouts: { client_headers_ms: 400 } } })
  t.teardown(() => s.close())
  const head = (framing: string) => `POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n${framing}\r\n`
  // Held until the agent hung up, as long as it liked: node:http's own 30 s request timeout waited on this very response.
  const stalls = async (what: string, send: (socket: Socket) => void) => {
    const socket = connect(s.sidecar.adminPort, '127.0.0.1')
    await once(socket, 'connect')
    const started = performance.now()
    let got = ''
    socket.on('data', (c: Buffer) => (got += c.toString()))
    send(socket)
    const closed = await Promise.race([once(socket, 'close').then(() => true), new Promise((r) => setTimeout(r, 3000, false).unref())])
    socket.destroy()
    t.ok(closed, `${what}: the connection is closed`)
    t.match(got, /^HTTP\/1\.1 408 [^]*"error":"request_timeout","reason":"the body did not all arrive within timeouts.client_headers_ms \(400 ms\)"/, `${what}: 408 saying why`)
    t.ok(performance.now() - started < 1500, `${what}: within the deadline (${Math.round(performance.now() - started)} ms)`)
  }
  await stalls('a body stopped short', (socket) => socket.write(head('Content-Length: 50\r\n') + '{"purpose"'))
  let timer: NodeJS.Timeout | undefined
  await stalls('a chunked body trickled a byte at a time', (socket) => {
    socket.write(head('Transfer-Encoding: chunked\r\n'))
    const body = `{"purpose":"${'p'.repeat(200)}","duration_s":60}`
    let i = 0
    timer = setInterval(() => (i < body.length && !socket.destroyed ? socket.write(`1\r\n${body[i++]}\r\n`) : clearInterval(timer)), 20)
  })
  clearInterval(timer)
  t.equal(s.sidecar.tasks.size, 0, 'neither opened a task')
  await openTask(s, 'in time')
})
