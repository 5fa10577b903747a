// Every spelling of an internal address, through the real sidecar, with a policy that allows
// everything: the network floor alone must refuse them, and nothing reaches the listening upstream.
import t from 'tap'
import { createServer } from 'node:http'
import { networkInterfaces } from 'node:os'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { startUpstream, startTestSidecar, rawRequest, insideTunnel } from '../helpers/harness.js'

t.test('internal addresses are refused whatever their spelling', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({ policy: { default: 'allow' }, routes: { loop: upstream.origin } })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const p = upstream.port
  const absolute = [
    `127.0.0.1:${p}`,
    `2130706433:${p}`,
    `0x7f000001:${p}`,
    `0x7f.1:${p}`,
    `0177.0.0.1:${p}`,
    `0177.1:${p}`,
    `127.1:${p}`,
    `127.0.1:${p}`,
    `%31%32%37.0.0.1:${p}`,
    `localhost:${p}`,
    `LOCALHOST.:${p}`,
    `anything.localhost:${p}`,
    `[::1]:${p}`,
    `[0:0:0:0:0:0:0:1]:${p}`,
    `[::ffff:127.0.0.1]:${p}`,
    `[::ffff:7f00:1]:${p}`,
    `[::127.0.0.1]:${p}`,
    `[64:ff9b::127.0.0.1]:${p}`,
    `[2002:7f00:1::]:${p}`,
    '169.254.169.254',
    '2852039166',
    '0xa9.0xfe.0xa9.0xfe',
    '[::ffff:169.254.169.254]',
    '[fd00:ec2::254]',
    '169.254.170.2',
    '100.100.100.200',
    '168.63.129.16',
    '[::ffff:a83f:8110]',
    '10.0.0.1',
    '012.0.0.1',
    '172.16.0.1',
    '192.168.1.1',
    '100.64.0.1',
    '0.0.0.0',
    '0',
    '[::]',
    '224.0.0.1',
    '255.255.255.255',
    '[fe80::1]',
    '[fc00::1]',
    '240.0.0.1',
  ]
  for (const authority of absolute) {
    const res = await rawRequest(s.sidecar.port, `GET http://${authority}/latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    t.equal(res.status, 403, `${authority}: 403`)
    t.match(res.headers['x-latchkey-rule'], /^network:/, `${authority}: refused by the network floor`)
    const body = JSON.parse(res.body || '{}') as { error?: string; retryable?: boolean; rule?: string }
    t.same([body.error, body.retryable, body.rule], ['denied', false, res.headers['x-latchkey-rule']], `${authority}: structured denial`)
  }
  for (const authority of [`127.0.0.1:${p}`, `localhost:${p}`, `2130706433:${p}`, `[::1]:${p}`, `0x7f.1:${p}`]) {
    const res = await rawRequest(s.sidecar.port, `CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\n`)
    t.equal(res.status, 403, `CONNECT ${authority}: 403`)
    t.match(res.headers['x-latchkey-rule'], /^network:/)
  }
  // Port 80: the tunnel opens undialled and the plain HTTP inside gets the network floor's 403.
  for (const authority of ['169.254.169.254:80', '[::ffff:a9fe:a9fe]:80', '0xa9fea9fe:80']) {
    const raw = await rawRequest(s.sidecar.port, `CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\nGET /latest/meta-data/ HTTP/1.1\r\nHost: ${authority}\r\nConnection: close\r\n\r\n`)
    t.equal(raw.status, 200, `CONNECT ${authority}: opened, undialled`)
    const inner = insideTunnel(raw)
    t.equal(inner.status, 403, `CONNECT ${authority}: the request inside is refused`)
    t.match(inner.headers['x-latchkey-rule'], /^network:/, `CONNECT ${authority}: by the network floor`)
  }
  const viaRoute = await rawRequest(s.sidecar.port, `GET /loop/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  t.equal(viaRoute.status, 403, 'a reverse route to a denied address is refused too')
  t.equal(upstream.requests.length, 0, 'the listening loopback upstream never saw a request')
  const audit = await s.audit()
  t.ok(audit.length >= absolute.length + 7 && audit.every((e) => e.decision === 'deny' || (e.rule as string).startsWith('network:')), 'each refusal audited')
})

t.test('an allow exception opens exactly its range and ports', async (t) => {
  const upstream = await startUpstream()
  const other = await startUpstream()
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] } })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
    await other.close()
  })
  const ok = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200)
  const okMapped = await rawRequest(s.sidecar.port, `GET http://2130706433:${upstream.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(okMapped.status, 200, 'the same address spelled differently is the same address')
  const wrongPort = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${other.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(wrongPort.status, 403)
  t.equal(other.requests.length, 0)
})

t.test("an allow covering loopback never opens the sidecar's own ports: its admin API is served as itself, nothing dialled, and other spellings are refused", async (t) => {
  const upstream = await startUpstream()
  // The loosest allow an operator might write for a local upstream: all of loopback, any port.
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.0/8' }, { cidr: '::1/128' }] } })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const ok = await rawRequest(s.sidecar.port, `GET http://127.0.0.1:${upstream.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200, 'the allow opens an upstream on loopback')
  const admin = s.sidecar.adminPort
  const listen = s.sidecar.port
  // The admin API by a name it answers to: an agent with HTTP_PROXY set calling it (task-api.test.ts).
  for (const target of [`http://127.0.0.1:${admin}/metrics`, `http://2130706433:${admin}/metrics`, `http://localhost:${admin}/metrics`]) {
    const r = await rawRequest(listen, `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1:${admin}\r\nConnection: close\r\n\r\n`)
    t.equal(r.status, 200, `${target}: the admin API answers`)
    t.match(r.body, /latchkey_calls_total/, `${target}: itself`)
  }
  for (const target of [
    `http://127.0.0.2:${admin}/v1/tasks`,
    `http://[::ffff:127.0.0.1]:${admin}/healthz`,
    `https://127.0.0.1:${admin}/healthz`,
    `http://[::ffff:127.0.0.1]:${listen}/x`,
    `http://127.0.0.2:${listen}/x`,
    `https://127.0.0.1:${listen}/x`,
  ]) {
    const r = await rawRequest(listen, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    t.equal(r.status, 403, `${target}: refused`)
    t.equal(r.headers['x-latchkey-rule'], 'network:self', `${target}: as the sidecar's own port`)
  }
  const tunnel = await rawRequest(listen, `CONNECT 127.0.0.2:${admin} HTTP/1.1\r\nHost: 127.0.0.2:${admin}\r\n\r\n`)
  t.equal(tunnel.headers['x-latchkey-rule'], 'network:self', 'a tunnel to the admin port by another spelling too')
  const adminTunnel = await rawRequest(listen, `CONNECT 127.0.0.1:${admin} HTTP/1.1\r\nHost: 127.0.0.1:${admin}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1:${admin}\r\nConnection: close\r\n\r\n`)
  t.match(adminTunnel.raw, /^HTTP\/1\.1 200 Connection Established\r\n\r\nHTTP\/1\.1 200 OK\r\n[^]*\{"ok":true\}/, 'a tunnel to the admin API by its name is the admin API')
  t.equal(upstream.requests.length, 1)
  t.same((await s.audit()).map((e) => e.status).filter((x) => x === 200).length, 1, 'none of the admin calls is audited: no egress')
})

