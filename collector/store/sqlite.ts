// The embedded store: one SQLite file (WAL, synchronous=FULL so a commit is on disk before the
// collector acks it). Append-only by construction: the only write path is append(), and triggers
// refuse UPDATE and DELETE on the events table. Through lib/sqlite.ts: statements prepared once
// and kept, no iterate(), so Node 24's garbage collector never destroys a better-sqlite3 object.
import { openDatabase, pragma, statement, type Database } from '../../lib/sqlite.js'
import type { SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import { ChainVerifier, GENESIS, INGEST_CURSOR, askableIds, chainRows, checkAgainstCursors, isDenied, newEvents, rowToStored, toStored } from './chain.js'
import type { AppendResult, AuditStore, EventQuery, Inventory, SequenceGap, StoredEvent, VerifyResult } from './types.js'
import { AUDIT_CURSORS_SHAPE, AUDIT_EVENTS_SHAPE, MAX_LISTED_GAPS, StoreError } from './types.js'
import { assertShape, sqliteShape } from '../../lib/store-schema.js'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'

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

interface DbRow {
  sidecar: string
  seq: number
  pos: number
  id: string
  ts: number
  agent: string
  agent_type: string
  host: string
  port: number
  action: number
  audience: string
  payload: Buffer
  prev: Buffer
  hash: Buffer
}

/** The columns verify reads (both stores). */
export const VERIFY_COLUMNS = 'sidecar, seq, pos, id, ts, agent, agent_type, host, port, action, audience, payload, prev, hash'

export class SqliteAuditStore implements AuditStore {
  readonly kind = 'sqlite' as const
  readonly db: Database.Database
  private readonly appendTx: (sidecar: string, events: SequencedEvent[]) => AppendResult

  constructor(readonly path: string) {
    this.db = openDatabase(path)
    pragma(this.db, 'journal_mode = WAL')
    pragma(this.db, 'synchronous = FULL')
    pragma(this.db, 'busy_timeout = 5000')
    this.db.exec(SCHEMA)
    try {
      for (const [table, shape] of [['audit_events', AUDIT_EVENTS_SHAPE], ['audit_cursors', AUDIT_CURSORS_SHAPE]] as const) {
        const actual = sqliteShape(this.db, table)
        if (actual) assertShape({ ...shape, name: `${table} in ${path}` }, actual, 'collector.store')
      }
    } catch (err) {
      this.db.close()
      throw err
    }
    this.db.exec(GUARDS)
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

  /** The constructor checked the tables (and threw); nothing is left to wait for. */
  checkSchema(): Promise<void> {
    return Promise.resolve()
  }

  append(sidecar: string, events: SequencedEvent[]): Promise<AppendResult> {
    try {
      return Promise.resolve(this.appendTx(sidecar, events))
    } catch (err) {
      return Promise.reject(err instanceof StoreError ? err : new StoreError('LK_STORE_UNAVAILABLE', `sqlite append failed: ${(err as Error).message}`))
    }
  }

  eventsByAgent(q: EventQuery): Promise<StoredEvent[]> {
    const until = q.until?.getTime() ?? Number.MAX_SAFE_INTEGER
    const denied = q.deniedOnly ? `AND action IN (${Action.ACTION_DENY}, ${Action.ACTION_REPORT})` : ''
    // The rows are picked by their payload sizes first (length() reads no blob), so a few huge
    // payloads cannot make one answer hold gigabytes.
    const rows = statement<[string, number, number, number, number], { sidecar: string; seq: number; pos: number; payload: Buffer; hash: Buffer }>(
      this.db,
      `SELECT e.sidecar, e.seq, e.pos, e.payload, e.hash FROM (
         SELECT sidecar AS s, pos AS p, ts AS t, sum(length(payload)) OVER (ORDER BY ts, sidecar, pos ROWS UNBOUNDED PRECEDING) - length(payload) AS before
         FROM audit_events WHERE agent = ? AND ts >= ? AND ts < ? ${denied} ORDER BY ts, sidecar, pos LIMIT ?
       ) AS k JOIN audit_events AS e ON e.sidecar = k.s AND e.pos = k.p
       WHERE k.before < ? ORDER BY k.t, k.s, k.p`,
    ).all(q.agent, q.since.getTime(), until, q.limit ?? 10_000, q.maxBytes ?? Number.MAX_SAFE_INTEGER)
    return Promise.resolve(rows.map((r) => toStored(r.sidecar, { sequence: r.seq, position: r.pos, payload: r.payload, hash: r.hash })))
  }

  inventory(): Promise<Inventory> {
    // As a JSON array: a name may hold any character, a comma included (group_concat's separator).
    const names = (json: string) => (JSON.parse(json) as string[]).sort()
    const agents = statement<[], { agent: string; sidecars: string; first: number; last: number; calls: number; denied: number }>(
      this.db,
      `SELECT agent, json_group_array(DISTINCT sidecar) AS sidecars, min(ts) AS first, max(ts) AS last, count(*) AS calls,
              sum(CASE WHEN action IN (${Action.ACTION_DENY}, ${Action.ACTION_REPORT}) THEN 1 ELSE 0 END) AS denied
       FROM audit_events GROUP BY agent ORDER BY agent`,
    ).all()
    const hosts = statement<[], { agent: string; hp: string }>(
      this.db,
      `SELECT DISTINCT agent, host || ':' || port AS hp FROM audit_events WHERE host <> '' AND action <> ${Action.ACTION_DENY} ORDER BY agent, hp`,
    ).all()
    const auds = statement<[], { agent: string; audience: string }>(
      this.db,
      `SELECT DISTINCT agent, audience FROM audit_events WHERE audience <> '' ORDER BY agent, audience`,
    ).all()
    const sidecars = statement<[], { sidecar: string; agents: string; last: number; events: number; seq: number }>(
      this.db,
      `SELECT sidecar, json_group_array(DISTINCT agent) AS agents, max(received) AS last, count(*) AS events, max(seq) AS seq
       FROM audit_events GROUP BY sidecar ORDER BY sidecar`,
    ).all()
    const byAgent = <T extends { agent: string }>(rows: T[], pick: (r: T) => string) => {
      const m = new Map<string, string[]>()
      for (const r of rows) m.set(r.agent, [...(m.get(r.agent) ?? []), pick(r)])
      return m
    }
    const h = byAgent(hosts, (r) => r.hp)
    const a = byAgent(auds, (r) => r.audience)
    return Promise.resolve({
      agents: agents.map((r) => ({
        agent: r.agent,
        sidecars: names(r.sidecars),
        firstSeen: new Date(r.first),
        lastSeen: new Date(r.last),
        calls: r.calls,
        denied: r.denied,
        hosts: h.get(r.agent) ?? [],
        audiences: a.get(r.agent) ?? [],
      })),
      sidecars: sidecars.map((r) => ({ sidecar: r.sidecar, agents: names(r.agents), lastSeen: new Date(r.last), events: r.events, lastSequence: r.seq })),
    })
  }

  verify(sidecar?: string): Promise<VerifyResult> {
    const ids = sidecar
      ? [sidecar]
      : statement<[], { sidecar: string }>(this.db, 'SELECT DISTINCT sidecar FROM audit_events ORDER BY sidecar')
          .all()
          .map((r) => r.sidecar)
    const page = statement<[string, number], DbRow>(
      this.db,
      `SELECT ${VERIFY_COLUMNS} FROM audit_events WHERE sidecar = ? AND pos > ? ORDER BY pos LIMIT 10000`,
    )
    // Paged per sidecar: memory stays bounded by one page whatever the store holds.
    function* rows(): Generator<DbRow> {
      for (const id of ids) {
        let at = 0
        for (;;) {
          const p = page.all(id, at)
          if (p.length === 0) break
          yield* p
          at = p[p.length - 1]!.pos
        }
      }
    }
    const result = verifyRows(rows())
    const heads = new Map(statement<[], { sidecar: string; pos: number }>(this.db, 'SELECT sidecar, max(pos) AS pos FROM audit_events GROUP BY sidecar').all().map((r) => [r.sidecar, r.pos]))
    checkAgainstCursors(result, heads, statement<[], { name: string; sidecar: string; pos: number }>(this.db, 'SELECT name, sidecar, pos FROM audit_cursors').all(), sidecar)
    return Promise.resolve(result)
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

  close(): Promise<void> {
    this.db.close()
    return Promise.resolve()
  }
}

/** Shared by both stores: rows ordered by (sidecar, pos). */
export function verifyRows(rows: Iterable<DbRow>): VerifyResult {
  const result: VerifyResult = { ok: true, checked: 0, sidecars: 0, breaks: [] }
  let v: ChainVerifier | null = null
  let broken = false
  for (const r of rows) {
    if (!v || v.sidecar !== r.sidecar) {
      v = new ChainVerifier(r.sidecar)
      result.sidecars++
      broken = false
    }
    if (broken) continue
    result.checked++
    const reason = v.check({ ...r, sequence: r.seq, position: r.pos, agentType: r.agent_type })
    if (reason) {
      broken = true
      result.ok = false
      result.breaks.push({ sidecar: r.sidecar, position: r.pos, sequence: r.seq, reason })
    } else if (v.gapAfter !== null) addGap(result, { sidecar: r.sidecar, position: r.pos, previous: v.gapAfter, sequence: r.seq })
  }
  return result
}

/** Adds one gap, listing at most MAX_LISTED_GAPS. */
export function addGap(result: VerifyResult, gap: SequenceGap): void {
  result.gapCount = (result.gapCount ?? 0) + 1
  const list = (result.gaps ??= [])
  if (list.length < MAX_LISTED_GAPS) list.push(gap)
}

/** Folds one sidecar's result into the total. */
export function mergeVerify(total: VerifyResult, v: VerifyResult): void {
  total.checked += v.checked
  total.sidecars += v.sidecars
  total.breaks.push(...v.breaks)
  if (!v.ok) total.ok = false
  if (v.gapCount) {
    const listed = v.gaps ?? []
    for (const g of listed) addGap(total, g)
    total.gapCount! += v.gapCount - listed.length
  }
}

export type { DbRow }
export { isDenied }
