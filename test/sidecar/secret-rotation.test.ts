// A secrets file rotated under a running sidecar, as Kubernetes does it: the Secret is a directory
// whose file is a symlink through `..data`, and kubelet swaps `..data` for a new timestamped
// directory in one rename. The sidecar is the CLI process; the upstream records what it is sent.
import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdirSync, mkdtempSync, renameSync, symlinkSync, writeFileSync } from 'node:fs'
import { createServer, request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import { once } from 'node:events'
import { Client } from 'undici'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { loopbackPolicy, startTestSidecar, startUpstream, type Upstream } from '../helpers/harness.js'
import { CLI } from '../helpers/cli.js'
import { SecretsFileWatcher, signature } from '../../proxy/credentials/secrets-reload.js'
import { StaticSecretSource } from '../../proxy/credentials/static-source.js'

const canary = (tag: string) => `LKROT${tag}${randomBytes(10).toString('hex')}`

/** A directory laid out as a mounted Kubernetes Secret with one key, secrets.yaml. */
class SecretMount {
  readonly dir = mkdtempSync(join(tmpdir(), 'lk-rot-'))
  readonly file = join(this.dir, 'secrets.yaml')
  private n = 0
  constructor(text: string) {
    this.version(text)
    symlinkSync(`..${this.stamp()}`, join(this.dir, '..data'))
    symlinkSync('..data/secrets.yaml', this.file)
  }
  private stamp(): string {
    return `2026_12_03_23_00_00.${String(this.n).padStart(9, '0')}`
  }
  private version(text: string): void {
    this.n++
    mkdirSync(join(this.dir, `..${this.stamp()}`))
    writeFileSync(join(this.dir, `..${this.stamp()}`, 'secrets.yaml'), text)
  }
  /** kubelet's swap: a new timestamped directory, then `..data_tmp` renamed over `..data`. */
  rotate(text: string): void {
    this.version(text)
    symlinkSync(`..${this.stamp()}`, join(this.dir, '..data_tmp'))
    renameSync(join(this.dir, '..data_tmp'), join(this.dir, '..data'))
  }
}

interface Proc {
  child: ChildProcess
  port: number
  adminPort: number
  stdout: string[]
}

async function spawnSidecar(t: { teardown(fn: () => unknown): void }, upstream: Upstream, secretsFile: string, intervalMs: number): Promise<Proc> {
  const dir = mkdtempSync(join(tmpdir(), 'lk-rot-cfg-'))
  const configPath = join(dir, 'config.yaml')
  const port = upstream.port
  writeFileSync(
    configPath,
    `version: 1
sidecar: { listen: { port: 0 }, admin: { port: 0 }, timeouts: { drain_ms: 500 } }
policy: { default: deny, rules: [ { id: up, action: allow, hosts: ["127.0.0.1"], ports: [${port}] } ] }
network: { allow: [ { cidr: 127.0.0.1/32, ports: [${port}] } ] }
credentials: [ { id: up, audience: "http://127.0.0.1:${port}", source: static, secret: TOKEN, inject: { type: bearer } } ]
secrets: { file: ${secretsFile}, reload_interval_ms: ${intervalMs} }
audit: { jsonl: { path: ${join(dir, 'audit.jsonl')}, flush_ms: 5 } }
`,
  )
  const env = { ...process.env }
  delete env.LATCHKEY_SECRET_TOKEN
  const child = spawn(process.execPath, [CLI, 'sidecar', '--config', configPath], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void child.kill('SIGKILL'))
  const stdout: string[] = []
  const stderr: string[] = []
  child.stderr!.on('data', (c: Buffer) => stderr.push(c.toString()))
  const ports = await new Promise<{ port: number; adminPort: number }>((resolve, reject) => {
    child.stdout!.on('data', (c: Buffer) => {
      for (const line of c.toString().split('\n').filter(Boolean)) {
        stdout.push(line)
        const m = JSON.parse(line) as { msg: string; port: number; adminPort: number }
        if (m.msg === 'sidecar listening') resolve(m)
      }
    })
    child.once('exit', (code) => reject(new Error(`sidecar exited ${code}: ${stderr.join('')}`)))
  })
  return { child, stdout, ...ports }
}

/** A GET through the sidecar as a forward proxy. */
function get(p: Proc, upstream: Upstream, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port: p.port, path: `${upstream.origin}${path}`, headers: { host: `127.0.0.1:${upstream.port}` } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }))
    })
    req.on('error', reject)
    req.end()
  })
}

