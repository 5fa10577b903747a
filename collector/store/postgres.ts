// The shared store for several collector replicas: PostgreSQL. Append-only by construction (the
// only write is append()) and by the database itself: a trigger refuses UPDATE, DELETE and
// TRUNCATE for every role including the owner, and those privileges are revoked from PUBLIC.
// Replicas serialise appends per sidecar with a transaction-scoped advisory lock, so each
// sidecar's chain stays linear whichever replica its stream lands on. The collector opens it with
// `new` (creates the schema, migrates unless `migrate: false`); a reader (`latchkey audit -c`)
// with openReadOnly(): an existing schema only, no DDL, no writes.
import pg from 'pg'
import { Action, type SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import { GENESIS, INGEST_CURSOR, askableIds, checkAgainstCursors, chainRows, newEvents, rowToStored, toStored } from './chain.js'
import { eventOrder, VERIFY_COLUMNS, VERIFY_PAGE, VerifyFold, afterCursor, type DbRow } from './sqlite-reads.js'
import type { AppendResult, AuditStore, EventQuery, Inventory, StoredEvent, VerifyResult } from './types.js'
import { AUDIT_CURSORS_SHAPE, AUDIT_EVENTS_SHAPE, MAX_INVENTORY_HOSTS, StoreError } from './types.js'
import { assertShape, postgresShape, postgresWhere, storeStartupError, StoreSchemaError } from '../../lib/store-schema.js'

export interface PostgresStoreOptions {
  /** libpq-style connection string, e.g. postgres://user@127.0.0.1:5432/latchkey */
  url: string
  /** Schema holding the tables; created if missing (the collector's open; openReadOnly() never creates it). */
  schema?: string
  poolSize?: number
  /**
   * A role to grant exactly SELECT and INSERT on the events table (and nothing else): run the
   * collector as that role and even a compromised collector cannot alter, delete or un-trigger.
   */
  writerRole?: string
  /** Create or update the schema on start (default). False for a role that may only write. */
  migrate?: boolean
  /** A reader's store: see PostgresAuditStore.openReadOnly(). */
  readOnly?: boolean
}

const DENIED = `(${Action.ACTION_DENY}, ${Action.ACTION_REPORT})`

function ident(name: string): string {
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(name)) throw new StoreError('LK_STORE_BAD_BATCH', `schema name "${name}" must match [a-z_][a-z0-9_]*`)
  return `"${name}"`
}

export class PostgresAuditStore implements AuditStore {
  readonly kind = 'postgres' as const
  readonly pool: pg.Pool
  readonly schema: string
  private readonly t: string
  private readonly cursorsTable: string
  private ready: Promise<void>
  /** Where the store is, without credentials (host:port/database), for messages. */
  private readonly where: string

  /**
   * A reader's open: the schema and the store's tables must exist; no DDL is run (no schema,
   * table, index, trigger or grant is created or changed: catalog SELECTs only) and append and
   * saveCursors are refused before they reach the database. Rejects in one
   * line naming the setting, the schema and host:port/database (never the credentials): no such
   * schema or table (StoreError LK_STORE_MISSING), a table of the wrong shape (LK_STARTUP), the
   * database unreachable (LK_STARTUP).
   */
  static async openReadOnly(opts: PostgresStoreOptions): Promise<PostgresAuditStore> {
    const store = new PostgresAuditStore({ ...opts, readOnly: true })
    try {
      await store.ready
    } catch (err) {
      await store.close().catch(() => {})
      if (err instanceof StoreError || err instanceof StoreSchemaError) throw err
      throw storeStartupError('collector.store.url', store.where, err)
    }
    return store
  }

