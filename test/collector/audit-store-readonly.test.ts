// `latchkey audit -c` and `audit verify -c` read the store the collector config names, and only
// read it: a path or schema that is not there (a typo, a volume not mounted) is one line naming
// the setting and the place, exit 1, and nothing is created. Found by a black-box probe: both
// commands created an empty store on the spot and answered "0 call(s)", "chain verified: 0
// events", exit 0 (on PostgreSQL running the migration's DDL from a read-only query).
import t, { type Test } from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import Database from 'better-sqlite3'
import { SqliteAuditStore } from '../../collector/store/sqlite.js'
import { PostgresAuditStore } from '../../collector/store/postgres.js'
import { PG_URL, seqEvents, uniqueSchema } from './events.js'
import { CLI } from '../helpers/cli.js'
import { auditInProcess } from '../helpers/audit-cli.js'

const run = promisify(execFile)
/** `latchkey …` as a process: kept for a few cases, which prove the wiring (exit 1 and the one line on stderr, a real start's output). */
const cliProcess = (args: string[]) =>
  run(process.execPath, [CLI, ...args], { encoding: 'utf8' }).then(
    (r) => ({ code: 0, stdout: r.stdout, stderr: r.stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  )
/** The same commands in-process (helpers/audit-cli.ts): the rest of the cases, ~0.25 s of CPU less each. */
const cli = auditInProcess

const AGENT = 'agent:summarizer:test:a1'
const SIDECAR = 'sidecar-a'

/** Both read commands against one config: [what, argv]. */
const commands = (cfg: string): [string, string[]][] => [
  ['audit --agent', ['audit', '--agent', AGENT, '-c', cfg]],
  ['audit verify', ['audit', 'verify', '-c', cfg]],
]

function sqliteConfig(dir: string, path: string): string {
  const cfg = join(dir, 'collector.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: sqlite, path: ${JSON.stringify(path)} }\n  sidecars: []\n`)
  return cfg
}

/** Exit 1, nothing on stdout, and exactly this one line on stderr (no stack, no "0 call(s)"). */
function refused(t: Test, r: { code: number; stdout: string; stderr: string }, line: string, what: string): void {
  t.same([r.code, r.stdout, r.stderr], [1, '', `${line}\n`], `${what}: exit 1, one line: ${line}`)
}

t.test('sqlite: a store path with a typo in it is an error, and no file is created', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const path = join(dir, 'audti.db')
  const cfg = sqliteConfig(dir, path)
  for (const [what, argv] of commands(cfg)) {
    refused(t, await cliProcess(argv), `collector.store.path: no audit store at ${path}: no such file; nothing was created (is the path right, the volume mounted?)`, what)
    t.same(readdirSync(dir), ['collector.yaml'], `${what}: no store file (nor journal) was created`)
  }
})

t.test('sqlite: a store on a volume that is not mounted is an error, and no directory or file is created', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const volume = join(dir, 'mnt', 'audit')
  const path = join(volume, 'latchkey-audit.db')
  const cfg = sqliteConfig(dir, path)
  for (const [what, argv] of commands(cfg)) {
    refused(t, await cli(argv), `collector.store.path: no audit store at ${path}: no such directory ${volume}; nothing was created (is the path right, the volume mounted?)`, what)
    t.notOk(existsSync(join(dir, 'mnt')), `${what}: nothing was created`)
  }
})

t.test('sqlite: a file that is not an audit store is an error, and is left as it was', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // Another SQLite database (the broker's, say) and a file that is no database at all.
  const broker = join(dir, 'broker.db')
  const db = new Database(broker)
  db.exec('CREATE TABLE revocations (jti TEXT PRIMARY KEY)')
  db.close()
  const text = join(dir, 'notes.txt')
  writeFileSync(text, 'not a database, but long enough to be read as one: '.repeat(4))
  const tables = () => {
    const d = new Database(broker, { readonly: true })
    try {
      return (d.prepare('SELECT name FROM sqlite_master').all() as { name: string }[]).map((r) => r.name)
    } finally {
      d.close()
    }
  }
  for (const [what, argv] of commands(sqliteConfig(dir, broker))) {
    refused(t, await cli(argv), `collector.store.path: ${broker} is not a Latchkey audit store: no table audit_events, audit_cursors; nothing was changed`, what)
    t.same(tables(), ['revocations', 'sqlite_autoindex_revocations_1'], `${what}: no table was created in it`)
  }
  const before = readFileSync(text)
  for (const [what, argv] of commands(sqliteConfig(dir, text))) {
    refused(t, await cli(argv), `collector.store.path: ${text} is not an audit store: file is not a database; nothing was changed`, what)
    t.same(readFileSync(text), before, `${what}: the file is unchanged`)
  }
  for (const [what, argv] of commands(sqliteConfig(dir, dir))) refused(t, await cli(argv), `collector.store.path: ${dir} is a directory, not an audit store`, what)
})

