// A sidecar that stops reading its control stream: the broker stops queueing for it past a limit
// and ends the stream (the sidecar would resync from a snapshot), while other streams carry on.
import t from 'tap'
import { credentials, Metadata } from '@grpc/grpc-js'
import { ControlServiceClient, type WatchResponse } from '../../protos/gen/latchkey/v1/control.js'
import { startControlBroker, until, CONTROL_TOKEN } from './rig.js'

t.test('a stream whose reader stalls is ended with RESOURCE_EXHAUSTED; a reading stream is not', async (t) => {
  const broker = await startControlBroker({ control: { heartbeat_ms: 60_000 } })
  t.teardown(() => broker.close())
  const server = broker.broker.control!
  server.maxQueuedMessages = 50
  const md = (agent: string) => {
    const m = new Metadata()
    m.set('authorization', `Bearer ${CONTROL_TOKEN}`)
    m.set('x-latchkey-sidecar', agent)
    return m
  }
  const client = new ControlServiceClient(broker.broker.controlAddress!, credentials.createInsecure())
  t.teardown(() => client.close())
  const stalled = client.watch({ agentId: 'agent:x:prod:stalled', policyVersion: '' }, md('agent:x:prod:stalled'))
  let stalledError: { code?: number; details?: string } | undefined
  stalled.on('error', (e: Error & { code?: number; details?: string }) => (stalledError = e))
  await new Promise((r) => stalled.once('data', r))
  stalled.pause()
  const reader = client.watch({ agentId: 'agent:x:prod:reader', policyVersion: '' }, md('agent:x:prod:reader'))
  const seen: WatchResponse[] = []
  reader.on('data', (m: WatchResponse) => seen.push(m))
  reader.on('error', () => {})
  await until('reader connected', () => seen.length >= 1)

  // Large revocations fill the stalled stream's HTTP/2 window, then its queue.
  const reason = 'r'.repeat(32 * 1024)
  // (The SQLite store answers synchronously: yield to I/O between revocations so sockets flush.)
  for (let i = 0; i < 300 && server.stats.dropped === 0; i++) {
    await broker.broker.revocations.revoke('jti', `jti-${i}`, reason)
    await new Promise((r) => setTimeout(r, 1))
  }
  await until('stalled stream dropped', () => server.stats.dropped === 1)
  stalled.resume()
  await until('the stalled client hears why', () => stalledError !== undefined)
  t.equal(stalledError!.code, 8, 'RESOURCE_EXHAUSTED')
  t.match(stalledError!.details, /more than 50 control messages queued unread; reconnect to resynchronise/)
  const sent = broker.broker.revocations.all().length
  await until('the reading stream got every revocation', () => seen.filter((m) => m.change?.$case === 'revoked').length === sent)
  t.equal(server.connected, 1, 'only the reading stream remains')
  reader.cancel()
})
