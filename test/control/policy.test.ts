// Policy bundles: from the broker over the control stream, and from a standalone sidecar's policy
// file (atomic rename, ConfigMap symlink swap, SIGHUP). Always validate-then-swap: a bad bundle is
// rejected whole, the policy in force kept, the reason reported.
import t from 'tap'
import { mkdtempSync, writeFileSync, renameSync, symlinkSync, mkdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { startApi, startControlBroker, startControlSidecar, viaProxy, openStream, until } from './rig.js'
import { startTestSidecar, startTcpUpstream, openTunnel } from '../helpers/harness.js'
import { createServer as createNetServer, connect, type Socket, type AddressInfo } from 'node:net'
import { createServer as createHttpServer, type IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'
import { once } from 'node:events'
import { createHash } from 'node:crypto'
import { serverFrame } from '../helpers/websocket-frames.js'
import { clientHello } from '../helpers/client-hello.js'

const bundle = (port: number, extra: object[] = []) => ({
  mode: 'enforce',
  default: 'deny',
  rules: [{ id: 'no-admin', action: 'deny', paths: ['/admin/**'] }, ...extra, { id: 'api', action: 'allow', hosts: ['127.0.0.1'], ports: [port] }],
})

function atomicWrite(file: string, text: string): void {
  const tmp = `${file}.tmp-${process.hrtime.bigint()}`
  writeFileSync(tmp, text)
  renameSync(tmp, file)
}

t.test('bundles from the broker: applied on connect and on change; bad ones rejected at the broker, widening recorded', async (t) => {
  const api = await startApi()
  t.teardown(api.close)
  const dir = mkdtempSync(join(tmpdir(), 'lk-policy-'))
  const policyFile = join(dir, 'policy.yaml')
  writeFileSync(policyFile, stringify(bundle(api.port)))
  const broker = await startControlBroker({ control: { policy_file: policyFile, max_bundle_bytes: 4096 } })
  t.teardown(() => broker.close())
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:pol')
  t.teardown(s.close)
  const brokerVersion = () => broker.broker.policy!.current!.bundle.version
  await until('bundle applied', () => s.sidecar.policy.version === brokerVersion())
  t.match(brokerVersion(), /^sha256:[0-9a-f]{16}$/)
  const task = await s.openTask()
  t.equal((await viaProxy(s, task.handle, `${api.origin}/ok`)).status, 200)
  t.match(await viaProxy(s, task.handle, `${api.origin}/admin/users`), { status: 403, body: { code: 'LK_POLICY_DENIED', rule: 'no-admin' } }, 'the pushed bundle is enforced')

  // A stream admitted under this bundle is not cut when the next bundle would deny it: swaps happen between requests.
  const stream = await openStream(s, task.handle, `${api.origin}/stream/long`)
  t.equal(stream.status, 200)

  // A widening change: a new allow rule. Recorded as policy.widened; reaches the sidecar.
  const v1 = brokerVersion()
  atomicWrite(policyFile, stringify(bundle(api.port, [{ id: 'stream-deny', action: 'deny', paths: ['/stream/**'] }, { id: 'wide', action: 'allow', hosts: ['*.example.com'] }])))
  await until('new bundle at the sidecar', () => s.sidecar.policy.version !== v1 && s.sidecar.policy.version === brokerVersion())
  const widened = broker.events.find((e) => e.type === 'policy.widened')
  t.match(widened, { type: 'policy.widened', agent_type: '*', audience: '(sidecar policy)', added: ['allow rule wide'] }, 'scope widening recorded as an event')
  // The sidecar says so too: the first bundle, replacing its start-up policy, at info; this one at warn.
  const swaps = s.logs.flatMap((l) => l.split('\n')).filter((l) => l.includes('"msg":"policy swapped')).map((l) => JSON.parse(l) as Record<string, unknown>)
  t.match(swaps, [{ level: 30, source: 'control', previous: 'config' }, { level: 40, source: 'control', widened: ['allow rule wide'] }])
  const before = stream.chunks()
  await until('stream still flowing after the swap', () => stream.chunks() > before + 2)
  t.match(await viaProxy(s, task.handle, `${api.origin}/stream/new`), { status: 403, body: { rule: 'stream-deny' } }, 'new requests see the new bundle')

  // Malformed, then oversized: rejected at the broker with the reason; the sidecar keeps what it has.
  const v2 = brokerVersion()
  atomicWrite(policyFile, 'rules: [ {id: broken\n')
  await until('malformed rejected', () => broker.events.some((e) => e.type === 'policy.rejected'))
  t.match(broker.events.filter((e) => e.type === 'policy.rejected').at(-1), { reason: /not valid YAML/ })
  atomicWrite(policyFile, stringify(bundle(api.port, Array.from({ length: 200 }, (_, i) => ({ id: `r${i}`, action: 'deny', paths: [`/p${i}/**`] })))))
  await until('oversized rejected', () => broker.events.filter((e) => e.type === 'policy.rejected').length >= 2)
  t.match(broker.events.filter((e) => e.type === 'policy.rejected').at(-1), { reason: /over the limit of 4096/ })
  atomicWrite(policyFile, stringify({ rules: [{ id: 'dup', action: 'allow' }, { id: 'dup', action: 'deny' }] }))
  await until('invalid rejected', () => broker.events.filter((e) => e.type === 'policy.rejected').length >= 3)
  t.match(broker.events.filter((e) => e.type === 'policy.rejected').at(-1), { reason: /duplicate rule id "dup"/ })
  // Saved as Latin-1: read leniently, the é would be U+FFFD and this deny would never match.
  atomicWrite(policyFile, '')
  writeFileSync(policyFile, Buffer.concat([Buffer.from('rules:\n  - { id: cafe, action: deny, paths: ["/caf'), Buffer.from([0xe9]), Buffer.from('/**"] }\n')]))
  await until('not-UTF-8 rejected', () => broker.events.filter((e) => e.type === 'policy.rejected').length >= 4)
  t.match(broker.events.filter((e) => e.type === 'policy.rejected').at(-1), { reason: `${policyFile}: line 2: not valid UTF-8 (save the file as UTF-8)` })
  t.equal(brokerVersion(), v2, 'the broker keeps the last good bundle')
  t.equal(s.sidecar.policy.version, v2, 'and so does the sidecar')
  t.equal((await viaProxy(s, task.handle, `${api.origin}/ok`)).status, 200)
})

t.test('a bad bundle reaching a sidecar is rejected whole: old policy kept, reason on the sidecar', async (t) => {
  const api = await startApi()
  t.teardown(api.close)
  const broker = await startControlBroker()
  t.teardown(() => broker.close())
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:bad')
  t.teardown(s.close)
  const task = await s.openTask()
  const v0 = s.sidecar.policy.version
  // What the control client does with a pushed bundle (broker-side validation stops these earlier, so it is offered here directly).
  const bad = [
    ['not json', '{"rules": [', /not valid YAML/],
    ['wrong shape', JSON.stringify({ rules: [{ id: 'x', action: 'maybe' }] }), /rules\[0\]\.action/],
    ['unknown key', JSON.stringify({ rules: [], defualt: 'allow' }), /unknown key "defualt"|defualt/],
    ['oversized', JSON.stringify({ rules: [{ id: 'big', action: 'deny', paths: ['/' + 'x'.repeat(300_000)] }] }), /over the limit/],
    ['bad cidr', JSON.stringify({ rules: [{ id: 'c', action: 'deny', cidrs: ['10.0.0.0/99'] }] }), /not a CIDR/],
  ] as const
  for (const [what, doc, reason] of bad) {
    const r = s.sidecar.policy.offer(doc, 'control', `policy bundle ${what}`, `v-${what}`)
    t.notOk(r.ok, `${what}: rejected`)
    t.match(s.sidecar.policy.rejected, { source: 'control', reason }, `${what}: the reason says what is wrong`)
    t.equal(s.sidecar.policy.version, v0, `${what}: old policy kept`)
  }
  t.equal((await viaProxy(s, task.handle, `${api.origin}/ok`)).status, 200, 'the old policy still decides')
  const metrics = await (await fetch(`${s.sidecar.adminUrl}/metrics`)).text()
  t.match(metrics, /latchkey_policy_bundles_total\{source="control",outcome="rejected"\} 5/)
})

t.test('standalone sidecar: policy file reloaded on atomic rename, ConfigMap symlink swap and SIGHUP; bad files rejected', async (t) => {
  const api = await startApi()
  t.teardown(api.close)
  // ConfigMap layout: dir/policy.yaml → ..data/policy.yaml, ..data → ..<timestamp>
  const dir = mkdtempSync(join(tmpdir(), 'lk-cm-'))
  const gen = (name: string, body: object) => {
    mkdirSync(join(dir, name))
    writeFileSync(join(dir, name, 'policy.yaml'), stringify(body))
  }
  gen('..v1', bundle(api.port))
  symlinkSync('..v1', join(dir, '..data'))
  symlinkSync('..data/policy.yaml', join(dir, 'policy.yaml'))
  const s = await startTestSidecar(
    { network: { allow: [{ cidr: '127.0.0.1/32', ports: [api.port] }] }, policy: { default: 'allow', rules: [] }, sidecar: { policy_file: join(dir, 'policy.yaml') } },
    {},
    { reloadOnSighup: true },
  )
  t.teardown(s.close)
  const get = (path: string) => rawGet(s.proxy, `${api.origin}${path}`)
  t.equal(await get('/admin/x'), 403, 'the policy file, not the config\'s policy, is in force')
  const v1 = s.sidecar.policy.version

  // ConfigMap swap: new timestamped dir, ..data re-pointed by an atomic rename of a new symlink.
  gen('..v2', bundle(api.port, [{ id: 'no-x', action: 'deny', paths: ['/x/**'] }]))
  symlinkSync('..v2', join(dir, '..data_tmp'))
  renameSync(join(dir, '..data_tmp'), join(dir, '..data'))
  await until('configmap swap applied', () => s.sidecar.policy.version !== v1)
  t.equal(await get('/x/1'), 403)
  const v2 = s.sidecar.policy.version

  // A bad file is rejected whole; the policy in force stays.
  gen('..v3', { rules: [{ id: 'y', action: 'deny', paths: ['no-slash'] }] })
  symlinkSync('..v3', join(dir, '..data_tmp'))
  renameSync(join(dir, '..data_tmp'), join(dir, '..data'))
  await until('bad file rejected', () => s.sidecar.policy.rejected !== null)
  t.match(s.sidecar.policy.rejected, { source: 'file', reason: /paths\[0\]/ })
  t.equal(s.sidecar.policy.version, v2)
  t.equal(await get('/x/1'), 403, 'still the last good policy')

  // Atomic rename of a plain file over the symlink, then SIGHUP with the watcher's work already done.
  const plain = join(dir, 'policy.yaml')
  rmSync(join(dir, '..v3'), { recursive: true })
  atomicWrite(plain, stringify(bundle(api.port, [{ id: 'no-z', action: 'deny', paths: ['/z/**'] }])))
  await until('atomic rename applied', () => s.sidecar.policy.version !== v2)
  t.equal(await get('/z/1'), 403)
  t.equal(await get('/x/1'), 200, 'the old rule is gone')
})

t.test('policy_watch: false reloads on SIGHUP only', async (t) => {
  const api = await startApi()
  t.teardown(api.close)
  const dir = mkdtempSync(join(tmpdir(), 'lk-hup-'))
  const file = join(dir, 'policy.yaml')
  writeFileSync(file, stringify(bundle(api.port)))
  const s = await startTestSidecar(
    { network: { allow: [{ cidr: '127.0.0.1/32', ports: [api.port] }] }, sidecar: { policy_file: file, policy_watch: false } },
    {},
    { reloadOnSighup: true },
  )
  t.teardown(s.close)
  const v0 = s.sidecar.policy.version
  atomicWrite(file, stringify(bundle(api.port, [{ id: 'no-q', action: 'deny', paths: ['/q/**'] }])))
  await new Promise((r) => setTimeout(r, 300))
  t.equal(s.sidecar.policy.version, v0, 'not watched: nothing changes before the signal')
  t.equal(await rawGet(s.proxy, `${api.origin}/q/1`), 200)
  process.kill(process.pid, 'SIGHUP')
  await until('SIGHUP reload', () => s.sidecar.policy.version !== v0)
  t.equal(await rawGet(s.proxy, `${api.origin}/q/1`), 403)
  const acknowledged = () => s.logs.flatMap((l) => l.split('\n')).filter((l) => l.includes('SIGHUP: the audit file opened anew')).map((l) => JSON.parse(l) as Record<string, unknown>)
  t.match(acknowledged(), [{ level: 30, policy_file: file, policy_version: s.sidecar.policy.version, policy_reload: 'read' }], 'the signal is acknowledged, with what the policy file gave')
  // A bad file at SIGHUP: rejected, kept.
  const v1 = s.sidecar.policy.version
  atomicWrite(file, 'rules: 7\n')
  process.kill(process.pid, 'SIGHUP')
  await until('rejected', () => s.sidecar.policy.rejected !== null)
  t.match(s.sidecar.policy.rejected, { source: 'file', reason: /rules/ })
  t.equal(s.sidecar.policy.version, v1)
  t.match(acknowledged()[1], { policy_version: v1, policy_reload: /rules/ }, 'a rejected file is said in the acknowledgement too')
  // A swap that lets more through is a warning naming how; the narrowing one above was not.
  const swaps = () => s.logs.flatMap((l) => l.split('\n')).filter((l) => l.includes('"msg":"policy swapped')).map((l) => JSON.parse(l) as Record<string, unknown>)
  t.match(swaps(), [{ level: 30, msg: 'policy swapped', mode: 'enforce', default: 'deny' }])
  atomicWrite(file, stringify({ default: 'allow', rules: [] }))
  process.kill(process.pid, 'SIGHUP')
  await until('widening swap', () => s.sidecar.policy.version !== v1)
  t.match(swaps()[1], { level: 40, msg: 'policy swapped: it lets more through', default: 'allow', widened: ['default: deny→allow', 'deny rule no-admin removed', 'deny rule no-q removed'] })
})

t.test('a policy file whose directory is removed and made again, or renamed over, is still watched; one not in UTF-8 is refused', async (t) => {
  const api = await startApi()
  t.teardown(api.close)
  const dir = mkdtempSync(join(tmpdir(), 'lk-policy-dir-'))
  const policyDir = join(dir, 'policy')
  const file = join(policyDir, 'policy.yaml')
  mkdirSync(policyDir)
  writeFileSync(file, stringify(bundle(api.port)))
  const s = await startTestSidecar({ network: { allow: [{ cidr: '127.0.0.1/32', ports: [api.port] }] }, sidecar: { policy_file: file } })
  t.teardown(s.close)
  const get = (path: string) => rawGet(s.proxy, `${api.origin}${path}`)
  const deny = (id: string) => stringify(bundle(api.port, [{ id, action: 'deny', paths: [`/${id}/**`] }]))
  const applied = async (what: string, id: string) => {
    const before = s.sidecar.policy.version
    await until(what, () => s.sidecar.policy.version !== before)
    t.equal(await get(`/${id}/1`), 403, what)
  }
  t.equal(await get('/a/1'), 200)

  // The directory removed and made again (a volume remounted, a hand-run `rm -r; mkdir`): the
  // watch died with it, and every later change went unseen, with nothing logged.
  rmSync(policyDir, { recursive: true })
  await new Promise((r) => setTimeout(r, 100))
  mkdirSync(policyDir)
  writeFileSync(file, deny('a'))
  await applied('the file in the directory made again', 'a')
  atomicWrite(file, deny('b'))
  await applied('a later edit there', 'b')

  // A new directory renamed into the old one's place (a deploy tool's swap).
  mkdirSync(`${policyDir}.new`)
  writeFileSync(join(`${policyDir}.new`, 'policy.yaml'), deny('c'))
  renameSync(policyDir, `${policyDir}.old`)
  renameSync(`${policyDir}.new`, policyDir)
  await applied('the directory renamed over', 'c')
  writeFileSync(file, deny('d'))
  await applied('an edit in place in the new directory', 'd')

  // Saved as Latin-1: read leniently, the deny rule for /café/ would load and never match.
  const v = s.sidecar.policy.version
  atomicWrite(file, '')
  writeFileSync(file, Buffer.from(`default: allow\nrules:\n  - { id: cafe, action: deny, paths: ["/caf\u00e9/**"] }\n`, 'latin1'))
  await until('refused', () => s.sidecar.policy.rejected !== null && s.sidecar.policy.rejected.reason.includes('UTF-8'))
  t.match(s.sidecar.policy.rejected, { source: 'file', reason: `${file}: line 3: not valid UTF-8 (save the file as UTF-8)` })
  t.equal(s.sidecar.policy.version, v, 'the policy in force is kept')
  t.equal(await get('/d/1'), 403, 'and still enforced')
})

async function rawGet(proxy: string, url: string): Promise<number> {
  const { request } = await import('node:http')
  const p = new URL(proxy)
  return new Promise((resolve, reject) => {
    const req = request({ host: p.hostname, port: p.port, path: url, agent: false, headers: { host: new URL(url).host } }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? 0))
    })
    req.on('error', reject)
    req.end()
  })
}

