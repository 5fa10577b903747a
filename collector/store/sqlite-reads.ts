// The SQLite store's heavy reads (events of an agent, the inventory, verify), as functions of a
// connection: run in a worker thread (sqlite-reader.ts) on a connection of its own, so a large
// read never holds the collector's event loop (better-sqlite3 is synchronous), and in-process for
// a store no second connection can open (":memory:").
import { statement, type Database } from '../../lib/sqlite.js'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'
import { ChainVerifier, checkAgainstCursors } from './chain.js'
import { MAX_INVENTORY_HOSTS, type EventQuery, type Inventory, type SequenceGap, type VerifyResult } from './types.js'
import { MAX_LISTED_GAPS } from './types.js'

export interface DbRow {
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
  payload: Uint8Array
  prev: Uint8Array
  hash: Uint8Array
}

/** The columns verify reads (both stores). */
export const VERIFY_COLUMNS = 'sidecar, seq, pos, id, ts, agent, agent_type, host, port, action, audience, payload, prev, hash'

/** A row of an events answer, before its payload is decoded (that is done where it is used). */
export interface EventRow {
  sidecar: string
  seq: number
  pos: number
  payload: Uint8Array
  hash: Uint8Array
}

/**
 * The order of an events answer, and the condition that continues it after a cursor (the last
 * event of the previous page), given the placeholders for the cursor's time, sidecar and
 * position: both stores, so a page boundary never repeats or skips a row.
 */
export const EVENT_ORDER = 'ts, sidecar, pos'

/** The order reversed (EventQuery.newest), for the inner query; `k` columns for the outer one. */
export function eventOrder(newest: boolean | undefined, k = ''): string {
  const dir = newest ? ' DESC' : ''
  return k ? `${k}.t${dir}, ${k}.s${dir}, ${k}.p${dir}` : newest ? 'ts DESC, sidecar DESC, pos DESC' : EVENT_ORDER
}

export function afterCursor(ts: string, sidecar: string, pos: string, newest = false): string {
  const [op, eq] = newest ? ['<', '<='] : ['>', '>=']
  return `AND ts ${eq} ${ts} AND (ts ${op} ${ts} OR sidecar ${op} ${sidecar} OR (sidecar = ${sidecar} AND pos ${op} ${pos}))`
}

export function readEvents(db: Database.Database, q: EventQuery): EventRow[] {
  const until = q.until?.getTime() ?? Number.MAX_SAFE_INTEGER
  const denied = q.deniedOnly ? `AND action IN (${Action.ACTION_DENY}, ${Action.ACTION_REPORT})` : ''
  const after = q.after ? afterCursor('?', '?', '?', q.newest) : ''
  const args: unknown[] = [q.agent, q.since.getTime(), until]
  // Positional: each placeholder as often as afterCursor writes it, in its order.
  if (q.after) args.push(q.after.ts, q.after.ts, q.after.sidecar, q.after.sidecar, q.after.position)
  args.push(q.limit ?? 10_000, q.maxBytes ?? Number.MAX_SAFE_INTEGER)
  // The rows are picked by their payload sizes first (length() reads no blob), so a few huge
  // payloads cannot make one answer hold gigabytes.
  return statement<unknown[], EventRow>(
    db,
    `SELECT e.sidecar, e.seq, e.pos, e.payload, e.hash FROM (
       SELECT sidecar AS s, pos AS p, ts AS t, sum(length(payload)) OVER (ORDER BY ${eventOrder(q.newest)} ROWS UNBOUNDED PRECEDING) - length(payload) AS before
       FROM audit_events WHERE agent = ? AND ts >= ? AND ts < ? ${denied} ${after} ORDER BY ${eventOrder(q.newest)} LIMIT ?
     ) AS k JOIN audit_events AS e ON e.sidecar = k.s AND e.pos = k.p
     WHERE k.before < ? ORDER BY ${eventOrder(q.newest, 'k')}`,
  ).all(...args)
}

