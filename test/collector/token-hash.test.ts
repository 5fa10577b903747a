// The credential in a collector event: a broker-issued token arrives as its SHA-256 (so the
// broker's records can be joined), never as itself; a static secret gets no hash at all.
import t from 'tap'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { API } from '../helpers/broker.js'
import { startTokenRig, AGENT } from '../helpers/tokens.js'
import { sidecarIdentity, startTestCollector, testSink } from './collector-helpers.js'

const run = promisify(execFile)

t.test('a broker token is audited as its SHA-256, and the store never holds the token', async (t) => {
  const id = sidecarIdentity()
  const c = await startTestCollector([id])
  t.teardown(() => c.close())
  const sink = testSink(id, c.grpcAddress)
  const rig = await startTokenRig({ sidecarOptions: { audit: sink } })
  t.teardown(rig.close)
  const opened = await rig.openTask({ purpose: 'audit the token hash', duration_s: 300, audiences: [API] })
  t.equal(opened.status, 201)
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy']) delete env[k]
  await run('curl', ['-sS', '-x', opened.body.proxy_url as string, `${rig.api.origin}/v1/messages`], { env })
  const token = rig.api.tokens[0]!
  t.ok(token && token.length > 100, 'the API received a broker JWT')
  t.ok(await sink.waitForAck(sink.spool.lastSeq, 10_000))
  const [e] = await c.store.eventsByAgent({ agent: AGENT, since: new Date(0) })
  t.equal(e?.event.call?.path, '/v1/messages')
  t.equal(Buffer.from(e!.event.credential!.tokenSha256).toString('hex'), createHash('sha256').update(token).digest('hex'), 'the token hash matches what the API received')
  t.equal(e?.event.credential?.audience, rig.api.origin)
  t.match(e?.event.credential?.jti, /.+/)
  t.notOk(readFileSync(join(c.dir, 'audit.db')).includes(token), 'the store file does not contain the token')
  t.notOk(c.logs.join('').includes(token), 'nor does any collector log line')
})