/** A sidecar whose policy file allows 127.0.0.1 on `ports`; `allowOnly` rewrites it to allow those given, and waits until it applies. */
async function sidecarOnPolicyFile(t: { teardown(fn: () => unknown): void }, ports: number[]) {
  const policyOf = (allowed: number[]) => ({ mode: 'enforce', default: 'deny', rules: [{ id: 'up', action: 'allow', hosts: ['127.0.0.1'], ports: allowed }] })
  const policyFile = join(mkdtempSync(join(tmpdir(), 'lk-relay-policy-')), 'policy.yaml')
  writeFileSync(policyFile, stringify(policyOf(ports)))
  const s = await startTestSidecar({ network: { allow: [{ cidr: '127.0.0.1/32', ports }] }, policy: { default: 'deny', rules: [] }, sidecar: { policy_file: policyFile } })
  t.teardown(s.close)
  const allowOnly = async (allowed: number[]) => {
    const before = s.sidecar.policy.version
    atomicWrite(policyFile, stringify(policyOf(allowed)))
    await until('new policy applied', () => s.sidecar.policy.version !== before)
  }
  return { s, allowOnly }
}

/** A WebSocket upstream: `onUpgrade` gets each handshake's socket and what answers it 101. */
async function webSocketUpstream(t: { teardown(fn: () => unknown): void }, onUpgrade: (socket: Duplex, answer101: () => void) => void): Promise<number> {
  const ws = createHttpServer((_req, res) => res.writeHead(426).end())
  ws.on('upgrade', (req: IncomingMessage, socket: Duplex) => {
    socket.on('error', () => {})
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
    onUpgrade(socket, () => socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`))
  })
  ws.listen(0, '127.0.0.1')
  await once(ws, 'listening')
  t.teardown(() => {
    ws.closeAllConnections()
    ws.close()
  })
  return (ws.address() as AddressInfo).port
}

t.test('a new policy cuts the open TLS tunnels and WebSockets it denies; relays it still allows stay open', async (t) => {
  // Echo upstreams: two for tunnels (one stays allowed), one answering WebSocket handshakes.
  const upstreams: Socket[] = []
  const echo = () => {
    const srv = createNetServer((s) => {
      upstreams.push(s)
      s.on('error', () => {})
      s.on('data', (d: Buffer) => s.write(d))
    })
    srv.listen(0, '127.0.0.1')
    t.teardown(() => {
      for (const s of upstreams) s.destroy()
      srv.close()
    })
    return once(srv, 'listening').then(() => (srv.address() as AddressInfo).port)
  }
  const denied = await echo()
  const kept = await echo()
  const wsPort = await webSocketUpstream(t, (socket, answer101) => {
    answer101()
    socket.on('data', (d: Buffer) => socket.write(serverFrame(d)))
  })
  const { s, allowOnly } = await sidecarOnPolicyFile(t, [denied, kept, wsPort])

  /** A relay through the sidecar, open once `opening` is answered with `status`; echoes `probe`. */
  const relay = async (opening: string, status: number) => {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    let got = Buffer.alloc(0)
    sock.on('data', (d: Buffer) => (got = Buffer.concat([got, d])))
    sock.write(opening)
    await until('relay opened', () => got.includes('\r\n\r\n'))
    t.match(got.toString('latin1'), new RegExp(`^HTTP/1\\.1 ${status} `))
    const closed = once(sock, 'close').then(() => true)
    // A TLS-looking first byte: the tunnel is an opaque relay, as for any HTTPS client.
    const echoes = async (probe: Buffer) => {
      got = Buffer.alloc(0)
      sock.write(probe)
      await until('echo', () => got.includes(probe))
      return true
    }
    return { sock, closed, echoes }
  }
  // A ClientHello naming no server (the tunnels are to an address): the relay starts.
  const tls = clientHello(null)
  const tunnelTo = (port: number) => relay(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`, 200)
  const goes = await tunnelTo(denied)
  const stays = await tunnelTo(kept)
  const socket = await relay(`GET http://127.0.0.1:${wsPort}/feed HTTP/1.1\r\nHost: 127.0.0.1:${wsPort}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`, 101)
  t.ok(await goes.echoes(tls), 'tunnel relays')
  t.ok(await stays.echoes(tls))
  t.ok(await socket.echoes(Buffer.from([0x81, 0x01, 0x61])), 'WebSocket relays')

  await allowOnly([kept])
  const cut = (c: Promise<boolean>) => Promise.race([c, new Promise<boolean>((r) => setTimeout(() => r(false), 2000))])
  t.ok(await cut(goes.closed), 'the tunnel to a host now denied is cut')
  t.ok(await cut(socket.closed), 'the WebSocket to a host now denied is cut')
  t.ok(await stays.echoes(Buffer.from('still')), 'a tunnel the new policy allows stays open')
  stays.sock.destroy()
  // The kept tunnel's event is written when the sidecar sees it close, after this destroy.
  const events = await s.audit(3)
  const cutEvents = events.filter((e) => e.error === 'LK_POLICY_DENIED').map((e) => [e.via, e.port, e.status, e.decision])
  t.same(cutEvents.sort(), [
    ['connect', denied, 200, 'deny'],
    ['upgrade', wsPort, 101, 'deny'],
  ], 'each cut relay is recorded as denied by the new policy, its status kept')
  t.ok(s.logs.some((l) => l.includes('"connections_cut":2')), 'the cut is logged for the operator')
})

t.test('a tunnel not yet used and a WebSocket waiting for its 101 are judged again by the policy in force when their relay starts', async (t) => {
  // A tunnel's upstream records what reaches it; the WebSocket upstream answers 101 only when told.
  const reached: Buffer[] = []
  const tunnelled = createNetServer((sock) => {
    sock.on('error', () => {})
    sock.on('data', (d: Buffer) => reached.push(d))
  })
  tunnelled.listen(0, '127.0.0.1')
  await once(tunnelled, 'listening')
  const tunnelPort = (tunnelled.address() as AddressInfo).port
  t.teardown(() => tunnelled.close())
  let answer101: (() => void) | null = null
  const wsPort = await webSocketUpstream(t, (_socket, answer) => (answer101 = answer))
  const { s, allowOnly } = await sidecarOnPolicyFile(t, [tunnelPort, wsPort])
  const open = async (opening: string) => {
    const sock = connect(s.sidecar.port, '127.0.0.1')
    sock.on('error', () => {})
    await once(sock, 'connect')
    const got = { bytes: Buffer.alloc(0) }
    sock.on('data', (d: Buffer) => (got.bytes = Buffer.concat([got.bytes, d])))
    sock.write(opening)
    const closed = Promise.race([once(sock, 'close').then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3_000))])
    return { sock, got, closed }
  }
  const tunnel = await open(`CONNECT 127.0.0.1:${tunnelPort} HTTP/1.1\r\nHost: 127.0.0.1:${tunnelPort}\r\n\r\n`)
  await until('tunnel opened', () => tunnel.got.bytes.toString('latin1').startsWith('HTTP/1.1 200 '))
  const socket = await open(`GET http://127.0.0.1:${wsPort}/feed HTTP/1.1\r\nHost: 127.0.0.1:${wsPort}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`)
  await until('handshake sent upstream', () => answer101 !== null)

  await allowOnly([1])
  // The tunnel's first bytes are TLS: refused with TLS's access_denied alert, nothing relayed.
  tunnel.got.bytes = Buffer.alloc(0)
  tunnel.sock.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x01, 0x01]))
  t.ok(await tunnel.closed, 'the tunnel is closed')
  tunnel.sock.destroy()
  t.equal(tunnel.got.bytes[0], 0x15, 'the tunnel answers TLS with an alert')
  t.equal(Buffer.concat(reached).length, 0, 'nothing reached the upstream now denied')
  // The upstream's 101 comes after the change: the agent gets the denial, not a WebSocket.
  answer101!()
  t.ok(await socket.closed, 'the handshake ends')
  socket.sock.destroy()
  t.match(socket.got.bytes.toString('latin1'), /^HTTP\/1\.1 403 /, 'the WebSocket is refused, 403')
  const events = (await s.audit(2)).filter((e) => e.error === 'LK_POLICY_DENIED')
  t.same(events.map((e) => [e.via, e.port, e.decision]).sort(), [
    ['connect', tunnelPort, 'deny'],
    ['upgrade', wsPort, 'deny'],
  ], 'each is recorded as denied by the new policy')
  t.ok(events.every((e) => String(e.reason).startsWith('the policy changed: ')), 'saying why')
})

t.test('a ClientHello gathered over several reads is judged by the policy in force once it is whole', async (t) => {
  // A relay not yet started is not among those a policy change cuts: the tunnel judges it again.
  const upstream = await startTcpUpstream(t)
  const { s, allowOnly } = await sidecarOnPolicyFile(t, [upstream.port])
  const { sock, received } = await openTunnel(s.sidecar.port, upstream.port)
  const hello = clientHello(null)
  sock.write(hello.subarray(0, 10))
  await allowOnly([1])
  const closed = once(sock, 'close')
  sock.write(hello.subarray(10))
  await Promise.race([closed, new Promise((r) => setTimeout(r, 1500))])
  t.equal(received()[0], 0x15, 'the tunnel answers TLS with an alert')
  t.equal(upstream.bytes(), 0, 'nothing reached the upstream now denied')
  t.match(await s.audit(1), [{ via: 'connect', port: upstream.port, decision: 'deny', error: 'LK_POLICY_DENIED', reason: /^the policy changed: / }])
})