  constructor(opts: PostgresStoreOptions) {
    this.schema = opts.schema ?? 'latchkey'
    const s = ident(this.schema)
    this.t = `${s}.audit_events`
    this.cursorsTable = `${s}.audit_cursors`
    this.where = postgresWhere(opts.url)
    this.readOnly = opts.readOnly ?? false
    this.pool = new pg.Pool({ connectionString: opts.url, max: opts.poolSize ?? 4 })
    // An idle client's connection error must not crash the collector; the next query reports it.
    this.pool.on('error', () => {})
    // Nor may a checked-out client's (the query in flight rejects with it instead).
    this.pool.on('connect', (client) => client.on('error', () => {}))
    this.writerRole = opts.writerRole ?? null
    this.migrate = opts.migrate ?? true
    this.ready = this.setup()
    this.ready.catch(() => {})
  }

  private readonly writerRole: string | null
  private readonly migrate: boolean
  readonly readOnly: boolean

  private setup(): Promise<void> {
    return this.readOnly ? this.inspect() : this.init(ident(this.schema))
  }

  /**
   * A reader's check, catalog queries only: the schema and both tables exist, of the shape the
   * reads need. Throws StoreError LK_STORE_MISSING naming the schema and where it was looked for.
   */
  private async inspect(): Promise<void> {
    const ns = await this.pool.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [this.schema])
    if (ns.rowCount === 0) {
      throw new StoreError('LK_STORE_MISSING', `collector.store.schema: no audit store at ${this.where}: no schema "${this.schema}"; nothing was created (is the schema right, the database?)`)
    }
    const missing: string[] = []
    for (const [table, shape] of [['audit_events', AUDIT_EVENTS_SHAPE], ['audit_cursors', AUDIT_CURSORS_SHAPE]] as const) {
      const actual = await postgresShape(this.pool, this.schema, table)
      if (actual) assertShape({ ...shape, name: `"${this.schema}".${table}` }, actual, 'collector.store')
      else missing.push(table)
    }
    if (missing.length > 0) {
      throw new StoreError('LK_STORE_MISSING', `collector.store.schema: schema "${this.schema}" at ${this.where} is not a Latchkey audit store: no table ${missing.join(', ')}; nothing was changed`)
    }
  }

  /** Opened read-only: a write is refused before it reaches the database. */
  private refuseWrite(what: string): never {
    throw new StoreError('LK_STORE_UNAVAILABLE', `postgres store "${this.schema}" at ${this.where} is open read-only: ${what} refused`)
  }

  private async init(s: string): Promise<void> {
    if (!this.migrate) {
      // Only check the table is there, readable and of the right shape; the schema is someone else's to create.
      await this.pool.query(`SELECT 1 FROM ${this.t} LIMIT 1`)
      await this.checkShapes(this.pool)
      return
    }
    const c = await this.pool.connect()
    try {
      await c.query('BEGIN')
      await c.query(`SELECT pg_advisory_xact_lock(hashtextextended('latchkey.audit.schema', 0))`)
      await c.query(`CREATE SCHEMA IF NOT EXISTS ${s}`)
      await c.query(`
        CREATE TABLE IF NOT EXISTS ${this.t} (
          sidecar    text   NOT NULL,
          seq        bigint NOT NULL,
          pos        bigint NOT NULL,
          id         text   NOT NULL,
          ts         bigint NOT NULL,
          agent      text   NOT NULL,
          agent_type text   NOT NULL,
          host       text   NOT NULL,
          port       integer NOT NULL,
          action     smallint NOT NULL,
          audience   text   NOT NULL,
          received   bigint NOT NULL,
          payload    bytea  NOT NULL,
          prev       bytea  NOT NULL,
          hash       bytea  NOT NULL,
          PRIMARY KEY (sidecar, seq),
          UNIQUE (sidecar, pos)
        )`)
      await c.query(`CREATE TABLE IF NOT EXISTS ${this.cursorsTable} (name text NOT NULL, sidecar text NOT NULL, pos bigint NOT NULL, PRIMARY KEY (name, sidecar))`)
      // Tables an older version made stay as they were: refuse them before the index below fails on a missing column.
      await this.checkShapes(c)
      await c.query(`CREATE INDEX IF NOT EXISTS audit_events_agent_ts ON ${this.t} (agent, ts)`)
      await c.query(`CREATE INDEX IF NOT EXISTS audit_events_id ON ${this.t} (id)`)
      await c.query(`
        CREATE OR REPLACE FUNCTION ${s}.audit_events_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
        END $$`)
      await c.query(`CREATE OR REPLACE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON ${this.t} FOR EACH ROW EXECUTE FUNCTION ${s}.audit_events_refuse()`)
      await c.query(`CREATE OR REPLACE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON ${this.t} FOR EACH STATEMENT EXECUTE FUNCTION ${s}.audit_events_refuse()`)
      await c.query(`REVOKE UPDATE, DELETE, TRUNCATE ON ${this.t} FROM PUBLIC`)
      if (this.writerRole) {
        const w = ident(this.writerRole)
        await c.query(`GRANT USAGE ON SCHEMA ${s} TO ${w}`)
        await c.query(`REVOKE ALL ON ${this.t} FROM ${w}`)
        await c.query(`GRANT SELECT, INSERT ON ${this.t} TO ${w}`)
        await c.query(`GRANT SELECT, INSERT, UPDATE ON ${this.cursorsTable} TO ${w}`)
      }
      await c.query('COMMIT')
    } catch (err) {
      await c.query('ROLLBACK').catch(() => {})
      throw err
    } finally {
      c.release()
    }
  }

  /** Throws StoreSchemaError when an existing events or cursors table lacks what the queries need. */
  private async checkShapes(db: pg.Pool | pg.PoolClient): Promise<void> {
    for (const [table, shape] of [['audit_events', AUDIT_EVENTS_SHAPE], ['audit_cursors', AUDIT_CURSORS_SHAPE]] as const) {
      const actual = await postgresShape(db, this.schema, table)
      if (actual) assertShape({ ...shape, name: `"${this.schema}".${table}` }, actual, 'collector.store')
    }
  }

  async checkSchema(): Promise<void> {
    try {
      await this.ready
    } catch (err) {
      if (err instanceof StoreSchemaError) throw err
    }
  }

  /** Resolves once the schema exists; rejects with the reason the database gave. */
  async ensureReady(): Promise<void> {
    try {
      await this.ready
    } catch (err) {
      // Retry on the next call: the database may have been unreachable at start.
      this.ready = this.setup()
      this.ready.catch(() => {})
      throw new StoreError('LK_STORE_UNAVAILABLE', `postgres schema setup failed: ${(err as Error).message}`)
    }
  }

  async append(sidecar: string, events: SequencedEvent[]): Promise<AppendResult> {
    if (this.readOnly) this.refuseWrite('append')
    await this.ensureReady()
    let c: pg.PoolClient
    try {
      c = await this.pool.connect()
    } catch (err) {
      throw new StoreError('LK_STORE_UNAVAILABLE', `postgres unreachable: ${(err as Error).message}`)
    }
    try {
      await c.query('BEGIN')
      await c.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 1))', [sidecar])
      const seqs = events.map((e) => e.sequence).filter((n) => Number.isSafeInteger(n))
      const existing = await c.query<{ seq: string; id: string }>(`SELECT seq, id FROM ${this.t} WHERE sidecar = $1 AND seq = ANY($2::bigint[])`, [sidecar, seqs])
      const top = await c.query<{ seq: string | null }>(`SELECT max(seq) AS seq FROM ${this.t} WHERE sidecar = $1`, [sidecar])
      const stored = new Map(existing.rows.map((r) => [Number(r.seq), r.id]))
      // Where each of the batch's IDs is stored already (a resend's own row too: a resend is
      // skipped before its ID is looked at). IDs the batch check refuses anyway (a NUL, which
      // text cannot even be asked for; past the size limit) are not asked for.
      const held = await c.query<{ sidecar: string; seq: string; id: string }>(`SELECT sidecar, seq, id FROM ${this.t} WHERE id = ANY($1::text[])`, [askableIds(events)])
      const ids = new Map(held.rows.map((r) => [r.id, { sidecar: r.sidecar, sequence: Number(r.seq) }]))
      const fresh = newEvents(sidecar, events, stored, Number(top.rows[0]?.seq ?? 0), ids)
      const head = await c.query<{ pos: string; hash: Buffer }>(`SELECT pos, hash FROM ${this.t} WHERE sidecar = $1 ORDER BY pos DESC LIMIT 1`, [sidecar])
      const h = head.rows[0]
      const rows = chainRows(sidecar, fresh, h ? Number(h.pos) : 0, h?.hash ?? GENESIS)
      if (rows.length > 0) {
        const now = Date.now()
        await c.query(
          `INSERT INTO ${this.t} (sidecar, seq, pos, id, ts, agent, agent_type, host, port, action, audience, received, payload, prev, hash)
           SELECT $1, u.seq, u.pos, u.id, u.ts, u.agent, u.agent_type, u.host, u.port, u.action, u.audience, $12, u.p, u.v, u.h
           FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::int[],
                       $10::smallint[], $11::text[], $13::bytea[], $14::bytea[], $15::bytea[])
                AS u(seq, pos, id, ts, agent, agent_type, host, port, action, audience, p, v, h)`,
          [
            sidecar,
            rows.map((r) => r.sequence),
            rows.map((r) => r.position),
            rows.map((r) => r.id),
            rows.map((r) => r.ts),
            rows.map((r) => r.agent),
            rows.map((r) => r.agentType),
            rows.map((r) => r.host),
            rows.map((r) => r.port),
            rows.map((r) => r.action),
            rows.map((r) => r.audience),
            now,
            rows.map((r) => r.payload),
            rows.map((r) => r.prev),
            rows.map((r) => r.hash),
          ],
        )
        // The head this append reached, outside the chain: verify's anchor for a removed tail.
        await c.query(
          `INSERT INTO ${this.cursorsTable} (name, sidecar, pos) VALUES ($1, $2, $3)
           ON CONFLICT (name, sidecar) DO UPDATE SET pos = greatest(${this.cursorsTable}.pos, excluded.pos)`,
          [INGEST_CURSOR, sidecar, rows[rows.length - 1]!.position],
        )
      }
      await c.query('COMMIT')
      c.release()
      return {
        stored: rows.length,
        duplicates: events.length - rows.length,
        highest: seqs.reduce((a, b) => Math.max(a, b), 0),
        events: rows.map((r) => rowToStored(sidecar, r)),
      }
    } catch (err) {
      let broken = false
      await c.query('ROLLBACK').catch(() => (broken = true))
      // A connection that failed is destroyed rather than handed to the next append.
      c.release(broken ? true : undefined)
      if (err instanceof StoreError) throw err
      throw new StoreError('LK_STORE_UNAVAILABLE', `postgres append failed: ${(err as Error).message}`)
    }
  }

  async eventsByAgent(q: EventQuery): Promise<StoredEvent[]> {
    await this.ensureReady()
    const args: unknown[] = [q.agent, q.since.getTime(), q.until?.getTime() ?? Number.MAX_SAFE_INTEGER, q.limit ?? 10_000, q.maxBytes ?? Number.MAX_SAFE_INTEGER]
    // After a cursor: the same order as the answer's, so a page boundary never repeats or skips a row.
    const after = q.after ? afterCursor('$6', '$7', '$8', q.newest) : ''
    if (q.after) args.push(q.after.ts, q.after.sidecar, q.after.position)
    const r = await this.pool.query<{ sidecar: string; seq: string; pos: string; payload: Buffer; hash: Buffer }>(
      // Picked by payload size first (octet_length reads the stored size, not the value), so a
      // few huge payloads cannot make one answer hold gigabytes.
      `SELECT e.sidecar, e.seq, e.pos, e.payload, e.hash FROM (
         SELECT sidecar AS s, pos AS p, ts AS t, sum(octet_length(payload)) OVER (ORDER BY ${eventOrder(q.newest)} ROWS UNBOUNDED PRECEDING) - octet_length(payload) AS before
         FROM ${this.t} WHERE agent = $1 AND ts >= $2 AND ts < $3 ${q.deniedOnly ? `AND action IN ${DENIED}` : ''} ${after}
         ORDER BY ${eventOrder(q.newest)} LIMIT $4
       ) AS k JOIN ${this.t} AS e ON e.sidecar = k.s AND e.pos = k.p
       WHERE k.before < $5 ORDER BY ${eventOrder(q.newest, 'k')}`,
      args,
    )
    return r.rows.map((x) => toStored(x.sidecar, { sequence: Number(x.seq), position: Number(x.pos), payload: x.payload, hash: x.hash }))
  }

  async inventory(): Promise<Inventory> {
    await this.ensureReady()
    const agents = await this.pool.query<{ agent: string; sidecars: string[]; first: string; last: string; calls: string; denied: string; hosts: string[]; host_count: string; audiences: string[] }>(
      `SELECT agent,
              array_agg(DISTINCT sidecar ORDER BY sidecar) AS sidecars,
              min(ts) AS first, max(ts) AS last, count(*) AS calls,
              count(*) FILTER (WHERE action IN ${DENIED}) AS denied,
              coalesce((array_agg(DISTINCT (host || ':' || port) COLLATE "C" ORDER BY (host || ':' || port) COLLATE "C") FILTER (WHERE host <> '' AND action <> ${Action.ACTION_DENY}))[1:${MAX_INVENTORY_HOSTS}], '{}') AS hosts,
              count(DISTINCT host || ':' || port) FILTER (WHERE host <> '' AND action <> ${Action.ACTION_DENY}) AS host_count,
              coalesce(array_agg(DISTINCT audience ORDER BY audience) FILTER (WHERE audience <> ''), '{}') AS audiences
       FROM ${this.t} GROUP BY agent ORDER BY agent`,
    )
    const sidecars = await this.pool.query<{ sidecar: string; agents: string[]; last: string; events: string; seq: string }>(
      `SELECT sidecar, array_agg(DISTINCT agent ORDER BY agent) AS agents, max(received) AS last, count(*) AS events, max(seq) AS seq
       FROM ${this.t} GROUP BY sidecar ORDER BY sidecar`,
    )
    return {
      agents: agents.rows.map((r) => ({
        agent: r.agent,
        sidecars: r.sidecars,
        firstSeen: new Date(Number(r.first)),
        lastSeen: new Date(Number(r.last)),
        calls: Number(r.calls),
        denied: Number(r.denied),
        hosts: r.hosts,
        hostCount: Number(r.host_count),
        audiences: r.audiences,
      })),
      sidecars: sidecars.rows.map((r) => ({ sidecar: r.sidecar, agents: r.agents, lastSeen: new Date(Number(r.last)), events: Number(r.events), lastSequence: Number(r.seq) })),
    }
  }

  async verify(sidecar?: string): Promise<VerifyResult> {
    await this.ensureReady()
    // One sidecar at a time keeps memory bounded by the largest chain, not the whole table.
    // Given, even empty, it is a filter: "" names a sidecar no chain belongs to, not every one.
    const ids = sidecar !== undefined ? [sidecar] : (await this.pool.query<{ sidecar: string }>(`SELECT DISTINCT sidecar FROM ${this.t} ORDER BY sidecar`)).rows.map((r) => r.sidecar)
    // A page of links per query: memory stays bounded by a page whatever a chain holds, and the
    // hashing (on this thread: pg is asynchronous, the CPU work is not) gives way to ingest and
    // other requests between pages.
    const fold = new VerifyFold()
    for (const id of ids) {
      let at = 0
      for (;;) {
        const r = await this.pool.query<Omit<DbRow, 'seq' | 'pos' | 'ts'> & { seq: string; pos: string; ts: string }>(
          `SELECT ${VERIFY_COLUMNS} FROM ${this.t} WHERE sidecar = $1 AND pos > $2 ORDER BY pos LIMIT $3`,
          [id, at, VERIFY_PAGE],
        )
        if (r.rows.length === 0) break
        for (const x of r.rows) fold.add({ ...x, seq: Number(x.seq), pos: Number(x.pos), ts: Number(x.ts) })
        at = Number(r.rows[r.rows.length - 1]!.pos)
        await new Promise<void>((resolve) => setImmediate(resolve))
      }
    }
    const total = fold.result
    const cursors = await this.pool.query<{ name: string; sidecar: string; pos: string }>(`SELECT name, sidecar, pos FROM ${this.cursorsTable}`)
    checkAgainstCursors(total, await this.heads(), cursors.rows.map((c) => ({ ...c, pos: Number(c.pos) })), sidecar)
    return total
  }

  async after(sidecar: string, position: number, limit: number): Promise<StoredEvent[]> {
    await this.ensureReady()
    const r = await this.pool.query<{ seq: string; pos: string; payload: Buffer; hash: Buffer }>(
      `SELECT seq, pos, payload, hash FROM ${this.t} WHERE sidecar = $1 AND pos > $2 ORDER BY pos LIMIT $3`,
      [sidecar, position, limit],
    )
    return r.rows.map((x) => toStored(sidecar, { sequence: Number(x.seq), position: Number(x.pos), payload: x.payload, hash: x.hash }))
  }

  async heads(): Promise<Map<string, number>> {
    await this.ensureReady()
    const r = await this.pool.query<{ sidecar: string; pos: string }>(`SELECT sidecar, max(pos) AS pos FROM ${this.t} GROUP BY sidecar`)
    return new Map(r.rows.map((x) => [x.sidecar, Number(x.pos)]))
  }

  async cursors(name: string): Promise<Map<string, number>> {
    await this.ensureReady()
    const r = await this.pool.query<{ sidecar: string; pos: string }>(`SELECT sidecar, pos FROM ${this.cursorsTable} WHERE name = $1`, [name])
    return new Map(r.rows.map((x) => [x.sidecar, Number(x.pos)]))
  }

  async saveCursors(name: string, positions: Map<string, number>): Promise<void> {
    if (this.readOnly) this.refuseWrite('saveCursors')
    if (positions.size === 0) return
    await this.ensureReady()
    await this.pool.query(
      `INSERT INTO ${this.cursorsTable} (name, sidecar, pos) SELECT $1, s, p FROM unnest($2::text[], $3::bigint[]) AS u(s, p)
       ON CONFLICT (name, sidecar) DO UPDATE SET pos = greatest(${this.cursorsTable}.pos, excluded.pos)`,
      [name, [...positions.keys()], [...positions.values()]],
    )
  }

  /** Drops the schema (tests only: the trigger does not stop DROP, which needs ownership). */
  async dropSchema(): Promise<void> {
    // Let the constructor's schema setup finish first, or it could re-create what was dropped.
    await this.ready.catch(() => {})
    await this.pool.query(`DROP SCHEMA IF EXISTS ${ident(this.schema)} CASCADE`)
  }

  async ping(): Promise<void> {
    await this.ensureReady()
    try {
      await this.pool.query(`SELECT 1 FROM ${this.t} LIMIT 1`)
    } catch (err) {
      throw new StoreError('LK_STORE_UNAVAILABLE', `postgres unreachable: ${(err as Error).message}`)
    }
  }

  async close(): Promise<void> {
    await this.pool.end()
  }
}
