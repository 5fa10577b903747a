// Several requests in one write, and calls Node's parser would otherwise answer by itself: each is
// decided in turn, nothing queued behind a refusal that closes the connection is ever sent, the
// sidecar survives all of it, and every call is audited.
import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { createServer } from 'node:http'
import { startSlowCallRig, rawRequest, assertNoCanary, sidecarInFrontOf, CANARY } from '../helpers/harness.js'

const setup = (t: Test) => startSlowCallRig(t, 150)

/** Sends `request` inside a plaintext CONNECT tunnel to `host` and collects what comes back until the sidecar closes. */
async function throughTunnel(port: number, host: string, request: string): Promise<string> {
  const sock = connect(port, '127.0.0.1')
  await once(sock, 'connect')
  sock.write(`CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  await once(sock, 'data')
  let raw = ''
  sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
  sock.write(request)
  await once(sock, 'close')
  return raw
}

/** Status codes of every response in a raw byte stream, in order. */
function statuses(raw: string): number[] {
  return [...raw.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1]))
}

t.test('pipelined behind a refusal: not sent, not decided, audited as not sent', async (t) => {
  const { upstream, s, host } = await setup(t)
  const cases: [string, string][] = [
    ['a policy refusal', `GET http://127.0.0.1:1/denied HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n`],
    ['a framing refusal', `GET http://${host}/dup HTTP/1.1\r\nHost: ${host}\r\nHost: other\r\n\r\n`],
    ['TRACE', `TRACE http://${host}/ HTTP/1.1\r\nHost: ${host}\r\n\r\n`],
  ]
  for (const [name, refused] of cases) {
    const before = upstream.requests.length
    const auditBefore = (await s.audit()).length
    // An allowed slow call first, so the refusal and what follows it are queued behind it.
    const raw = await rawRequest(
      s.sidecar.port,
      `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\n` + refused + `DELETE http://${host}/item/7 HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
    )
    t.same(statuses(raw.raw), [200, name === 'a policy refusal' ? 403 : 400], `${name}: the first is answered, then the refusal, then the connection closes`)
    t.same(
      upstream.requests.slice(before).map((r) => r.url),
      ['/slow'],
      `${name}: the DELETE queued behind the refusal never reached the upstream`,
    )
    const events = (await s.audit()).slice(auditBefore)
    t.equal(events.length, 3, `${name}: three calls, three events`)
    const deleted = events.find((e) => e.method === 'DELETE')
    t.match(deleted, { status: 0, error: 'LK_BAD_REQUEST', reason: /not sent: the connection was closing/, path: '/item/7' }, `${name}: the DELETE is recorded as not sent (status 0: no response went), with its target`)
    assertNoCanary(t, s, raw.raw)
  }
  const after = await rawRequest(s.sidecar.port, `GET http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)
  t.equal(after.status, 200, 'the sidecar is still serving')
})

t.test('pipelined behind an early answer that closes the connection: not sent, not decided', async (t) => {
  // An upstream refusing an upload before reading it (a 413, a 401): the sidecar relays the answer
  // with Connection: close while the agent's body is still arriving. What the agent pipelined
  // behind the body was parsed, decided and sent off with the credential, and audited as a 403
  // or a 499 the agent never saw.
  const reached: string[] = []
  const upstream = createServer((req, res) => {
    reached.push(req.url!)
    if (req.url === '/upload') res.writeHead(413, { connection: 'close', 'content-type': 'text/plain' }).end('too large')
    else req.resume().once('end', () => res.end('ok'))
  })
  const { port, s } = await sidecarInFrontOf(t, upstream)
  const host = `127.0.0.1:${port}`
  for (const after of [`http://${host}/after`, 'http://127.0.0.1:1/denied']) {
    const auditBefore = (await s.audit()).length
    // Half-open, as Python's and curl's sockets are: it goes on sending after the sidecar's FIN.
    const sock = connect({ port: s.sidecar.port, host: '127.0.0.1', allowHalfOpen: true })
    await once(sock, 'connect')
    let raw = ''
    sock.on('data', (d: Buffer) => (raw += d.toString('latin1')))
    sock.write(`POST http://${host}/upload HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 20\r\n\r\n0123456789`)
    for (let i = 0; i < 200 && !raw.includes('\r\n\r\n'); i++) await new Promise((r) => setTimeout(r, 10))
    t.match(raw, /^HTTP\/1\.1 413 /, 'the early answer is relayed')
    sock.end(`0123456789GET ${after} HTTP/1.1\r\nHost: x\r\n\r\n`)
    await once(sock, 'close')
    t.same(statuses(raw), [413], `${after}: nothing answered after the early answer`)
    const audit = (await s.audit(auditBefore + 2)).slice(auditBefore)
    t.match(audit, [{ path: '/upload', status: 413 }, { path: new URL(after).pathname, status: 0, decision: null, error: 'LK_BAD_REQUEST', reason: /^not sent/ }], `${after}: recorded as not sent, decided by nobody`)
  }
  t.same(reached, ['/upload', '/upload'], 'nothing after the early answer reached the upstream')
  assertNoCanary(t, s)
})

