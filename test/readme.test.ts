// The README's promise, kept: `latchkey up` (what `npm start` runs after building) and the
// commands the README tells a newcomer to type next, with the answers it says they get.
import t from 'tap'
import { spawn, execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { once } from 'node:events'
import { CLI } from './helpers/cli.js'

const run = promisify(execFile)
const readme = readFileSync('README.md', 'utf8')
/**
 * A README line with `npx latchkey` as the bin npx resolves it to (package.json's bin: the
 * bundle, asserted below). npx's own start is ~1.7 s of CPU, the CLI's ~0.25 s: the lines of the
 * first test run so; the second runs its check-config line through npx itself, as written, which
 * proves npx finds the checkout's bin from a clone.
 */
const direct = (line: string) => line.replaceAll('npx latchkey ', `'${process.execPath}' '${CLI}' `)

t.test('README: npm start, then the curl commands it shows', async (t) => {
  t.match(readme, /npm install && npm start/)
  t.match(readme, /npm install && npm test/)
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: Record<string, string> }
  t.equal(pkg.scripts.start, 'node dist/bin/latchkey.js up', 'npm start runs latchkey up')

  const cwd = mkdtempSync(join(tmpdir(), 'lk-up-'))
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'NO_PROXY']) delete env[k]
  const child = spawn(process.execPath, [CLI, 'up'], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void child.kill('SIGKILL'))
  let out = ''
  await new Promise<void>((ok, fail) => {
    child.stdout!.on('data', (c: Buffer) => {
      out += c.toString()
      if (out.includes('Latchkey is up')) ok()
    })
    child.once('exit', (code) => fail(new Error(`latchkey up exited ${code}: ${out}`)))
  })

  const tryIt = readme.slice(readme.indexOf('## Try it'), readme.indexOf('\n## ', readme.indexOf('## Try it') + 1))
  const commands = [...tryIt.matchAll(/^curl .*$/gm)].map((m) => m[0])
  t.equal(commands.length, 3, 'the README shows three commands to try')
  const outputs: string[] = []
  for (const cmd of commands) {
    const args = cmd.split(' ').slice(1)
    const r = await run('curl', ['-sS', ...args], { env })
    outputs.push(r.stdout)
  }
  const hello = JSON.parse(outputs[0]!) as Record<string, string>
  t.same(hello, {
    upstream: 'latchkey demo',
    method: 'GET',
    path: '/hello',
    credential: 'broker token, injected by latchkey (verified)',
    sub: 'agent:demo:dev:local',
    act: { sub: 'agent:demo:dev:local' },
    scope: 'demo.read demo.write',
  })
  const readmeHello = tryIt.slice(tryIt.indexOf('```json') + 7, tryIt.indexOf('```', tryIt.indexOf('```json') + 7))
  t.same(JSON.parse(readmeHello), hello, 'the README shows exactly what came back')

  // The Tasks section's shell block, run as written.
  const tasks = readme.slice(readme.indexOf('## Tasks'))
  const block = tasks.slice(tasks.indexOf('```sh') + 5, tasks.indexOf('```', tasks.indexOf('```sh') + 5))
  const shown = tasks.slice(tasks.indexOf('```\n', tasks.indexOf('```', tasks.indexOf('```sh') + 5) + 3) + 4)
  const expected = shown.slice(0, shown.indexOf('```')).trim()
  const taskRun = await run('bash', ['-c', block], { env })
  t.equal(taskRun.stdout.trim(), expected, 'the task example prints what the README says')
  // Ending a task the way the README says: DELETE with the answer's `task`; its proxy URL is refused after.
  t.match(tasks, /`curl -X DELETE http:\/\/127\.0\.0\.1:15002\/v1\/tasks\/lkt_…` ends the task \(204\)/)
  const opened = (await (await fetch('http://127.0.0.1:15002/v1/tasks', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"purpose": "end it", "duration_s": 300}' })).json()) as { task: string; proxy_url: string }
  t.equal((await fetch(`http://127.0.0.1:15002/v1/tasks/${opened.task}`, { method: 'DELETE' })).status, 204)
  const ended = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code} %header{x-latchkey-error}', '-x', opened.proxy_url, 'http://127.0.0.1:15080/hello'], { env })
  t.equal(ended.stdout, '407 LK_PROXY_AUTH', 'the ended task\'s proxy URL is refused')
  t.same(JSON.parse(outputs[1]!), hello, 'the reverse route answers the same')
  // Node's fetch with HTTP_PROXY set (EnvHttpProxyAgent tunnels http://) reaches the route too, as the README says.
  const fetchScript = `
    const { EnvHttpProxyAgent, fetch } = await import('undici')
    const res = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() })
    console.log(JSON.stringify({ status: res.status, body: await res.json() }))`
  const routeUrl = /sends `(http:\/\/127\.0\.0\.1:15001)\/<route>\/…` to the proxy/.exec(readme)?.[1]
  t.ok(routeUrl, 'the README says how an HTTP_PROXY client reaches a route')
  const fetched = await run(process.execPath, ['--input-type=module', '-e', fetchScript, `${routeUrl!}/demo/hello`], { env: { ...env, HTTP_PROXY: 'http://127.0.0.1:15001' }, cwd: resolve('.') })
  t.same(JSON.parse(fetched.stdout), { status: 200, body: hello }, "Node's fetch through HTTP_PROXY reaches the route")
  const refusal = outputs[2]!
  t.equal(refusal.slice(0, refusal.indexOf('\r\n')), readme.slice(readme.indexOf('HTTP/1.1 403'), readme.indexOf('\n', readme.indexOf('HTTP/1.1 403'))), 'the status line is what the README shows')
  t.match(refusal, /x-latchkey-rule: default/i)
  const body = refusal.slice(refusal.indexOf('\r\n\r\n') + 4).trim()
  const readmeBody = readme.slice(readme.indexOf('{"error":"denied"'), readme.indexOf('\n', readme.indexOf('{"error":"denied"')))
  t.equal(body, readmeBody, 'the refusal body is exactly what the README shows')

  // The README's audit query, as written, from the checkout (by the bin npx finds: see direct()).
  const auditCmd = /^npx latchkey audit .*$/m.exec(readme)?.[0]
  t.ok(auditCmd, 'the README shows the audit query')
  t.equal(resolve(pkgBin()), CLI, 'the bin npx runs is the one the lines asked by it directly run')
  let audit: string[] = []
  for (let i = 0; i < 40; i++) {
    // The collector acknowledges asynchronously: ask until every call has arrived.
    const r = await run('bash', ['-c', `${direct(auditCmd!)} --json`], { env, cwd: resolve('.') })
    audit = r.stdout.trim().split('\n').filter(Boolean)
    if (audit.length >= 6) break
    await new Promise((r2) => setTimeout(r2, 100))
  }
  t.equal(audit.length, 6, 'each README call is one event at the collector (the ended task\'s refused one too)')
  const events = audit.map((l) => JSON.parse(l) as Record<string, unknown>)
  t.ok(events.some((e) => JSON.stringify(e).includes('LK_POLICY_DENIED')), 'the refusal is among them')
  const human = await run('bash', ['-c', direct(auditCmd!)], { env, cwd: resolve('.') })
  t.match(human.stdout, /allow\s+200\s+GET http:\/\/127\.0\.0\.1:15080\/hello/, 'the human-readable form names the call')
  // The collector's metrics, where the README says: the demo sidecar is connected and has delivered.
  const collectorMetrics = /the collector's at `(http:\/\/[^`]+\/metrics)`/.exec(readme)?.[1]
  t.equal(collectorMetrics, 'http://127.0.0.1:15101/metrics', "the README says where the collector's metrics are")
  const scraped = await (await fetch(collectorMetrics!)).text()
  t.match(scraped, /^latchkey_collector_sidecar_streams\{sidecar="[^"]+"\} 1$/m, 'the demo sidecar is connected')
  t.match(scraped, /^latchkey_collector_sidecar_events_stored_total\{sidecar="[^"]+"\} [6-9]$/m, 'and its calls are stored')

  // The banner's revoke line, as printed: the operator stops the demo agent.
  const revoke = /revoke the agent\s+(.+)$/m.exec(out)?.[1]
  t.match(revoke, /^LATCHKEY_BROKER_ADMIN_TOKEN=\$\(cat \/.+\/\.latchkey\/broker-admin-token\) npx latchkey revoke agent:demo:dev:local$/, 'the banner says how to revoke the demo agent')
  t.equal(statSync(join(cwd, '.latchkey/broker-admin-token')).mode & 0o777, 0o600, 'from a token file only this user can read')
  // A second `up` beside it fails on the busy ports, and leaves the running one's token be.
  const tokenBefore = readFileSync(join(cwd, '.latchkey/broker-admin-token'), 'utf8')
  const second = await run(process.execPath, [CLI, 'up'], { cwd, env }).then(() => 0, (err: { code?: number }) => err.code ?? -1)
  t.equal(second, 1, 'a second latchkey up in the same place exits 1')
  t.equal(readFileSync(join(cwd, '.latchkey/broker-admin-token'), 'utf8'), tokenBefore, "and the running system's admin token file is unchanged")
  await run('bash', ['-c', `${direct(revoke!)} --reason readme`], { env, cwd: resolve('.') })
  let refused = ''
  for (let i = 0; i < 100 && !refused.includes('LK_REVOKED'); i++) {
    refused = (await run('curl', ['-sS', ...commands[0]!.split(' ').slice(1)], { env })).stdout
    await new Promise((r) => setTimeout(r, 20))
  }
  t.match(refused, /"code":"LK_REVOKED"/, 'and its next call is refused')
  const adminToken = readFileSync(join(cwd, '.latchkey/broker-admin-token'), 'utf8').trim()
  t.notOk(out.includes(adminToken), 'the admin token itself is never printed')

  child.kill('SIGTERM')
  const [code] = (await once(child, 'exit')) as [number]
  t.equal(code, 0)
  t.notMatch(audit.join('\n') + out, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\./, 'no token appears in any output')
  t.notMatch(audit.join('\n') + out, /lkt_/, 'nor a task handle')
})

function pkgBin(): string {
  return (JSON.parse(readFileSync('package.json', 'utf8')) as { bin: { latchkey: string } }).bin.latchkey
}

t.test('README: every CLI line it shows runs from a fresh clone', async (t) => {
  const shell = [...readme.matchAll(/```sh\n([^]*?)```/g)].map((m) => m[1]!).join('\n')
  // A clone has no `latchkey` on PATH: each line names the checkout's CLI through npx.
  const uses = [...shell.matchAll(/(^|[\s=(])(npx )?latchkey (\S+)/gm)]
  t.ok(uses.length >= 3, 'the README shows CLI commands')
  for (const m of uses) t.equal(m[2], 'npx ', `"${m[0].trim()}" runs from a clone`)
  const help = (await run(process.execPath, [CLI, '--help'])).stdout
  for (const sub of new Set(uses.map((m) => m[3]!))) t.match(help, new RegExp(`^  ${sub} `, 'm'), `latchkey ${sub} exists`)
  // The check-config line, on the reference config the README points at.
  const check = /^npx latchkey check-config (\S+)/m.exec(shell)
  t.ok(check, 'the README shows check-config')
  const r = await run('bash', ['-c', check![0].replace(check![1]!, 'deploy/latchkey.reference.yaml')])
  t.match(r.stdout, /^deploy\/latchkey\.reference\.yaml: valid /)
})