export function readInventory(db: Database.Database): Inventory {
  // As a JSON array: a name may hold any character, a comma included (group_concat's separator).
  const names = (json: string) => (JSON.parse(json) as string[]).sort()
  const agents = statement<[], { agent: string; sidecars: string; first: number; last: number; calls: number; denied: number }>(
    db,
    `SELECT agent, json_group_array(DISTINCT sidecar) AS sidecars, min(ts) AS first, max(ts) AS last, count(*) AS calls,
            sum(CASE WHEN action IN (${Action.ACTION_DENY}, ${Action.ACTION_REPORT}) THEN 1 ELSE 0 END) AS denied
     FROM audit_events GROUP BY agent ORDER BY agent`,
  ).all()
  // Each agent's first MAX_INVENTORY_HOSTS, and how many in all: the rest never leave SQLite.
  const hosts = statement<[], { agent: string; hp: string; n: number }>(
    db,
    `SELECT agent, hp, n FROM (
       SELECT agent, hp, row_number() OVER (PARTITION BY agent ORDER BY hp) AS r, count(*) OVER (PARTITION BY agent) AS n
       FROM (SELECT DISTINCT agent, host || ':' || port AS hp FROM audit_events WHERE host <> '' AND action <> ${Action.ACTION_DENY})
     ) WHERE r <= ${MAX_INVENTORY_HOSTS} ORDER BY agent, hp`,
  ).all()
  const auds = statement<[], { agent: string; audience: string }>(db, `SELECT DISTINCT agent, audience FROM audit_events WHERE audience <> '' ORDER BY agent, audience`).all()
  const sidecars = statement<[], { sidecar: string; agents: string; last: number; events: number; seq: number }>(
    db,
    `SELECT sidecar, json_group_array(DISTINCT agent) AS agents, max(received) AS last, count(*) AS events, max(seq) AS seq
     FROM audit_events GROUP BY sidecar ORDER BY sidecar`,
  ).all()
  const byAgent = <T extends { agent: string }>(rows: T[], pick: (r: T) => string) => {
    const m = new Map<string, string[]>()
    // Appended in place: copying the list per row made 48k hosts of one agent 109 s of a reader worker.
    for (const r of rows) {
      const list = m.get(r.agent)
      if (list) list.push(pick(r))
      else m.set(r.agent, [pick(r)])
    }
    return m
  }
  const h = byAgent(hosts, (r) => r.hp)
  const hostCount = new Map(hosts.map((r) => [r.agent, r.n]))
  const a = byAgent(auds, (r) => r.audience)
  return {
    agents: agents.map((r) => ({
      agent: r.agent,
      sidecars: names(r.sidecars),
      firstSeen: new Date(r.first),
      lastSeen: new Date(r.last),
      calls: r.calls,
      denied: r.denied,
      hosts: h.get(r.agent) ?? [],
      hostCount: hostCount.get(r.agent) ?? 0,
      audiences: a.get(r.agent) ?? [],
    })),
    sidecars: sidecars.map((r) => ({ sidecar: r.sidecar, agents: names(r.agents), lastSeen: new Date(r.last), events: r.events, lastSequence: r.seq })),
  }
}

/** Links read per statement: memory stays bounded by one page whatever the store holds. */
export const VERIFY_PAGE = 2000

/**
 * Verify over one read transaction: the chains, heads and cursors are one snapshot, however long
 * it takes and whatever is appended meanwhile (on another connection).
 */