/** Polls `probe` until it returns true, or fails after `ms`: a bound, not a sleep that asserts timing. */
async function until(probe: () => Promise<boolean> | boolean, ms = 2000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await probe()) return true
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
  return false
}

/** The Authorization the upstream was sent by a call made now. */
async function sentAuth(p: Proc, upstream: Upstream): Promise<string | undefined> {
  const before = upstream.requests.length
  const r = await get(p, upstream, '/who')
  if (r.status !== 200) return `status ${r.status}`
  return upstream.requests.slice(before).at(-1)?.headers.authorization
}

async function reloads(p: Proc): Promise<Record<string, number>> {
  const text = await new Promise<string>((resolve, reject) => {
    httpRequest({ host: '127.0.0.1', port: p.adminPort, path: '/metrics' }, (res) => {
      let s = ''
      res.on('data', (c: Buffer) => (s += c.toString()))
      res.on('end', () => resolve(s))
    })
      .on('error', reject)
      .end()
  })
  const counts: Record<string, number> = {}
  for (const m of text.matchAll(/^latchkey_secrets_reloads_total\{outcome="(\w+)"\} (\d+)$/gm)) counts[m[1]!] = Number(m[2])
  return counts
}

const rejections = (p: Proc) => p.stdout.filter((l) => l.includes('secrets.file reload rejected'))

t.test('a rotated Kubernetes Secret is sent from the next calls; a bad one is refused and the old kept; the old value stays scrubbed', async (t) => {
  const OLD = canary('OLD')
  const NEW = canary('NEW')
  let echo = ''
  const upstream = await startUpstream({
    handler: (req, res) => {
      if (req.url !== '/echo') return false
      res.writeHead(200, { 'content-type': 'text/plain' }).end(`you sent ${echo}`)
      return true
    },
  })
  t.teardown(() => upstream.close())
  const mount = new SecretMount(`TOKEN: ${OLD}\n`)
  const p = await spawnSidecar(t, upstream, mount.file, 50)
  t.equal(await sentAuth(p, upstream), `Bearer ${OLD}`, 'the first value is sent')

  mount.rotate(`TOKEN: ${NEW}\n`)
  t.ok(await until(async () => (await sentAuth(p, upstream)) === `Bearer ${NEW}`), 'the new value is sent within the bound')
  const after: (string | undefined)[] = []
  for (let i = 0; i < 5; i++) after.push(await sentAuth(p, upstream))
  t.same(after, Array(5).fill(`Bearer ${NEW}`), 'and never the old one after that')

  echo = OLD
  const echoed = await get(p, upstream, '/echo')
  t.equal(echoed.status, 200)
  t.notOk(echoed.body.includes(OLD), 'a response echoing the old value is still scrubbed')
  echo = NEW
  t.notOk((await get(p, upstream, '/echo')).body.includes(NEW), 'as is one echoing the new')

  const BAD = canary('BAD')
  const bad: [string, RegExp][] = [
    [`TOKEN: [${BAD}\n`, /not YAML this sidecar reads/],
    [`- ${BAD}\n`, /must be a mapping of name to secret/],
    ['TOKEN: 123456789012345678\n', /secret TOKEN is not a string \(quote it\)/],
  ]
  for (const [text, why] of bad) {
    const seen = rejections(p).length
    mount.rotate(text)
    t.ok(await until(() => rejections(p).length > seen), `refused: ${why.source}`)
    t.equal(rejections(p).length, seen + 1, 'said in one line')
    t.match(JSON.parse(rejections(p).at(-1)!), { level: 40, reason: why })
    t.equal(await sentAuth(p, upstream), `Bearer ${NEW}`, 'the secret in force keeps working')
  }
  const out = p.stdout.join('\n')
  for (const [name, secret] of [['old', OLD], ['new', NEW], ['refused', BAD], ['number', '123456789012345678']]) t.notOk(out.includes(secret!), `no log line holds the ${name} value`)
  t.same(await reloads(p), { changed: 1, rejected: 3 }, 'the metric counts each outcome')
})