t.test('sqlite: an existing store is read as before', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const path = join(dir, 'audit.db')
  const store = new SqliteAuditStore(path)
  await store.append(SIDECAR, seqEvents(1, 4))
  const cfg = sqliteConfig(dir, path)
  // While the collector still has it open (and appends), and after it closed it.
  for (const open of [true, false]) {
    // Through the CLI while the collector has it open; in-process after.
    const cli = open ? cliProcess : auditInProcess
    const calls = await cli(['audit', '--agent', AGENT, '-c', cfg])
    t.same([calls.code, calls.stdout.trim().split('\n').length, calls.stderr], [0, open ? 4 : 6, `${open ? 4 : 6} call(s) by ${AGENT} since 24h\n`], `audit (collector ${open ? 'running' : 'stopped'})`)
    const verify = await cli(['audit', 'verify', '-c', cfg])
    t.same([verify.code, verify.stdout], [0, `chain verified: ${open ? 4 : 6} events across 1 sidecars\n`], `audit verify (collector ${open ? 'running' : 'stopped'})`)
    if (open) {
      await store.append(SIDECAR, seqEvents(5, 6))
      await store.close()
    }
  }
})

t.test('postgres: a schema with a typo in it is an error naming it and where, and nothing is created', async (t) => {
  const admin = new pg.Client({ connectionString: PG_URL })
  await admin.connect()
  const schema = uniqueSchema()
  const empty = uniqueSchema()
  t.teardown(async () => {
    await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)
    await admin.query(`DROP SCHEMA IF EXISTS ${empty} CASCADE`)
    await admin.end()
  })
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // The URL carries a password (trust auth ignores it): it must not be shown.
  const url = new URL(PG_URL)
  if (!url.password) url.password = 'LKCANARYpw'
  const where = `${url.hostname}:${url.port || '5432'}${url.pathname}`
  const config = (name: string) => {
    const cfg = join(dir, `${name}.yaml`)
    writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: postgres, url: ${JSON.stringify(url.href)}, schema: ${name} }\n  sidecars: []\n`)
    return cfg
  }
  const exists = async () => (await admin.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [schema])).rowCount !== 0
  for (const [what, argv] of commands(config(schema))) {
    const r = await cli(argv)
    refused(t, r, `collector.store.schema: no audit store at ${where}: no schema "${schema}"; nothing was created (is the schema right, the database?)`, what)
    t.notMatch(r.stderr, url.password, `${what}: no password in the message`)
    t.notOk(await exists(), `${what}: the schema was not created`)
  }
  // A schema that exists without the tables: none is created in it either.
  await admin.query(`CREATE SCHEMA ${empty}`)
  for (const [what, argv] of commands(config(empty))) {
    refused(t, await cli(argv), `collector.store.schema: schema "${empty}" at ${where} is not a Latchkey audit store: no table audit_events, audit_cursors; nothing was changed`, what)
    const objects = await admin.query(
      `SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
       UNION ALL SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1`,
      [empty],
    )
    t.same(objects.rows, [], `${what}: no table, index or function was created`)
  }
})

t.test('postgres: an existing store is read as before', async (t) => {
  const schema = uniqueSchema()
  const store = new PostgresAuditStore({ url: PG_URL, schema })
  t.teardown(async () => {
    await store.dropSchema()
    await store.close()
  })
  await store.append(SIDECAR, seqEvents(1, 3))
  const dir = mkdtempSync(join(tmpdir(), 'lk-ro-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const cfg = join(dir, 'collector.yaml')
  writeFileSync(cfg, `version: 1\ncollector:\n  store: { kind: postgres, url: ${JSON.stringify(PG_URL)}, schema: ${schema} }\n  sidecars: []\n`)
  const calls = await cli(['audit', '--agent', AGENT, '-c', cfg, '--json'])
  t.same([calls.code, calls.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { sequence: number }).sequence)], [0, [1, 2, 3]], 'audit')
  const latest = await cli(['audit', '--agent', AGENT, '-c', cfg, '--json', '--newest', '--limit', '2'])
  t.same([latest.code, latest.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { sequence: number }).sequence)], [0, [3, 2]], 'audit --newest: the latest, newest first')
  const verify = await cli(['audit', 'verify', '-c', cfg])
  t.same([verify.code, verify.stdout], [0, 'chain verified: 3 events across 1 sidecars\n'], 'audit verify')
})
