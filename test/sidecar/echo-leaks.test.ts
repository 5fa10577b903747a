// Upstreams that echo: the agent must not get its injected credential back through them.
import t from 'tap'
import { startUpstream, startTestSidecar, rawRequest, assertNoCanary, CANARY } from '../helpers/harness.js'

t.test('TRACE/TRACK refused; reflected credentials scrubbed from response headers', async (t) => {
  const echo = await startUpstream({
    handler: (req, res) => {
      const auth = String(req.headers.authorization ?? '')
      res.writeHead(302, { location: `https://elsewhere.example/cb?seen=${encodeURIComponent(auth.slice(7))}`, 'x-debug-auth': auth, 'x-plain': 'kept' }).end()
      return true
    },
  })
  const s = await startTestSidecar({
    policy: { default: 'allow' },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [echo.port] }] },
    credentials: [{ id: 'echo', audience: echo.origin, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    await echo.close()
  })
  const bodies: string[] = []
  for (const method of ['TRACE', 'TRACK']) {
    const r = await rawRequest(s.sidecar.port, `${method} http://127.0.0.1:${echo.port}/ HTTP/1.1\r\nHost: x\r\n\r\n`)
    bodies.push(r.raw)
    t.equal(r.status, 400, method)
    // TRACE reaches the pipeline and is refused by name; Node's parser already rejects TRACK.
    t.match(JSON.parse(r.body).reason, method === 'TRACE' ? /would echo the request/ : /HPE_INVALID_METHOD/)
  }
  t.equal(echo.requests.length, 0, 'no TRACE reached the upstream')

  const r = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${echo.port}/r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  bodies.push(r.raw)
  t.equal(r.status, 302)
  t.equal(echo.requests[0]?.headers.authorization, `Bearer ${CANARY}`, 'the upstream did get the credential')
  t.equal(r.headers.location, '[removed by latchkey: it contained the injected credential]')
  t.equal(r.headers['x-debug-auth'], '[removed by latchkey: it contained the injected credential]')
  t.equal(r.headers['x-plain'], 'kept')
  assertNoCanary(t, s, ...bodies)
})

t.test('a malformed Proxy-Authorization is refused with 407; a missing Host with 400', async (t) => {
  const up = await startUpstream()
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [up.port] }] } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const bad = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Negotiate\r\nConnection: close\r\n\r\n`)
  t.equal(bad.status, 407)
  t.equal(bad.headers['proxy-authenticate'], 'Basic realm="latchkey"')
  t.equal(JSON.parse(bad.body).code, 'LK_PROXY_AUTH')
  const unknown = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic dGFzazo=\r\nConnection: close\r\n\r\n`)
  t.equal(unknown.status, 407, 'a handle of no open task is refused, not ignored')
  t.match(JSON.parse(unknown.body).reason, /no open task/)
  const task = s.sidecar.tasks.open({ purpose: 'test', durationS: 60 })
  const basic = Buffer.from(`task:${task.handle}`).toString('base64')
  const ok = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic ${basic}\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200)
  t.equal(up.requests[0]?.headers['proxy-authorization'], undefined, 'consumed, never forwarded')
  const noHost = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${up.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n`)
  t.equal(noHost.status, 400)
  t.equal(up.requests.length, 1)
})