t.test('reload_interval_ms: 0 reads the file again on SIGHUP only', async (t) => {
  const OLD = canary('OLD')
  const NEW = canary('NEW')
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const mount = new SecretMount(`TOKEN: ${OLD}\n`)
  const p = await spawnSidecar(t, upstream, mount.file, 0)
  mount.rotate(`TOKEN: ${NEW}\n`)
  t.equal(await sentAuth(p, upstream), `Bearer ${OLD}`, 'not read without a signal')
  p.child.kill('SIGHUP')
  t.ok(await until(async () => (await sentAuth(p, upstream)) === `Bearer ${NEW}`), 'read again on SIGHUP')
  t.ok(p.stdout.some((l) => l.includes('SIGHUP: the audit file opened anew')), 'what SIGHUP did before still happens')
  p.child.kill('SIGHUP')
  t.ok(await until(async () => (await reloads(p)).unchanged === 1), 'a SIGHUP with nothing new is counted unchanged')
  t.same(await reloads(p), { changed: 1, unchanged: 1 })
})

t.test('a rotated OAuth client secret is sent from the next token request', async (t) => {
  const OLD = canary('OLDCLIENT')
  const NEW = canary('NEWCLIENT')
  const sent: string[] = []
  let skew = 0
  // An authorization server answering client_secret_post with a token usable for 1 s (6 s, less
  // the 5 s the cache wants left): the clock is moved past that, so the next call asks again.
  const as = createServer((req, res) => {
    let body = ''
    req.on('data', (c: Buffer) => (body += c.toString()))
    req.on('end', () => {
      sent.push(new URLSearchParams(body).get('client_secret') ?? '')
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ access_token: `tok${sent.length}`, token_type: 'Bearer', expires_in: 6 }))
    })
  })
  as.listen(0, '127.0.0.1')
  await once(as, 'listening')
  const asUrl = `http://127.0.0.1:${(as.address() as AddressInfo).port}/token`
  const up = await startUpstream()
  const mount = new SecretMount(`CLIENT_SECRET: ${OLD}\n`)
  const s = await startTestSidecar({
    ...loopbackPolicy([up.port]),
    secrets: { file: mount.file, reload_interval_ms: 0 },
    credentials: [{ id: 'cc', audience: up.origin, source: 'client_credentials', oauth: { token_url: asUrl, client_id: 'c', client_secret: 'CLIENT_SECRET', auth_method: 'client_secret_post' }, inject: { type: 'bearer' } }],
  }, {}, { now: () => Date.now() + skew })
  t.teardown(async () => {
    await s.close()
    await up.close()
    as.closeAllConnections()
    as.close()
  })
  const call = async () => {
    const c = new Client(s.proxy)
    const res = await c.request({ method: 'GET', path: `${up.origin}/r`, headers: { host: `127.0.0.1:${up.port}` } })
    await res.body.text()
    await c.close()
    return res.statusCode
  }
  t.equal(await call(), 200)
  t.same(sent, [OLD], 'the first token asked for with the first secret')
  mount.rotate(`CLIENT_SECRET: ${NEW}\n`)
  t.match(await s.sidecar.reloadSecrets(), { outcome: 'changed' })
  skew = 2000
  t.equal(await call(), 200)
  t.equal(sent.length, 2, 'a new token was asked for')
  t.equal(sent.at(-1), NEW, 'with the rotated secret')
})

t.test('a rotation while the sidecar starts, after it read the file and before its first poll, is read at that poll', async (t) => {
  const m = new SecretMount('S: "before-LKROT-0123456789"\n')
  // What start-up does: the signature first, then the read.
  const atStart = await signature(m.file)
  const source = new StaticSecretSource({ file: m.file, env_prefix: 'LK_ROT_UNSET_' }, ['S'], {})
  m.rotate('S: "after-LKROT-0123456789"\n')
  const outcomes: string[] = []
  const watcher = new SecretsFileWatcher(m.file, source, undefined, (r) => outcomes.push(r.outcome), 20, atStart)
  t.teardown(() => watcher.close())
  for (const stop = Date.now() + 3_000; outcomes.length === 0 && Date.now() < stop; ) await new Promise((r) => setTimeout(r, 10))
  t.same(outcomes, ['changed'], 'the first poll saw the change')
  t.equal(source.secret('S'), 'after-LKROT-0123456789', 'and the new value is the one sent')
})
