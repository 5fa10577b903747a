// SIGHUP, which operators send a sidecar to reload it, neither kills nor undrains a collector or
// a broker: they reload nothing, and the default action ended them at once (exit 129).
import t from 'tap'
import { join } from 'node:path'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { setTimeout as sleep } from 'node:timers/promises'
import { sha256hex, sidecarIdentity } from './collector-helpers.js'
import { freePort } from './sidecar-helpers.js'
import { startChild, writeYaml } from './process-helpers.js'

t.test('a collector told SIGHUP says it ignores it, and stops cleanly on SIGTERM', async (t) => {
  const id = sidecarIdentity()
  const dir = mkdtempSync(join(tmpdir(), 'lk-hup-'))
  const cfg = writeYaml(join(dir, 'collector.yaml'), {
    version: 1,
    collector: { grpc: { host: '127.0.0.1', port: await freePort() }, http: null, store: { kind: 'sqlite', path: join(dir, 'audit.db') }, sidecars: [{ id: id.id, token_sha256: sha256hex(id.token) }] },
  })
  const collector = await startChild(['collector', '-c', cfg], /collector listening/)
  t.teardown(() => collector.kill())
  // "listening" is logged just before the command installs its signal handlers.
  await sleep(200)
  collector.proc.kill('SIGHUP')
  await sleep(300)
  t.equal(collector.proc.exitCode, null, 'still running')
  t.equal(collector.proc.signalCode, null, 'not ended by the signal')
  t.match(collector.output(), /SIGHUP ignored/, 'and says why nothing happened')
  await collector.kill('SIGTERM')
  t.equal(collector.proc.exitCode, 0, 'SIGTERM then drains and exits 0')
})
