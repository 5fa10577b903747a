// A sidecar whose control stream does not open says so in its log, at once and once per reason,
// and opens it with a control token rotated in its secrets.file.
// With a wrong control token (or no broker at the address) the log showed "sidecar listening" and
// nothing else: the reason reached only /readyz, stale_after_ms later, and "control stream lost"
// was logged only for a stream that had been open. All real: the broker's control server, the
// sidecar, gRPC over loopback.
import t from 'tap'
import { mkdtempSync, renameSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort } from '../helpers/broker.js'
import { startApi, startControlBroker, startControlSidecar, until, CONTROL_TOKEN } from './rig.js'

// One broker and API for every case: each sidecar has an agent of its own.
const broker = await startControlBroker()
t.teardown(() => broker.close())
const api = await startApi()
t.teardown(api.close)

const lines = (logs: string[]) =>
  logs
    .join('')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { level: number; msg: string; reason?: string })

t.test('a control stream refused or unreachable from the start is logged once, with the reason', async (t) => {
  const wrong = await startControlSidecar(broker, api, 'agent:summarizer:prod:wrong', { token: 'not-the-token', control: { stale_after_ms: 60_000 } })
  t.teardown(wrong.close)
  await until('refused a few times', () => (wrong.sidecar.control!.lastError ?? '').includes('control token does not match'))
  await new Promise((r) => setTimeout(r, 600)) // backoff 20-200 ms: several more attempts
  const notOpen = lines(wrong.logs).filter((l) => l.msg.startsWith('control stream not open'))
  t.equal(notOpen.length, 1, 'logged once, not at every attempt')
  t.match(notOpen[0], { level: 40, reason: 'control token does not match (gRPC 16)' }, 'at warn, naming the reason')
  t.notOk(wrong.logs.join('').includes('not-the-token'), 'the presented token is not logged')
  t.equal((await fetch(`${wrong.sidecar.adminUrl}/readyz`)).status, 200, 'before stale_after_ms the log is the only place that says it')

  const nowhere = await startControlSidecar({ ...broker, controlUrl: `grpc://127.0.0.1:${await freePort()}` }, api, 'agent:summarizer:prod:nowhere')
  t.teardown(nowhere.close)
  await until('a failure heard', () => nowhere.sidecar.control!.lastError !== null)
  await until('logged', () => lines(nowhere.logs).some((l) => l.msg.startsWith('control stream not open')))
  t.match(lines(nowhere.logs).find((l) => l.msg.startsWith('control stream not open')), { level: 40, reason: /UNAVAILABLE|ECONNREFUSED|gRPC 14/ }, 'no broker at the address is said too')
})

t.test('the sidecar\'s own shutdown is not logged as a lost control stream', async (t) => {
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:leaving')
  await until('connected', () => s.sidecar.control!.connected)
  await s.close()
  await new Promise((r) => setTimeout(r, 100))
  const warned = lines(s.logs).filter((l) => l.msg.startsWith('control stream'))
  t.same(
    warned.map((l) => l.msg),
    ['control stream synchronised'],
    'no "control stream lost; reconnecting" warning (reason "Cancelled on client") at shutdown',
  )
})

t.test('a control token rotated in secrets.file is sent from the next stream, no restart', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-rot-control-'))
  const file = join(dir, 'secrets.yaml')
  const write = (token: string) => {
    writeFileSync(join(dir, 'next.yaml'), `CONTROL: "${token}"\n`)
    renameSync(join(dir, 'next.yaml'), file)
  }
  write('ctl-the-one-before-rotation')
  const s = await startControlSidecar(broker, api, 'agent:summarizer:prod:rotating', { secrets: { file, reload_interval_ms: 50 } })
  t.teardown(s.close)
  await until('the old token refused', () => (s.sidecar.control!.lastError ?? '').includes('control token does not match'))
  write(CONTROL_TOKEN)
  await until('connected with the rotated token', () => s.sidecar.control!.connected)
  t.ok(s.sidecar.control!.connected, 'the stream opened with the token now in the file')
  t.notOk(s.logs.join('').includes(CONTROL_TOKEN) || s.logs.join('').includes('ctl-the-one-before-rotation'), 'neither token is logged')
})
