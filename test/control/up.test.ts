// `latchkey up` with the control stream on (deploy/examples/up.yaml, ports moved so it can run
// beside the README test): the operator's `latchkey revoke` of the demo agent reaches the sidecar,
// which refuses the agent's next call. Real processes: `latchkey up`, the CLI, curl.
import t from 'tap'
import { spawn, execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parse, stringify } from 'yaml'
import { freePort } from '../helpers/broker.js'
import { CLI } from '../helpers/cli.js'

const run = promisify(execFile)

t.test('latchkey up: `latchkey revoke agent:demo:dev:local` stops the demo agent', async (t) => {
  const cwd = mkdtempSync(join(tmpdir(), 'lk-up-control-'))
  const [broker, control, upstream, ingest] = [await freePort(), await freePort(), await freePort(), await freePort()]
  const move = (text: string) =>
    text.replaceAll('15003', String(broker)).replaceAll('15004', String(control)).replaceAll('15080', String(upstream)).replaceAll('15100', String(ingest))
  writeFileSync(join(cwd, 'agents.yaml'), move(readFileSync('deploy/examples/agents.yaml', 'utf8')))
  const config = parse(move(readFileSync('deploy/examples/up.yaml', 'utf8'))) as Record<string, Record<string, unknown>>
  config.sidecar!.listen = { host: '127.0.0.1', port: 0 }
  config.sidecar!.admin = { host: '127.0.0.1', port: 0 }
  writeFileSync(join(cwd, 'up.yaml'), stringify(config))
  t.ok((config.sidecar!.control as { url: string }).url.endsWith(`:${control}`), 'the example config turns the control stream on')

  const adminToken = 'admin-' + Math.random().toString(36).slice(2)
  const env: NodeJS.ProcessEnv = { ...process.env, LATCHKEY_BROKER_ADMIN_TOKEN: adminToken }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'NO_PROXY']) delete env[k]
  const child = spawn(process.execPath, [CLI, 'up', '-c', join(cwd, 'up.yaml')], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void child.kill('SIGKILL'))
  let out = ''
  let err = ''
  child.stderr!.on('data', (c: Buffer) => (err += c.toString()))
  await new Promise<void>((ok, fail) => {
    child.stdout!.on('data', (c: Buffer) => {
      out += c.toString()
      if (out.includes('Latchkey is up')) ok()
    })
    child.once('exit', (code) => fail(new Error(`latchkey up exited ${code}: ${out}`)))
  })
  const proxy = /sidecar \(HTTP_PROXY\)\s+(\S+)/.exec(out)![1]!
  const hello = await run('curl', ['-sS', '-x', proxy, `http://127.0.0.1:${upstream}/hello`], { env })
  t.match(JSON.parse(hello.stdout), { upstream: 'latchkey demo', sub: 'agent:demo:dev:local' }, 'the demo agent works')

  // The banner's hints name the moved ports (the CLI's defaults are the example's): as printed, they reach this system.
  t.match(out, new RegExp(`revoke the agent\\s+npx latchkey revoke agent:demo:dev:local --broker http://127\\.0\\.0\\.1:${broker}$`, 'm'), 'the revoke hint names the broker')
  t.match(out, new RegExp(`audit trail\\s+npx latchkey audit --agent agent:demo:dev:local --url http://127\\.0\\.0\\.1:${ingest + 1}$`, 'm'), 'the audit hint names the query API')
  const revoked = await run(process.execPath, [CLI, 'revoke', 'agent:demo:dev:local', '--broker', `http://127.0.0.1:${broker}`, '--reason', 'demo'], { env })
  t.match(revoked.stdout + revoked.stderr, /revoked|201/i)
  let body: Record<string, unknown> = {}
  for (let i = 0; i < 100; i++) {
    const r = await run('curl', ['-sS', '-x', proxy, `http://127.0.0.1:${upstream}/hello`], { env })
    body = JSON.parse(r.stdout) as Record<string, unknown>
    if (body.code === 'LK_REVOKED') break
    await new Promise((r) => setTimeout(r, 20))
  }
  t.match(body, { error: 'revoked', code: 'LK_REVOKED', reason: 'revoked' }, 'the next call is refused')
  // The collector moved with its address: its query API is on the next port, and says what the agent did.
  const queryUrl = `http://127.0.0.1:${ingest + 1}`
  t.match(out, new RegExp(`collector\\s+${queryUrl}`), 'the printed query URL follows the configured address')
  let trail = ''
  for (let i = 0; i < 100 && !/LK_REVOKED/.test(trail); i++) {
    trail = (await run(process.execPath, [CLI, 'audit', '--agent', 'agent:demo:dev:local', '--url', queryUrl], { env })).stdout
    if (!/LK_REVOKED/.test(trail)) await new Promise((r) => setTimeout(r, 50))
  }
  t.match(trail, /\/hello/, 'the allowed call is in the trail')
  t.match(trail, /LK_REVOKED/, 'and so is the refused one')
  t.notOk((out + err).includes(adminToken), 'the admin token is never printed')
})
