// mTLS between sidecar and collector, with real certificates from openssl: the sidecar is its
// client certificate's CN; an unknown, mismatched or untrusted sender is refused.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js'
import { AuditIngestServiceClient, type IngestResponse } from '../../protos/gen/latchkey/v1/audit.js'
import { validateCollectorConfig } from '../../collector/config.js'
import { startUpstream } from '../helpers/harness.js'
import { testPki } from '../helpers/tls.js'
import { seqEvents } from './events.js'
import { sha256hex, sidecarIdentity, startTestCollector } from './collector-helpers.js'
import { call, proxyAgent, startCollectedSidecar } from './sidecar-helpers.js'

const pki = testPki()
const work = mkdtempSync(join(tmpdir(), 'lk-mtls-'))
const openssl = (...args: string[]) => execFileSync('openssl', args, { cwd: work, stdio: 'pipe' })

/** A client certificate with this CN, signed by the test CA (or by a CA of its own). */
function clientCert(cn: string, ownCa = false): { cert: string; key: string; certFile: string; keyFile: string } {
  let caPem = pki.caFile
  let caKey = join(pki.dir, 'ca.key')
  if (ownCa) {
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'rogue-ca.key', '-out', 'rogue-ca.pem', '-days', '2', '-subj', '/CN=rogue CA')
    caPem = join(work, 'rogue-ca.pem')
    caKey = join(work, 'rogue-ca.key')
  }
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${cn}.key`, '-out', `${cn}.csr`, '-subj', `/CN=${cn}`)
  writeFileSync(join(work, `${cn}.ext`), 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n')
  openssl('x509', '-req', '-in', `${cn}.csr`, '-CA', caPem, '-CAkey', caKey, '-CAcreateserial', '-out', `${cn}.pem`, '-days', '2', '-extfile', `${cn}.ext`)
  return { cert: readFileSync(join(work, `${cn}.pem`), 'utf8'), key: readFileSync(join(work, `${cn}.key`), 'utf8'), certFile: join(work, `${cn}.pem`), keyFile: join(work, `${cn}.key`) }
}

async function tryIngest(address: string, client: { cert: string; key: string } | null, md: Metadata, sidecarId: string) {
  const creds = client ? credentials.createSsl(Buffer.from(pki.ca), Buffer.from(client.key), Buffer.from(client.cert)) : credentials.createSsl(Buffer.from(pki.ca))
  const c = new AuditIngestServiceClient(address, creds)
  const call = c.ingest(md)
  const acks: IngestResponse[] = []
  let error: ServiceError | null = null
  call.on('data', (a: IngestResponse) => acks.push(a))
  call.on('error', (e: ServiceError) => (error = e))
  const ended = new Promise((r) => call.on('status', r))
  call.write({ sidecarId, events: seqEvents(1, 3, undefined, sidecarId) })
  call.end()
  await ended
  c.close()
  return { acks, error: error as ServiceError | null }
}

t.test('mTLS: the certificate is the identity; strangers are refused', async (t) => {
  const known = sidecarIdentity('sidecar-mtls-a')
  const withToken = sidecarIdentity('sidecar-mtls-b')
  const c = await startTestCollector([], {
    raw: {
      grpc: { host: '127.0.0.1', port: 0, tls: { cert_file: join(pki.dir, 'leaf.pem'), key_file: join(pki.dir, 'leaf.key'), client_ca_file: pki.caFile } },
      sidecars: [{ id: known.id }, { id: withToken.id, token_sha256: sha256hex(withToken.token) }],
    },
  })
  t.teardown(() => c.close())

  // The real sidecar, mTLS only (no token), end to end.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const a = clientCert(known.id)
  const s = await startCollectedSidecar({
    id: known,
    collector: c.grpcAddress,
    upstreamPort: upstream.port,
    collectorOpts: { token_secret: undefined, tls: { ca_file: pki.caFile, cert_file: a.certFile, key_file: a.keyFile } },
  })
  const agent = proxyAgent(s.sidecar.proxyUrl)
  for (let i = 0; i < 20; i++) t.equal(await call(agent, `${upstream.origin}/mtls/${i}`), 200)
  await agent.close()
  t.ok(await s.sink.waitForAck(s.sink.spool.lastSeq, 10_000), 'acked over mTLS')
  t.same((await c.store.inventory()).sidecars.map((x) => [x.sidecar, x.events]), [[known.id, 20]])
  await s.close()

  const md = (id?: string, token?: string) => {
    const m = new Metadata()
    if (id) m.set('x-latchkey-sidecar', id)
    if (token) m.set('authorization', `Bearer ${token}`)
    return m
  }
  const mismatch = await tryIngest(c.grpcAddress, a, md(withToken.id, withToken.token), withToken.id)
  t.equal(mismatch.error?.code, status.UNAUTHENTICATED)
  t.equal(mismatch.error?.details, `metadata names sidecar "${withToken.id}" but the client certificate is "${known.id}"`)

  const stranger = await tryIngest(c.grpcAddress, clientCert('sidecar-unknown'), md(), 'sidecar-unknown')
  t.equal(stranger.error?.details, 'sidecar "sidecar-unknown" is not known to this collector')

  const b = clientCert(withToken.id)
  const noToken = await tryIngest(c.grpcAddress, b, md(), withToken.id)
  t.equal(noToken.error?.details, `sidecar "${withToken.id}": missing bearer token`, 'a configured token is required on top of the certificate')
  const both = await tryIngest(c.grpcAddress, b, md(undefined, withToken.token), withToken.id)
  t.same([both.error, both.acks.map((x) => x.ackedSequence)], [null, [3]])

  const rogue = await tryIngest(c.grpcAddress, clientCert(known.id, true), md(), known.id)
  t.equal(rogue.error?.code, status.UNAVAILABLE, 'a certificate from another CA fails the handshake')
  const anonymous = await tryIngest(c.grpcAddress, null, md(known.id), known.id)
  t.equal(anonymous.error?.code, status.UNAVAILABLE, 'no client certificate: no stream')
  t.same((await c.store.inventory()).sidecars.map((x) => [x.sidecar, x.events]), [[known.id, 20], [withToken.id, 3]], 'nothing from the refused senders')
})

t.test('without mTLS, a sidecar entry must carry a token hash', async (t) => {
  t.throws(() => validateCollectorConfig({ version: 1, collector: { sidecars: [{ id: 'x' }] } }), {
    message: /collector\.sidecars\[0\]\.token_sha256: required unless collector\.grpc\.tls authenticates sidecars by client certificate/,
  })
})
