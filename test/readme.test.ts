// The README's promise, kept: `latchkey up` (what `npm start` runs after building) and the
// commands the README tells a newcomer to type next, with the answers it says they get.
import t from 'tap'
import { spawn, execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { once } from 'node:events'

const run = promisify(execFile)
const readme = readFileSync('README.md', 'utf8')

t.test('README: npm start, then the curl commands it shows', async (t) => {
  t.match(readme, /npm install && npm start/)
  t.match(readme, /npm install && npm test/)
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: Record<string, string> }
  t.equal(pkg.scripts.start, 'node dist/cli/latchkey.js up', 'npm start runs latchkey up')

  const cwd = mkdtempSync(join(tmpdir(), 'lk-up-'))
  const env = { ...process.env }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'NO_PROXY']) delete env[k]
  const child = spawn(process.execPath, [resolve('dist/cli/latchkey.js'), 'up'], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void child.kill('SIGKILL'))
  let out = ''
  await new Promise<void>((ok, fail) => {
    child.stdout!.on('data', (c: Buffer) => {
      out += c.toString()
      if (out.includes('Latchkey is up')) ok()
    })
    child.once('exit', (code) => fail(new Error(`latchkey up exited ${code}: ${out}`)))
  })

  const commands = [...readme.matchAll(/^curl .*$/gm)].map((m) => m[0])
  t.equal(commands.length, 3, 'the README shows three commands to try')
  const outputs: string[] = []
  for (const cmd of commands) {
    const args = cmd.split(' ').slice(1)
    const r = await run('curl', ['-sS', ...args], { env })
    outputs.push(r.stdout)
  }
  const hello = JSON.parse(outputs[0]!) as Record<string, string>
  t.same(hello, { upstream: 'latchkey demo', method: 'GET', path: '/hello', credential: 'injected by latchkey (verified)' })
  t.same(JSON.parse(outputs[1]!), hello, 'the reverse route answers the same')
  const refusal = outputs[2]!
  t.match(refusal, /^HTTP\/1\.1 403 Forbidden/)
  t.match(refusal, /x-latchkey-rule: default/i)
  const body = refusal.slice(refusal.indexOf('\r\n\r\n') + 4).trim()
  const readmeBody = readme.slice(readme.indexOf('{"error":"denied"'), readme.indexOf('\n', readme.indexOf('{"error":"denied"')))
  t.equal(body, readmeBody, 'the refusal body is exactly what the README shows')

  child.kill('SIGTERM')
  const [code] = (await once(child, 'exit')) as [number]
  t.equal(code, 0)
  const audit = readFileSync(join(cwd, 'latchkey-audit.jsonl'), 'utf8').trim().split('\n')
  t.equal(audit.length, 3, 'each README command left one audit line')
  t.notMatch(audit.join('\n') + out, /lk-demo-/, 'the demo secret appears in no output')
})