t.test("a request not sent is in its task's history: recorded under the task its Proxy-Authorization names", async (t) => {
  const { s, host } = await setup(t)
  const opened = await fetch(`${s.sidecar.adminUrl}/v1/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"purpose":"pipelined","duration_s":60}' })
  const { task } = (await opened.json()) as { task: string }
  const auth = `Proxy-Authorization: Basic ${Buffer.from(`task:${task}`).toString('base64')}\r\n`
  const raw = await rawRequest(
    s.sidecar.port,
    `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n${auth}\r\n` + `GET http://127.0.0.1:1/denied HTTP/1.1\r\nHost: 127.0.0.1:1\r\n${auth}\r\n` + `DELETE http://${host}/item/8 HTTP/1.1\r\nHost: ${host}\r\n${auth}\r\n`,
  )
  t.same(statuses(raw.raw), [200, 403])
  const events = await s.audit()
  const taskId = events.find((e) => e.path === '/slow')?.task
  t.ok(taskId, 'the calls ran in the task')
  t.match(events.find((e) => e.method === 'DELETE'), { task: taskId, status: 0, error: 'LK_BAD_REQUEST', path: '/item/8' }, 'the one not sent too')
})

t.test('a malformed request behind one still being answered is recorded; the connection ends after the owed response', async (t) => {
  const { upstream, s, host } = await setup(t)
  const raw = await rawRequest(s.sidecar.port, `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\nGET /x HT TP/1.1\r\n\r\n`)
  t.same(statuses(raw.raw), [200], 'the owed response, then the connection closes')
  t.same(upstream.requests.map((r) => r.url), ['/slow'])
  const events = await s.audit()
  t.equal(events.length, 2, 'two calls, two events')
  t.match(events.find((e) => e.method === 'UNKNOWN'), { status: 0, error: 'LK_BAD_REQUEST', reason: /^malformed HTTP request \(HPE_INVALID_CONSTANT\)(: [^;]*)?; not answered: it came behind a call still being answered/ }, 'recorded with no status: no 400 went')
})

t.test('a malformed request behind a slow call does not cut it: the owed response is written in full', async (t) => {
  // Slower than any backstop for a refusal being written: the call is bounded by its own timeouts.
  const { upstream, s, host } = await startSlowCallRig(t, 1_500)
  const raw = await rawRequest(s.sidecar.port, `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nX: \x01\r\n\r\n`, 1_000)
  t.same(statuses(raw.raw), [200], 'the slow call is answered, then the connection closes')
  t.match(raw.body, /late/, 'with its body')
  t.same(upstream.requests.map((r) => r.url), ['/slow'])
  const events = await s.audit()
  t.match(events.find((e) => e.path === '/slow'), { status: 200, error: null }, 'recorded as answered, not as cut by the agent')
  t.match(events.find((e) => e.method === 'UNKNOWN'), { status: 0, error: 'LK_BAD_REQUEST' })
})

t.test('malformed bytes behind a queued request are recorded too', async (t) => {
  const { upstream, s, host } = await setup(t)
  const raw = await rawRequest(s.sidecar.port, `GET http://${host}/slow HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://${host}/good HTTP/1.1\r\nHost: ${host}\r\n\r\nGET /x HT TP/1.1\r\n\r\n`)
  t.same(statuses(raw.raw), [200])
  t.same(upstream.requests.map((r) => r.url), ['/slow'])
  const events = await s.audit()
  t.equal(events.length, 3, 'the answered call, the queued one not sent, the malformed bytes')
  t.match(events.find((e) => e.path === '/good'), { status: 0, reason: /not sent/ })
  t.match(events.find((e) => e.method === 'UNKNOWN'), { status: 0, reason: /malformed HTTP request/ })
})