t.test("an address of the sidecar's own host is loopback to it, whatever its class", async (t) => {
  const hostAddress = Object.values(networkInterfaces())
    .flat()
    .find((i) => i && i.family === 'IPv4' && !i.internal)?.address
  if (!hostAddress) return t.pass('this machine has no non-loopback IPv4 interface: nothing to check')
  // A service listening on every address of the host, as many do.
  const service = createServer((_req, res) => res.end('internal'))
  service.listen(0, '0.0.0.0')
  await once(service, 'listening')
  const port = (service.address() as AddressInfo).port
  t.teardown(() => service.close())
  // Only loopback denied: the host address's own class (private, documentation, public) is not.
  const s = await startTestSidecar({ policy: { default: 'allow' }, network: { deny: ['loopback'] } })
  t.teardown(() => s.close())
  const r = await rawRequest(s.sidecar.port, `GET http://${hostAddress}:${port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(r.status, 403, `${hostAddress} (this host) is refused`)
  t.equal(r.headers['x-latchkey-rule'], 'network:loopback')
  t.match(JSON.parse(r.body).reason, /address of the sidecar's own host/)
  // So is every IPv6 address carrying it (a NAT64 network takes the first to it): they were judged
  // by the embedded address's class alone, allowed here, and dialled.
  const [a, b, c, d] = hostAddress.split('.').map(Number) as [number, number, number, number]
  const hex = `${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`
  for (const carrier of [`[64:ff9b::${hostAddress}]`, `[::ffff:0:${hostAddress}]`, `[::${hostAddress}]`, `[2002:${hex}::1]`, `[::ffff:${hostAddress}]`]) {
    const viaV6 = await rawRequest(s.sidecar.port, `GET http://${carrier}:${port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    t.equal(viaV6.status, 403, `${carrier} carries this host's address: refused`)
    t.equal(viaV6.headers['x-latchkey-rule'], 'network:loopback', `${carrier}: as this host`)
    t.match(JSON.parse(viaV6.body).reason, carrier === `[::ffff:${hostAddress}]` ? /is an address of the sidecar's own host/ : /is an IPv6 address carrying an address of the sidecar's own host/, `${carrier}: saying so`)
  }
  // An operator's explicit exception still opens it.
  const opened = await startTestSidecar({ policy: { default: 'allow' }, network: { deny: ['loopback'], allow: [{ cidr: `${hostAddress}/32`, ports: [port] }] } })
  t.teardown(() => opened.close())
  const ok = await rawRequest(opened.sidecar.port, `GET http://${hostAddress}:${port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  t.equal(ok.status, 200, 'unless network.allow names it')
})

t.test('a policy deny written by address holds every name that resolves into it', async (t) => {
  const upstream = await startUpstream()
  const s = await startTestSidecar({
    policy: { default: 'allow', rules: [{ id: 'no-admin-on-loopback', action: 'deny', cidrs: ['127.0.0.0/8'], paths: ['/admin/**'] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [upstream.port] }] },
  })
  t.teardown(async () => {
    await s.close()
    await upstream.close()
  })
  const get = (host: string, path: string) => rawRequest(s.sidecar.port, `GET http://${host}:${upstream.port}${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  for (const host of ['127.0.0.1', 'localhost', 'LOCALHOST.', 'app.localhost']) {
    const r = await get(host, '/admin/x')
    t.equal(r.status, 403, `${host}: the deny holds`)
    t.equal(r.headers['x-latchkey-rule'], 'no-admin-on-loopback')
  }
  t.equal((await get('localhost', '/ok')).status, 200, 'and keeps its path condition')
  t.same(upstream.requests.map((r) => r.url), ['/ok'], 'no /admin request reached the upstream')
  t.match((await s.audit()).filter((e) => e.status === 403), [{ host: '127.0.0.1' }, { host: 'localhost', address: '127.0.0.1', rule: 'no-admin-on-loopback' }, {}, {}])
})

t.test('a proxy open to remote clients never serves its loopback admin API: a forwarder makes remote callers loopback ones', async (t) => {
  const hostAddress = Object.values(networkInterfaces())
    .flat()
    .find((i) => i && i.family === 'IPv4' && !i.internal)?.address
  if (!hostAddress) return t.pass('this machine has no non-loopback IPv4 interface: nothing to check')
  const s = await startTestSidecar({ sidecar: { listen: { host: '0.0.0.0', port: 0 }, allow_remote_clients: true }, policy: { default: 'allow' }, network: { allow: [{ cidr: '127.0.0.0/8' }] } })
  t.teardown(() => s.close())
  const { connect } = await import('node:net')
  const ask = async (from: string) => {
    const socket = connect({ host: from, port: s.sidecar.port })
    await once(socket, 'connect')
    socket.end(`GET http://127.0.0.1:${s.sidecar.adminPort}/healthz HTTP/1.1\r\nHost: 127.0.0.1:${s.sidecar.adminPort}\r\nConnection: close\r\n\r\n`)
    let got = ''
    socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
    await once(socket, 'close')
    return got
  }
  // Istio's inbound passthrough connects from 127.0.0.6 for a remote caller: a loopback peer proves nothing here.
  for (const from of ['127.0.0.1', hostAddress]) {
    const answer = await ask(from)
    t.match(answer, /^HTTP\/1\.1 403 /, `a client on ${from} does not reach it`)
    t.match(answer, /x-latchkey-rule: network:self/i)
  }
})
