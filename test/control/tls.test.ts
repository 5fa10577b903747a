// The control stream over TLS, all real: a broker whose control listener has a certificate, and
// sidecars that check it. Whoever answers at a sidecar's control URL gets its control token and
// sets its policy and revocations, so an impostor (another CA's certificate, or none) must get
// nothing. (Plaintext off loopback is a configuration error: test/config-transport.test.ts.)
import t from 'tap'
import { join } from 'node:path'
import { testPki } from '../helpers/tls.js'
import { startApi, startControlBroker, startControlSidecar, viaProxy, revoke, until } from './rig.js'

const pki = testPki()
const impostorPki = testPki('impostor CA')
const serverTls = (p: typeof pki) => ({ cert_file: join(p.dir, 'leaf.pem'), key_file: join(p.dir, 'leaf.key') })

t.test('a sidecar that trusts the broker\'s CA gets its revocations over TLS; an impostor\'s certificate gets nothing', async (t) => {
  const broker = await startControlBroker({ control: { tls: serverTls(pki) } })
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  const good = await startControlSidecar(broker, api, 'agent:summarizer:prod:good', { control: { url: broker.controlUrl, tls: { ca_file: pki.caFile } } })
  t.teardown(good.close)
  await until('the TLS control stream connected', () => good.sidecar.control!.connected)
  const task = await good.openTask()
  t.equal((await viaProxy(good, task.handle, `${api.origin}/a`)).status, 200)
  t.equal((await revoke(broker, 'agent', good.agent)).status, 201)
  await until('the revocation arrived over TLS', () => good.sidecar.control!.state.agentRevoked, 2000)
  t.equal((await viaProxy(good, task.handle, `${api.origin}/b`)).status, 403)

  // The same broker address, but the sidecar trusts only another CA: the broker it reaches is,
  // to it, an impostor. No stream opens, so no token is sent and no policy or revocation taken.
  const wary = await startControlSidecar(broker, api, 'agent:summarizer:prod:wary', { control: { url: broker.controlUrl, tls: { ca_file: impostorPki.caFile } } })
  t.teardown(wary.close)
  await until('the failed handshake is recorded', () => wary.sidecar.control!.lastError !== null, 3000)
  t.equal(wary.sidecar.control!.connected, false, 'not connected to a broker whose certificate does not chain to its CA')
  t.equal(broker.broker.control!.connected, 1, 'the broker sees only the good sidecar')
  await until('stale: never heard from its broker in stale_after_ms', () => wary.sidecar.control!.staleReason() !== null, 4000)
  t.equal((await fetch(`${wary.sidecar.adminUrl}/readyz`)).status, 503, 'so not ready, and no new token is minted')

  // A plaintext sidecar gets no stream from a TLS listener either.
  const plain = await startControlSidecar(broker, api, 'agent:summarizer:prod:plain', { control: { url: broker.controlUrl, insecure_plaintext: true } })
  t.teardown(plain.close)
  await until('the plaintext attempt failed', () => plain.sidecar.control!.lastError !== null, 3000)
  t.equal(plain.sidecar.control!.connected, false)
})

t.test('an impostor broker at the control address cannot swap a TLS sidecar\'s policy', async (t) => {
  // The impostor has a certificate for the right name (127.0.0.1) from a CA the sidecar does not trust.
  const impostor = await startControlBroker({ control: { tls: serverTls(impostorPki) } })
  t.teardown(() => impostor.close())
  const api = await startApi()
  t.teardown(api.close)
  const s = await startControlSidecar(impostor, api, 'agent:summarizer:prod:target', { control: { url: impostor.controlUrl, tls: { ca_file: pki.caFile } } })
  t.teardown(s.close)
  await until('the handshake failed', () => s.sidecar.control!.lastError !== null, 3000)
  t.match(s.sidecar.control!.lastError, /certificate|handshake|SSL|TLS|No connection established/i, `the reason names the TLS failure: ${s.sidecar.control!.lastError}`)
  t.equal(s.sidecar.policy.version, 'config', 'the policy is still the one in its own config')
  t.equal(impostor.broker.control!.connected, 0, 'the impostor never got a stream, so never got the control token')
})

t.test('a control CA file that holds no certificate stops start-up, naming the setting and the file', async (t) => {
  const broker = await startControlBroker({ control: { tls: serverTls(pki) } })
  t.teardown(() => broker.close())
  const api = await startApi()
  t.teardown(api.close)
  await t.rejects(startControlSidecar(broker, api, 'agent:summarizer:prod:bad-ca', { control: { url: broker.controlUrl, tls: { ca_file: join(pki.dir, 'leaf.key') } } }), {
    code: 'LK_STARTUP',
    message: new RegExp(`sidecar\\.control\\.tls\\.ca_file .*leaf\\.key`),
  })
})