t.test('requests queued when the agent hangs up are recorded as its doing, not as refusals', async (t) => {
  const { upstream, s, host } = await setup(t)
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.write(['/slow', '/queued-1', '/queued-2'].map((p) => `GET http://${host}${p} HTTP/1.1\r\nHost: ${host}\r\n\r\n`).join(''))
  await new Promise((r) => setTimeout(r, 50))
  sock.destroy()
  // Kept: time for a queued request wrongly sent after the agent left to reach the upstream.
  await new Promise((r) => setTimeout(r, 400))
  t.same(upstream.requests.map((r) => r.url), ['/slow'], 'only the first was sent')
  const events = await s.audit(3)
  t.match(events.find((e) => e.path === '/slow'), { status: 499, error: 'LK_CLIENT_CLOSED' })
  for (const path of ['/queued-1', '/queued-2']) {
    t.match(events.find((e) => e.path === path), { status: 0, error: 'LK_CLIENT_CLOSED', reason: 'not sent: the agent closed the connection before its turn' }, `${path}: not sent, because the agent left`)
  }
  t.equal(events.filter((e) => e.error === 'LK_BAD_REQUEST').length, 0, 'nothing is recorded as a bad request')
})

t.test('bytes after a request that closes its connection are recorded as not sent, never as a 400', async (t) => {
  const { upstream, s, host } = await setup(t)
  const after = [
    // Connection: close, then a well-formed request in the same write.
    `GET http://${host}/closing HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\nGET http://${host}/after-close HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
    // HTTP/1.0 without keep-alive, then anything.
    `GET http://${host}/one-oh HTTP/1.0\r\nHost: ${host}\r\n\r\nGARBAGE\r\n\r\n`,
  ]
  for (const raw of after) {
    const r = await rawRequest(s.sidecar.port, raw)
    t.same(statuses(r.raw), [200], 'the first is answered, nothing else')
  }
  // A line break left after a body (RFC 9112 section 2.2 lets a server ignore it): no event at all.
  const body = await rawRequest(s.sidecar.port, `POST http://${host}/with-body HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi\r\n`)
  t.same(statuses(body.raw), [200])
  t.same(upstream.requests.map((r) => r.url), ['/closing', '/one-oh', '/with-body'], 'nothing after a closing request was sent')
  const events = await s.audit(5)
  t.equal(events.length, 5, 'three calls, and one event for each request begun after a close')
  const notSent = events.filter((e) => e.method === 'UNKNOWN')
  t.equal(notSent.length, 2)
  for (const e of notSent) t.match(e, { status: 0, error: 'LK_BAD_REQUEST', reason: 'not sent: it came after a request that closes the connection (Connection: close, or HTTP/1.0 without keep-alive)' })
})

t.test('an agent that hangs up part-way through a request head is recorded as having left, not as malformed', async (t) => {
  const { upstream, s, host } = await setup(t)
  const sock = connect(s.sidecar.port, '127.0.0.1')
  sock.on('error', () => {})
  await once(sock, 'connect')
  sock.end(`GET http://${host}/partial HTTP/1.1\r\nHost: ${host}\r\n`)
  let got = ''
  sock.on('data', (d: Buffer) => (got += d.toString('latin1')))
  await Promise.race([once(sock, 'close'), new Promise((r) => setTimeout(r, 2_000))])
  sock.destroy()
  t.equal(got, '', 'nothing is written to it')
  const events = await s.audit(1)
  t.equal(upstream.requests.length, 0)
  t.equal(events.length, 1, 'one event')
  t.match(events[0], { method: 'UNKNOWN', status: 499, error: 'LK_CLIENT_CLOSED', reason: 'the agent closed the connection before its request head was complete' })
})

t.test('allowed pipelined requests are each decided and injected, answered in order', async (t) => {
  const { upstream, s, host } = await setup(t)
  const raw = await rawRequest(
    s.sidecar.port,
    `GET http://${host}/slow/1 HTTP/1.1\r\nHost: ${host}\r\n\r\n` +
      `POST http://${host}/2 HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 3\r\n\r\nabc` +
      `GET http://${host}/3 HTTP/1.1\r\nHost: ${host}\r\nAuthorization: Bearer agent-own\r\nConnection: close\r\n\r\n`,
  )
  t.same(statuses(raw.raw), [200, 200, 200])
  t.match(raw.raw, /late[\s\S]*ok[\s\S]*ok/, 'responses in request order')
  t.same(upstream.requests.map((r) => [r.method, r.url, r.body, r.headers.authorization]), [
    ['GET', '/slow/1', '', `Bearer ${CANARY}`],
    ['POST', '/2', 'abc', `Bearer ${CANARY}`],
    ['GET', '/3', '', `Bearer ${CANARY}`],
  ])
})

