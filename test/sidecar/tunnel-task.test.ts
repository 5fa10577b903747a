// A plaintext CONNECT tunnel runs in the task its CONNECT named. A request inside it naming
// another proxy credential (another task's handle, or one where the CONNECT named none) is
// refused: it ran, silently, in the tunnel's task, with that task's token and scopes.
import t from 'tap'
import { startBearerRig, rawRequest, parseRawResponse, assertNoCanary, openTask } from '../helpers/harness.js'

t.test("a request inside a tunnel runs in the tunnel's task, or not at all", async (t) => {
  const { upstream, s, host } = await startBearerRig(t)
  const [{ proxyAuthorization: aAuth, id: aId }, { proxyAuthorization: bAuth }] = [await openTask(s, 'a'), await openTask(s, 'b')]
  const a = { auth: aAuth, id: aId }
  const b = { auth: bAuth }
  const header = (auth: string | null) => (auth ? `Proxy-Authorization: ${auth}\r\n` : '')
  /** The answer to `GET /<path>` sent inside a tunnel opened with `outer`, itself naming `inner`. */
  const inTunnel = async (outer: string | null, inner: string | null, path: string) => {
    const r = await rawRequest(s.sidecar.port, `CONNECT ${host} HTTP/1.1\r\nHost: ${host}\r\n${header(outer)}\r\nGET /${path} HTTP/1.1\r\nHost: ${host}\r\n${header(inner)}Connection: close\r\n\r\n`)
    t.equal(r.status, 200, `${path}: the tunnel opened`)
    const after = r.raw.indexOf('\r\n\r\n') + 4
    return { raw: r.raw, inner: parseRawResponse(r.raw.slice(after)) }
  }
  const seen: string[] = []
  const sent = () => upstream.requests.length

  let before = sent()
  const otherTask = await inTunnel(a.auth, b.auth, 'a-names-b')
  seen.push(otherTask.raw)
  t.equal(otherTask.inner.status, 400, "another task's handle inside A's tunnel is refused")
  t.match(JSON.parse(otherTask.inner.body), { code: 'LK_BAD_REQUEST', reason: /names another proxy credential than the CONNECT did/ })
  t.equal(sent(), before, 'and nothing was sent upstream')

  before = sent()
  const intoDefault = await inTunnel(null, a.auth, 'none-names-a')
  seen.push(intoDefault.raw)
  t.equal(intoDefault.inner.status, 400, "a task's handle inside a tunnel opened without one is refused")
  t.equal(sent(), before, 'and nothing was sent upstream')

  const same = await inTunnel(a.auth, a.auth, 'a-names-a')
  seen.push(same.raw)
  t.equal(same.inner.status, 200, 'the same credential again is the same task')
  const plain = await inTunnel(a.auth, null, 'a-names-none')
  seen.push(plain.raw)
  t.equal(plain.inner.status, 200, "a request naming none runs in the tunnel's task")

  // Both went upstream with the credential, recorded under task A.
  const events = await s.audit(4)
  for (const path of ['/a-names-a', '/a-names-none']) t.match(events.find((e) => e.path === path), { task: a.id, status: 200 }, `${path} is recorded in task A`)
  t.match(events.find((e) => e.path === '/a-names-b'), { status: 400 }, 'the refusal is recorded')
  assertNoCanary(t, s, ...seen)
})
