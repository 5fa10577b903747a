// `latchkey audit --url` pointed at something that is not a collector's query API (a mistyped
// port, a web server, another JSON service): said so in one line naming the URL, never a
// JSON.parse or TypeError message quoting the other service's body, and never read without end.
import t, { type Test } from 'tap'
import type { ServerResponse } from 'node:http'
import { createServer, type AddressInfo, type Socket } from 'node:net'
import { startUpstream } from '../helpers/harness.js'
import { endlessAnswer } from '../helpers/endless-answer.js'
import { auditInProcess } from '../helpers/audit-cli.js'
import { getJson } from '../../collector/query-client.js'
import { CliError } from '../../collector/cli-error.js'

/** A server answering each request with `answer`, closed at the test's end. */
async function serve(t: Test, answer: (path: string, res: ServerResponse) => void): Promise<string> {
  const server = await startUpstream({
    handler: (req, res) => {
      answer(req.url, res)
      return true
    },
  })
  t.teardown(server.close)
  return server.origin
}

const json = (res: ServerResponse, body: unknown, status = 200) => {
  res.writeHead(status, { 'content-type': 'application/json' })
  res.end(JSON.stringify(body))
}

t.test('a web page is not a collector: said so, naming the URL, the page not quoted', async (t) => {
  const url = await serve(t, (_, res) => {
    res.writeHead(200, { 'content-type': 'text/html' })
    res.end('<!DOCTYPE html><html>SECRET-PAGE</html>')
  })
  for (const args of [['audit', '--agent', 'agent:a:b:c'], ['audit', 'verify']]) {
    const r = await auditInProcess([...args, '--url', url])
    t.same([r.code, r.stderr.trim()], [1, `collector at ${url}: the answer (HTTP 200) is not JSON: not a Latchkey collector's query API; check --url`], args.join(' '))
  }
})

t.test("another service's JSON is not taken for events, agents or a verdict", async (t) => {
  // Each path answers 200 with JSON of its own: no events list, no agents list, no verification.
  const url = await serve(t, (path, res) => json(res, path.startsWith('/v1/verify') ? { ok: 'yes' } : { status: 'ok' }))
  const events = await auditInProcess(['audit', '--agent', 'agent:a:b:c', '--url', url])
  t.same([events.code, events.stderr.trim()], [1, `collector at ${url}: the answer (HTTP 200) holds no events list: not a Latchkey collector's query API; check --url`])
  const pattern = await auditInProcess(['audit', '--agent', 'agent:a:*:*', '--url', url])
  t.same([pattern.code, pattern.stderr.trim()], [1, `collector at ${url}: the answer (HTTP 200) holds no agents list: not a Latchkey collector's query API; check --url`])
  const verify = await auditInProcess(['audit', 'verify', '--url', url])
  t.same([verify.code, verify.stdout, verify.stderr.trim()], [1, '', `collector at ${url}: the answer (HTTP 200) is no verification result: not a Latchkey collector's query API; check --url`], 'no "chain verified" or "broken" line')
})

t.test('an answer without end is read no further than the cap', async (t) => {
  const endless = endlessAnswer(200)
  const url = await serve(t, (_, res) => endless.answer(res))
  const err = await getJson(url, '/v1/events?agent=x', { maxBytes: 1024 * 1024 }).then(
    () => null,
    (e: unknown) => e,
  )
  t.ok(err instanceof CliError, 'a CliError: one line for the operator')
  t.equal((err as Error).message, `collector at ${url}: the answer (HTTP 200) is larger than 1048576 bytes: not a Latchkey collector's query API; check --url`)
  await new Promise((resolve) => setTimeout(resolve, 200))
  const { closedEarly, sent, total } = endless.outcome()
  t.ok(closedEarly, `the client went away before the end (${sent} of ${total} bytes sent)`)
})

t.test('a --url that takes the connection and says nothing fails in seconds; a collector slow to verify is waited for', async (t) => {
  // Reads what it is sent and never answers: a wrong service, a stuck proxy.
  const silent = createServer((socket) => socket.resume())
  const sockets = new Set<Socket>()
  silent.on('connection', (s) => (sockets.add(s), s.on('close', () => sockets.delete(s))))
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const s of sockets) s.destroy()
    silent.close()
  })
  const url = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`
  const started = Date.now()
  const within3s = (asked: Promise<unknown>) => Promise.race([asked.catch((e: unknown) => e), new Promise((r) => setTimeout(() => r('still waiting after 3 s'), 3000).unref())])
  const err = await within3s(getJson(url, '/v1/verify', { silentPeerMs: 300 }))
  t.ok(err instanceof CliError, `a CliError, after ${Date.now() - started} ms`)
  t.equal((err as Error).message, `collector at ${url}: no answer to GET /healthz within 0.3 s (headers timeout; the connection was taken, nothing was said); check --url`)

  // A collector answers /healthz at once and sends a verify's head only with its verdict.
  const verdict = { ok: true, sidecars: 1, checked: 5, breaks: [] }
  const slow = await serve(t, (path, res) => (path === '/healthz' ? json(res, { ok: true, store: 'postgres' }) : void setTimeout(() => json(res, verdict), 800)))
  t.same((await getJson(slow, '/v1/verify', { silentPeerMs: 300 })).body, verdict, 'a verify answered after longer than the wait for /healthz is read')

  // A head, then a body that stops part-way.
  const stalled = await serve(t, (path, res) => {
    if (path === '/healthz') return json(res, { ok: true, store: 'sqlite' })
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write('{"ok":')
  })
  const cut = await within3s(getJson(stalled, '/v1/verify', { silentPeerMs: 300, stallMs: 300 }))
  t.equal((cut as Error).message, `collector at ${stalled}: the answer to GET /v1/verify stopped for 0.3 s part-way (body timeout); check --url`)
})