t.test('a deep pipeline is answered in full and in order, without piling listeners on the socket', async (t) => {
  const { upstream, s, host } = await setup(t)
  const warnings: string[] = []
  const onWarning = (w: Error) => warnings.push(w.name)
  process.on('warning', onWarning)
  t.teardown(() => void process.off('warning', onWarning))
  const n = 40
  let burst = `GET http://${host}/slow/0 HTTP/1.1\r\nHost: ${host}\r\n\r\n`
  for (let i = 1; i < n; i++) burst += `GET http://${host}/${i} HTTP/1.1\r\nHost: ${host}\r\n${i === n - 1 ? 'Connection: close\r\n' : ''}\r\n`
  const raw = await rawRequest(s.sidecar.port, burst)
  t.equal(statuses(raw.raw).length, n, 'every request answered')
  t.same(upstream.requests.map((r) => r.url), ['/slow/0', ...Array.from({ length: n - 1 }, (_, i) => `/${i + 1}`)], 'sent one after another, in order')
  t.same(warnings, [], 'no MaxListenersExceededWarning')
})

t.test('inside a plaintext CONNECT tunnel too', async (t) => {
  const { upstream, s, host } = await setup(t)
  const raw = await throughTunnel(s.sidecar.port, host, `GET /slow HTTP/1.1\r\nHost: ${host}\r\n\r\nGET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\nDELETE /item HTTP/1.1\r\nHost: ${host}\r\n\r\n`)
  t.same(statuses(raw), [200, 400], 'the tunnel answers the first, refuses the other origin, and closes')
  t.same(upstream.requests.map((r) => r.url), ['/slow'])
  const events = await s.audit()
  t.match(events.find((e) => e.method === 'DELETE'), { via: 'tunnelled', status: 0, reason: /not sent/, path: '/item' })
})

t.test('what node:http would answer by itself is refused by the sidecar, coded and audited', async (t) => {
  const { upstream, s, host } = await setup(t)
  const table: [string, string, number, string, RegExp][] = [
    ['HTTP/1.1 without Host', `GET http://${host}/ HTTP/1.1\r\n\r\n`, 400, 'LK_BAD_REQUEST', /without a Host/],
    ['an unknown expectation', `GET http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nExpect: something-else\r\n\r\n`, 417, 'LK_EXPECTATION_FAILED', /100-continue/],
    // node:http would take each of these for 100-continue: the other expectation is unmet all the same.
    ['100-continue and an unknown one', `POST http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nExpect: 100-continue, foo\r\nContent-Length: 2\r\n\r\nhi`, 417, 'LK_EXPECTATION_FAILED', /100-continue/],
    ['an unknown one, then 100-continue', `POST http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nExpect: foo,100-continue\r\nContent-Length: 2\r\n\r\nhi`, 417, 'LK_EXPECTATION_FAILED', /100-continue/],
    ['two Expect headers', `POST http://${host}/ HTTP/1.1\r\nHost: ${host}\r\nExpect: 100-continue\r\nExpect: x\r\nContent-Length: 2\r\n\r\nhi`, 417, 'LK_EXPECTATION_FAILED', /100-continue/],
    ['origin-form without Host', `GET /route/x HTTP/1.1\r\n\r\n`, 400, 'LK_BAD_REQUEST', /without a Host/],
  ]
  for (const [name, request, status, code, reason] of table) {
    const auditBefore = (await s.audit()).length
    const r = await rawRequest(s.sidecar.port, request)
    t.equal(r.status, status, name)
    t.equal(r.headers['x-latchkey-error'], code, `${name}: coded`)
    t.match(JSON.parse(r.body).reason, reason, `${name}: says why`)
    t.match((await s.audit()).slice(auditBefore), [{ status, error: code }], `${name}: audited`)
  }
  const http10 = await rawRequest(s.sidecar.port, `GET http://${host}/ HTTP/1.0\r\n\r\n`)
  t.equal(http10.status, 200, 'HTTP/1.0 needs no Host')
  t.equal(upstream.requests.length, 1)
})