export function readVerify(db: Database.Database, sidecar?: string): VerifyResult {
  const run = db.transaction((): VerifyResult => {
    // Given, even empty, it is a filter: "" names a sidecar no chain belongs to, not every one.
    const ids =
      sidecar !== undefined
        ? [sidecar]
        : statement<[], { sidecar: string }>(db, 'SELECT DISTINCT sidecar FROM audit_events ORDER BY sidecar')
            .all()
            .map((r) => r.sidecar)
    const page = statement<[string, number, number], DbRow>(db, `SELECT ${VERIFY_COLUMNS} FROM audit_events WHERE sidecar = ? AND pos > ? ORDER BY pos LIMIT ?`)
    const fold = new VerifyFold()
    for (const id of ids) {
      let at = 0
      for (;;) {
        const p = page.all(id, at, VERIFY_PAGE)
        if (p.length === 0) break
        for (const r of p) fold.add(r)
        at = p[p.length - 1]!.pos
      }
    }
    const result = fold.result
    const heads = new Map(statement<[], { sidecar: string; pos: number }>(db, 'SELECT sidecar, max(pos) AS pos FROM audit_events GROUP BY sidecar').all().map((r) => [r.sidecar, r.pos]))
    checkAgainstCursors(result, heads, statement<[], { name: string; sidecar: string; pos: number }>(db, 'SELECT name, sidecar, pos FROM audit_cursors').all(), sidecar)
    return result
  })
  return run.deferred()
}

/** Verify's running state, fed rows in (sidecar, pos) order, a page at a time (both stores). */
export class VerifyFold {
  readonly result: VerifyResult = { ok: true, checked: 0, sidecars: 0, breaks: [] }
  private v: ChainVerifier | null = null
  private broken = false

  add(r: DbRow): void {
    const result = this.result
    if (!this.v || this.v.sidecar !== r.sidecar) {
      this.v = new ChainVerifier(r.sidecar)
      result.sidecars++
      this.broken = false
    }
    if (this.broken) return
    result.checked++
    const reason = this.v.check({ ...r, sequence: r.seq, position: r.pos, agentType: r.agent_type })
    if (reason) {
      this.broken = true
      result.ok = false
      result.breaks.push({ sidecar: r.sidecar, position: r.pos, sequence: r.seq, reason })
    } else if (this.v.gapAfter !== null) addGap(result, { sidecar: r.sidecar, position: r.pos, previous: this.v.gapAfter, sequence: r.seq })
  }
}

/** Adds one gap, listing at most MAX_LISTED_GAPS. */
function addGap(result: VerifyResult, gap: SequenceGap): void {
  result.gapCount = (result.gapCount ?? 0) + 1
  const list = (result.gaps ??= [])
  if (list.length < MAX_LISTED_GAPS) list.push(gap)
}

/**
 * An events answer as one message: every payload and hash in one buffer, moved to the collector's
 * thread rather than copied (a thousand Buffers cloned one by one cost the thread that receives
 * them more than the query did).
 */
export interface PackedEvents {
  rows: Array<{ sidecar: string; seq: number; pos: number; payloadEnd: number; end: number }>
  /** Row i's payload is bytes[start, payloadEnd), its hash bytes[payloadEnd, end); the next row starts at end. */
  bytes: Uint8Array
}

export function packEvents(rows: EventRow[]): PackedEvents {
  let size = 0
  for (const r of rows) size += r.payload.byteLength + r.hash.byteLength
  const bytes = new Uint8Array(size)
  const out: PackedEvents['rows'] = []
  let at = 0
  for (const r of rows) {
    bytes.set(r.payload, at)
    const payloadEnd = at + r.payload.byteLength
    bytes.set(r.hash, payloadEnd)
    at = payloadEnd + r.hash.byteLength
    out.push({ sidecar: r.sidecar, seq: r.seq, pos: r.pos, payloadEnd, end: at })
  }
  return { rows: out, bytes }
}

export function unpackEvents(p: PackedEvents): EventRow[] {
  let at = 0
  return p.rows.map((r) => {
    const payload = p.bytes.subarray(at, r.payloadEnd)
    const hash = p.bytes.subarray(r.payloadEnd, r.end)
    at = r.end
    return { sidecar: r.sidecar, seq: r.seq, pos: r.pos, payload, hash }
  })
}

