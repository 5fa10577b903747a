// The image's runtime stage holds what scripts/image-layout.mjs lays out (the Dockerfile runs it):
// the bundled CLI and, of node_modules, only the native addon it cannot bundle. No Docker engine
// runs here, so the same layout is made in a temporary directory with no node_modules above it,
// and the CLI is run from there: a collector on a SQLite store loads better-sqlite3 as the image
// would, and a package the layout left out fails this test, not a deployment.
import t from 'tap'
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { once } from 'node:events'

t.test('the CLI runs from the image layout alone: a collector opens its SQLite store', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-image-'))
  const app = join(dir, 'app')
  const said = execFileSync(process.execPath, ['scripts/image-layout.mjs', app], { encoding: 'utf8' })
  t.match(said, /better-sqlite3, bindings, file-uri-to-path/, 'the addon and what it loads')
  t.same(readdirSync(join(app, 'node_modules')).sort(), ['better-sqlite3', 'bindings', 'file-uri-to-path'], 'and nothing else of node_modules')
  t.notOk(existsSync(join(app, 'node_modules/better-sqlite3/deps')), "not the addon's C sources")
  // Resolution walks up from the app: a node_modules above it would hide a missing package.
  for (let d = dir; dirname(d) !== d; d = dirname(d)) t.notOk(existsSync(join(dirname(d), 'node_modules')), `no node_modules in ${dirname(d)}`)

  const cli = join(app, 'dist/bin/latchkey.js')
  t.match(execFileSync(process.execPath, [cli, '--version'], { cwd: dir, encoding: 'utf8' }), /^\d+\.\d+\.\d+/)
  const config = join(dir, 'collector.yaml')
  writeFileSync(config, `version: 1\ncollector:\n  grpc: { host: 127.0.0.1, port: 0 }\n  http: { host: 127.0.0.1, port: 0 }\n  store: { kind: sqlite, path: ${join(dir, 'audit.db')} }\n  sidecars: []\n`)
  const collector = spawn(process.execPath, [cli, 'collector', '-c', config], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => void collector.kill('SIGKILL'))
  let out = ''
  let err = ''
  collector.stderr.on('data', (c: Buffer) => (err += c.toString()))
  const httpUrl = await new Promise<string>((resolve, reject) => {
    collector.stdout.on('data', (c: Buffer) => {
      out += c.toString()
      const m = /"httpUrl":"([^"]+)"/.exec(out)
      if (m) resolve(m[1]!)
    })
    collector.once('exit', (code) => reject(new Error(`collector exited ${code}: ${err || out}`)))
  })
  const ready = await fetch(`${httpUrl}/readyz`)
  t.same([ready.status, await ready.json()], [200, { ready: true, store: 'sqlite' }], 'its SQLite store answers')
  const verify = execFileSync(process.execPath, [cli, 'audit', 'verify', '-c', config], { cwd: dir, encoding: 'utf8' })
  t.match(verify, /verified/i, 'and `audit verify` reads it read-only, by the reader worker the bundle starts')
  collector.kill('SIGTERM')
  const [code] = (await once(collector, 'exit')) as [number]
  t.equal(code, 0, 'and it stops cleanly')
})