t.test('refusals inside a plaintext tunnel are audited as tunnelled', async (t) => {
  const { upstream, s, host } = await setup(t)
  const table: [string, string, number, RegExp][] = [
    ['a nested CONNECT', `CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n`, 400, /CONNECT inside a CONNECT tunnel/],
    ['a malformed request', `GET /x HTTP/1.1\r\nHost: ${host}\r\nBad Header: x\r\n\r\n`, 400, /malformed/],
    ['an unknown expectation', `GET /x HTTP/1.1\r\nHost: ${host}\r\nExpect: nope\r\n\r\n`, 417, /100-continue/],
  ]
  for (const [name, request, status, reason] of table) {
    const auditBefore = (await s.audit()).length
    const raw = await throughTunnel(s.sidecar.port, host, request)
    t.equal(statuses(raw)[0], status, name)
    const events = (await s.audit()).slice(auditBefore)
    t.equal(events.length, 1, `${name}: one event`)
    t.match(events[0], { via: 'tunnelled', status, reason }, `${name}: audited as tunnelled, with the reason`)
  }
  t.equal(upstream.requests.length, 0)
})

t.test('a malformed chunked body after an admitted head: a coded 400, audited, never a hang', async (t) => {
  const { s, host } = await setup(t)
  for (const [name, body] of [
    ['negative chunk size', '-5\r\nhello\r\n0\r\n\r\n'],
    ['hex prefix', '0x5\r\nhello\r\n0\r\n\r\n'],
    ['bare LF', '5\nhello\n0\n\n'],
    ['chunk longer than its size', '3\r\nhello\r\n0\r\n\r\n'],
  ] as const) {
    const auditBefore = (await s.audit()).length
    const started = Date.now()
    const r = await rawRequest(s.sidecar.port, `POST http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n${body}`)
    t.equal(r.status, 400, `${name}: 400`)
    t.match(JSON.parse(r.body), { code: 'LK_BAD_REQUEST', reason: /malformed request body \(HPE_/ }, `${name}: says the body was malformed`)
    t.ok(Date.now() - started < 1000, `${name}: answered at once, not after the fallback close`)
    t.match((await s.audit()).slice(auditBefore), [{ status: 400, error: 'LK_BAD_REQUEST' }], `${name}: audited as the agent's error, not the upstream's`)
  }
})

t.test('calls refused before identification are in the agent trail, under the sidecar agent', async (t) => {
  const { s, host } = await setup(t)
  await rawRequest(s.sidecar.port, `GET http://${host}/x HTTP/1.1\r\nHost: ${host}\r\nHost: again\r\n\r\n`)
  await rawRequest(s.sidecar.port, `GET /x HT TP/1.1\r\n\r\n`)
  const events = await s.audit()
  t.equal(events.length, 2)
  t.ok(events.every((e) => e.agent === s.config.sidecar.agent_id && e.task === null), 'each names this sidecar agent, no task')
})

// A client that pipelines without end and never reads must not have the sidecar parse and hold
// all of it: no client pipelines dozens deep, so past 64 waiting requests the connection is closed.
t.test('a pipelining flood loses its connection instead of the sidecar holding it; other clients are served', async (t) => {
  const { upstream, s, host } = await startSlowCallRig(t, 50)
  const flood = connect(s.sidecar.port, '127.0.0.1')
  await once(flood, 'connect')
  flood.on('error', () => {})
  const closed = new Promise((resolve) => flood.once('close', resolve))
  // Answered at once by the upstream, so responses go out while the flood is read.
  const one = `GET http://${host}/fast HTTP/1.1\r\nHost: ${host}\r\n\r\n`
  const sent = 20_000
  flood.write(one.repeat(sent)) // 1.1 MB, never read
  await closed
  t.pass('the sidecar closed the flooding connection')
  const other = await rawRequest(s.sidecar.port, `GET http://${host}/ok HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`)
  t.equal(other.status, 200, 'another client is served')
  await new Promise((r) => setTimeout(r, 200))
  const flooded = (await s.audit()).filter((e) => e.path === '/fast')
  t.ok(flooded.length < 2_000, `the sidecar took in ${flooded.length} of ${sent} requests, not all of them`)
  t.ok(flooded.length > 64, 'and recorded the ones it read')
  t.ok(upstream.requests.filter((r) => r.url === '/fast').length <= 64, 'of which only the few before the cap were sent')
  t.ok(s.logs.some((l) => l.includes('a client pipelined too many requests')), 'the operator is told')
  t.same(flooded.filter((e) => e.error === 'LK_CLIENT_CLOSED'), [], 'a call cut with the connection is not put down to the agent hanging up')
  t.match(flooded.filter((e) => e.status !== 0 || !/not sent/.test(String(e.reason))).filter((e) => e.error !== null), [{ error: 'LK_BAD_REQUEST', reason: /more than 64 requests pipelined/ }], 'it is recorded as cut for the flood')
})
