// The embedded store: one SQLite file (WAL, synchronous=FULL so a commit is on disk before the
// collector acks it). Append-only by construction: the only write path is append(), and triggers
// refuse UPDATE and DELETE on the events table. Through lib/sqlite.ts: statements prepared once
// and kept, no iterate(), so Node 24's garbage collector never destroys a better-sqlite3 object.
// The heavy reads (events, inventory, verify) run in worker threads on connections of their own
// (sqlite-reader.ts): better-sqlite3 is synchronous, and they held the ingest's event loop for seconds.
// The collector opens it with `new` (creates the file, migrates); a reader (`latchkey audit -c`)
// with openReadOnly(): an existing file only, read-only, nothing created or written.
import { statSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { Worker } from 'node:worker_threads'
import { openDatabase, pragma, statement, type Database } from '../../lib/sqlite.js'
import type { SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import { GENESIS, INGEST_CURSOR, askableIds, chainRows, isDenied, newEvents, rowToStored, toStored } from './chain.js'
import type { AppendResult, AuditStore, EventQuery, Inventory, StoredEvent, VerifyResult } from './types.js'
import { AUDIT_CURSORS_SHAPE, AUDIT_EVENTS_SHAPE, StoreError } from './types.js'
import { assertShape, sqliteShape, storeStartupError } from '../../lib/store-schema.js'
import { packEvents, readEvents, readInventory, readVerify, unpackEvents, type PackedEvents } from './sqlite-reads.js'
import type { ReadAnswer, ReadRequest } from './sqlite-reader.js'

const SCHEMA = `
CREATE TABLE IF NOT EXISTS audit_events (
  sidecar    TEXT    NOT NULL,
  seq        INTEGER NOT NULL,
  pos        INTEGER NOT NULL,
  id         TEXT    NOT NULL,
  ts         INTEGER NOT NULL,
  agent      TEXT    NOT NULL,
  agent_type TEXT    NOT NULL,
  host       TEXT    NOT NULL,
  port       INTEGER NOT NULL,
  action     INTEGER NOT NULL,
  audience   TEXT    NOT NULL,
  received   INTEGER NOT NULL,
  payload    BLOB    NOT NULL,
  prev       BLOB    NOT NULL,
  hash       BLOB    NOT NULL,
  PRIMARY KEY (sidecar, seq),
  UNIQUE (sidecar, pos)
);
CREATE TABLE IF NOT EXISTS audit_cursors (
  name    TEXT    NOT NULL,
  sidecar TEXT    NOT NULL,
  pos     INTEGER NOT NULL,
  PRIMARY KEY (name, sidecar)
);
`

/** After the tables' shape was checked (an index or trigger on a missing column would fail with the bare SQL error). */
const GUARDS = `
CREATE INDEX IF NOT EXISTS audit_events_agent_ts ON audit_events (agent, ts);
CREATE INDEX IF NOT EXISTS audit_events_id ON audit_events (id);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END;
`

/** The setting that names the file, for messages. */
const PATH_SETTING = 'collector.store.path'

/** The store's tables and the shape each must have. */
const TABLES = [
  ['audit_events', AUDIT_EVENTS_SHAPE],
  ['audit_cursors', AUDIT_CURSORS_SHAPE],
] as const

/**
 * Opens an existing file read-only (the reader's open): never creates it. A file that is not
 * there, or cannot be opened, is said in one line naming the setting and the path.
 */
function openExisting(path: string): Database.Database {
  try {
    return openDatabase(path, { readonly: true, fileMustExist: true })
  } catch (err) {
    const st = statSync(path, { throwIfNoEntry: false })
    if (!st) {
      const dir = dirname(resolve(path))
      const why = statSync(dir, { throwIfNoEntry: false }) ? 'no such file' : `no such directory ${dir}`
      throw new StoreError('LK_STORE_MISSING', `${PATH_SETTING}: no audit store at ${path}: ${why}; nothing was created (is the path right, the volume mounted?)`)
    }
    if (st.isDirectory()) throw new StoreError('LK_STORE_MISSING', `${PATH_SETTING}: ${path} is a directory, not an audit store`)
    throw storeStartupError(PATH_SETTING, path, err)
  }
}

export class SqliteAuditStore implements AuditStore {
  readonly kind = 'sqlite' as const
  readonly db: Database.Database
  private readonly appendTx: (sidecar: string, events: SequencedEvent[]) => AppendResult

  /**
   * A reader's open: the file must exist and hold the store's tables; opened read-only (the
   * connection cannot write, nor can its reader threads'), nothing created, migrated or changed.
   * Rejects (StoreError LK_STORE_MISSING) naming collector.store.path and the path otherwise.
   */
  static openReadOnly(path: string): Promise<SqliteAuditStore> {
    try {
      return Promise.resolve(new SqliteAuditStore(path, true))
    } catch (err) {
      return Promise.reject(err as Error)
    }
  }

  /** The collector's open (creates the file and tables when missing); readOnly: see openReadOnly(). */
  constructor(
    readonly path: string,
    readonly readOnly = false,
  ) {
    this.db = readOnly ? openExisting(path) : openDatabase(path)
    this.reader = new ReadWorker(path, readOnly)
    this.verifier = new ReadWorker(path, readOnly)
    try {
      if (readOnly) {
        pragma(this.db, 'busy_timeout = 5000')
        pragma(this.db, 'query_only = ON')
        this.checkTables(true)
      } else {
        pragma(this.db, 'journal_mode = WAL')
        pragma(this.db, 'synchronous = FULL')
        pragma(this.db, 'busy_timeout = 5000')
        this.db.exec(SCHEMA)
        this.checkTables(false)
        this.db.exec(GUARDS)
      }
    } catch (err) {
      this.db.close()
      throw err
    }
    const head = statement<[string], { pos: number; hash: Buffer }>(this.db, 'SELECT pos, hash FROM audit_events WHERE sidecar = ? ORDER BY pos DESC LIMIT 1')
    // The head each append reached, outside the chain: verify's anchor for a removed tail.
    const saveHead = statement(this.db, 'INSERT INTO audit_cursors (name, sidecar, pos) VALUES (?, ?, ?) ON CONFLICT (name, sidecar) DO UPDATE SET pos = max(pos, excluded.pos)')
    const maxSeq = statement<[string], { seq: number | null }>(this.db, 'SELECT max(seq) AS seq FROM audit_events WHERE sidecar = ?')
    const byId = statement<[string], { sidecar: string; seq: number; id: string }>(this.db, 'SELECT sidecar, seq, id FROM audit_events WHERE id IN (SELECT value FROM json_each(?))')
    const existing = statement<[string, number, number], { seq: number; id: string }>(this.db, 'SELECT seq, id FROM audit_events WHERE sidecar = ? AND seq BETWEEN ? AND ?')
    const insert = statement(
      this.db,
      `INSERT INTO audit_events (sidecar, seq, pos, id, ts, agent, agent_type, host, port, action, audience, received, payload, prev, hash)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    )
    this.appendTx = this.db.transaction((sidecar: string, events: SequencedEvent[]): AppendResult => {
      let lo = Infinity
      let hi = 0
      for (const e of events) {
        if (e.sequence < lo) lo = e.sequence
        if (e.sequence > hi) hi = e.sequence
      }
      const stored = new Map<number, string>()
      if (events.length > 0 && Number.isSafeInteger(lo)) for (const r of existing.all(sidecar, lo, hi)) stored.set(r.seq, r.id)
      // Where each of the batch's IDs is stored already (a resend's own row too: a resend is
      // skipped before its ID is looked at). IDs the batch check refuses anyway are not asked for.
      const ids = new Map(byId.all(JSON.stringify(askableIds(events))).map((r) => [r.id, { sidecar: r.sidecar, sequence: r.seq }]))
      const fresh = newEvents(sidecar, events, stored, maxSeq.get(sidecar)?.seq ?? 0, ids)
      const h = head.get(sidecar)
      const rows = chainRows(sidecar, fresh, h?.pos ?? 0, h?.hash ?? GENESIS)
      const now = Date.now()
      for (const r of rows) {
        insert.run(sidecar, r.sequence, r.position, r.id, r.ts, r.agent, r.agentType, r.host, r.port, r.action, r.audience, now, r.payload, r.prev, r.hash)
      }
      if (rows.length > 0) saveHead.run(INGEST_CURSOR, sidecar, rows[rows.length - 1]!.position)
      return {
        stored: rows.length,
        duplicates: events.length - rows.length,
        highest: hi,
        events: rows.map((r) => rowToStored(sidecar, r)),
      }
    })
  }

  /**
   * Throws StoreSchemaError for an existing table that lacks what the code needs; read-only, also
   * StoreError LK_STORE_MISSING when a table is not there at all (or the file is no database), and
   * any other failure to read the file in one line naming the setting (LK_STARTUP).
   */
  private checkTables(mustExist: boolean): void {
    const missing: string[] = []
    try {
      for (const [table, shape] of TABLES) {
        const actual = sqliteShape(this.db, table)
        if (actual) assertShape({ ...shape, name: `${table} in ${this.path}` }, actual, 'collector.store')
        else missing.push(table)
      }
    } catch (err) {
      if (!mustExist) throw err
      if ((err as { code?: string }).code === 'SQLITE_NOTADB') throw new StoreError('LK_STORE_MISSING', `${PATH_SETTING}: ${this.path} is not an audit store: ${(err as Error).message}; nothing was changed`)
      // A table of the wrong shape as it is; anything else (unreadable, locked) in one line naming the setting.
      throw storeStartupError(PATH_SETTING, this.path, err)
    }
    if (mustExist && missing.length > 0) {
      throw new StoreError('LK_STORE_MISSING', `${PATH_SETTING}: ${this.path} is not a Latchkey audit store: no table ${missing.join(', ')}; nothing was changed`)
    }
  }

  /** Opened read-only: a write is refused before it reaches the database (which would refuse it too). */
  private refuseWrite(what: string): Promise<never> {
    return Promise.reject(new StoreError('LK_STORE_UNAVAILABLE', `sqlite store ${this.path} is open read-only: ${what} refused`))
  }

  /** The constructor checked the tables (and threw); nothing is left to wait for. */
  checkSchema(): Promise<void> {
    return Promise.resolve()
  }

  append(sidecar: string, events: SequencedEvent[]): Promise<AppendResult> {
    if (this.readOnly) return this.refuseWrite('append')
    try {
      return Promise.resolve(this.appendTx(sidecar, events))
    } catch (err) {
      return Promise.reject(err instanceof StoreError ? err : new StoreError('LK_STORE_UNAVAILABLE', `sqlite append failed: ${(err as Error).message}`))
    }
  }

  /** The heavy reads, each in a worker thread on a connection of its own (sqlite-reader.ts). */
  private readonly reader: ReadWorker
  /** verify has a worker of its own: a long verify must not hold the queries up behind it. */
  private readonly verifier: ReadWorker

  eventsByAgent(q: EventQuery): Promise<StoredEvent[]> {
    return this.reader.run<PackedEvents>({ op: 'events', query: q }, () => packEvents(readEvents(this.db, q))).then((packed) =>
      unpackEvents(packed).map((r) => toStored(r.sidecar, { sequence: r.seq, position: r.pos, payload: r.payload, hash: r.hash })),
    )
  }

  inventory(): Promise<Inventory> {
    return this.reader.run<Inventory>({ op: 'inventory' }, () => readInventory(this.db))
  }

  verify(sidecar?: string): Promise<VerifyResult> {
    return this.verifier.run<VerifyResult>({ op: 'verify', sidecar }, () => readVerify(this.db, sidecar))
  }

  after(sidecar: string, position: number, limit: number): Promise<StoredEvent[]> {
    const rows = statement<[string, number, number], { seq: number; pos: number; payload: Buffer; hash: Buffer }>(
      this.db,
      'SELECT seq, pos, payload, hash FROM audit_events WHERE sidecar = ? AND pos > ? ORDER BY pos LIMIT ?',
    ).all(sidecar, position, limit)
    return Promise.resolve(rows.map((r) => toStored(sidecar, { sequence: r.seq, position: r.pos, payload: r.payload, hash: r.hash })))
  }

  heads(): Promise<Map<string, number>> {
    const rows = statement<[], { sidecar: string; pos: number }>(this.db, 'SELECT sidecar, max(pos) AS pos FROM audit_events GROUP BY sidecar').all()
    return Promise.resolve(new Map(rows.map((r) => [r.sidecar, r.pos])))
  }

  cursors(name: string): Promise<Map<string, number>> {
    const rows = statement<[string], { sidecar: string; pos: number }>(this.db, 'SELECT sidecar, pos FROM audit_cursors WHERE name = ?').all(name)
    return Promise.resolve(new Map(rows.map((r) => [r.sidecar, r.pos])))
  }

  saveCursors(name: string, positions: Map<string, number>): Promise<void> {
    if (this.readOnly) return this.refuseWrite('saveCursors')
    const up = statement(this.db, 'INSERT INTO audit_cursors (name, sidecar, pos) VALUES (?, ?, ?) ON CONFLICT (name, sidecar) DO UPDATE SET pos = max(pos, excluded.pos)')
    this.db.transaction(() => {
      for (const [sidecar, pos] of positions) up.run(name, sidecar, pos)
    })()
    return Promise.resolve()
  }

  ping(): Promise<void> {
    try {
      statement<[], { one: number }>(this.db, 'SELECT 1 AS one FROM audit_events LIMIT 1').get()
      return Promise.resolve()
    } catch (err) {
      return Promise.reject(new StoreError('LK_STORE_UNAVAILABLE', `sqlite unreadable: ${(err as Error).message}`))
    }
  }

  async close(): Promise<void> {
    await Promise.all([this.reader.close(), this.verifier.close()])
    this.db.close()
  }
}

type Distribute<T> = T extends unknown ? Omit<T, 'id'> : never

/**
 * A worker thread running sqlite-reader.ts, started on the first request (a store that is never
 * queried starts none) and started again after it failed. Holds the process open only while a
 * request is in flight. A store with no file (":memory:", "") cannot be opened a second time:
 * its reads run in-process (`inline`).
 */
class ReadWorker {
  private worker: Worker | null = null
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>()
  private next = 1
  private closed = false
  private readonly inProcess: boolean

  /** readOnly: the worker's connection is opened read-only too (it is `query_only` either way). */
  constructor(
    private readonly path: string,
    private readonly readOnly: boolean,
  ) {
    this.inProcess = path === '' || path === ':memory:' || path.startsWith('file::memory:')
  }

  run<T>(request: Distribute<ReadRequest>, inline: () => T): Promise<T> {
    if (this.closed) return Promise.reject(new StoreError('LK_STORE_UNAVAILABLE', 'sqlite store closed'))
    if (this.inProcess) {
      try {
        return Promise.resolve(inline())
      } catch (err) {
        return Promise.reject(new StoreError('LK_STORE_UNAVAILABLE', `sqlite read failed: ${(err as Error).message}`))
      }
    }
    const w = this.start()
    const id = this.next++
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject })
      w.ref()
      w.postMessage({ ...request, id })
    })
  }

  private start(): Worker {
    if (this.worker) return this.worker
    const w = new Worker(new URL('./sqlite-reader.js', import.meta.url), { workerData: { path: this.path, readOnly: this.readOnly, latchkeySqliteReader: true } })
    w.unref()
    w.on('message', (a: ReadAnswer) => {
      const p = this.pending.get(a.id)
      if (!p) return
      this.pending.delete(a.id)
      if (this.pending.size === 0) w.unref()
      if (a.ok) p.resolve(a.value)
      else p.reject(new StoreError('LK_STORE_UNAVAILABLE', `sqlite read failed: ${a.message}`))
    })
    const gone = (why: string) => {
      if (this.worker !== w) return
      this.worker = null
      for (const p of this.pending.values()) p.reject(new StoreError('LK_STORE_UNAVAILABLE', `sqlite reader ${why}`))
      this.pending.clear()
    }
    w.on('error', (err) => gone(`failed: ${err.message}`))
    w.on('exit', (code) => gone(`exited (code ${code})`))
    this.worker = w
    return w
  }

  async close(): Promise<void> {
    this.closed = true
    const w = this.worker
    if (!w) return
    // The worker closes its connection and ends; terminate() only if it does not.
    const exited = new Promise<void>((resolve) => w.once('exit', () => resolve()))
    w.ref()
    w.postMessage({ op: 'close' })
    const force = setTimeout(() => void w.terminate(), 2000)
    await exited
    clearTimeout(force)
  }
}

export { isDenied }
