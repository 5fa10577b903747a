// The shape a store's table must have for the queries the code runs on it, checked at start-up
// against a table that already exists. `CREATE TABLE IF NOT EXISTS` leaves an older table as it
// is: without this check a process would start and report ready on a table its writes then fail
// on (a missing column, or no unique key for its ON CONFLICT), and fail every write instead.
// One approach for every store (broker revocations, collector audit events and cursors), on
// SQLite and PostgreSQL alike: read the table's columns and unique keys from the catalog and name
// what is missing.
import type { Database } from './sqlite.js'
import { statement } from './sqlite.js'

export interface TableShape {
  /** As it is to be named in a message: `"schema".table` or `table`. */
  name: string
  columns: readonly string[]
  /** Column sets each of which needs a primary key or unique constraint of exactly those columns. */
  uniqueKeys: readonly (readonly string[])[]
}

export interface ActualShape {
  columns: ReadonlySet<string>
  /** Column sets of the table's primary key and unique constraints or indexes. */
  uniqueKeys: readonly (readonly string[])[]
}

/** A table that exists but lacks what the code needs. Code LK_STARTUP: the message is for people. */
export class StoreSchemaError extends Error {
  readonly code = 'LK_STARTUP'
  constructor(message: string) {
    super(message)
    this.name = 'StoreSchemaError'
  }
}

/** What the table lacks, each item said in words; empty when it has all the code needs. */
export function shapeProblems(want: TableShape, actual: ActualShape): string[] {
  const problems: string[] = []
  const missing = want.columns.filter((c) => !actual.columns.has(c))
  if (missing.length > 0) problems.push(`no column${missing.length > 1 ? 's' : ''} ${missing.join(', ')}`)
  const same = (a: readonly string[], b: readonly string[]) => a.length === b.length && a.every((c) => b.includes(c))
  for (const key of want.uniqueKeys) {
    if (!actual.uniqueKeys.some((k) => same(k, key))) problems.push(`no primary key or unique constraint on (${key.join(', ')})`)
  }
  return problems
}

/** Throws StoreSchemaError naming the table and everything it lacks. */
export function assertShape(want: TableShape, actual: ActualShape, setting: string): void {
  const problems = shapeProblems(want, actual)
  if (problems.length === 0) return
  throw new StoreSchemaError(
    `${setting}: table ${want.name} exists but is not the shape this version needs: ${problems.join('; ')}. ` +
      'Move it aside (or migrate it) and start again; nothing was changed.',
  )
}

/**
 * A table whose constraints refuse a row this version writes (a CHECK from an older version, a
 * NOT NULL column it does not know): found by a probe write rolled back at start-up.
 */
export function refusedWrite(setting: string, table: string, what: string, cause: string): StoreSchemaError {
  return new StoreSchemaError(`${setting}: table ${table} exists but refuses ${what}: ${cause}. Move it aside (or migrate it) and start again; nothing was changed.`)
}

interface Queryable {
  query<R extends object>(sql: string, values?: unknown[]): Promise<{ rows: R[] }>
}

/** A PostgreSQL table's columns and unique keys (non-partial, immediate, valid: what ON CONFLICT can infer), or null when there is no such table. */
export async function postgresShape(db: Queryable, schema: string, table: string): Promise<ActualShape | null> {
  const rel = await db.query<{ oid: number | null }>(`SELECT to_regclass(format('%I.%I', $1::text, $2::text))::oid AS oid`, [schema, table])
  const oid = rel.rows[0]?.oid
  if (oid == null) return null
  const cols = await db.query<{ name: string }>('SELECT attname::text AS name FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped', [oid])
  const keys = await db.query<{ cols: string[] }>(
    `SELECT array_agg(a.attname::text ORDER BY a.attname) AS cols
     FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
     GROUP BY i.indexrelid`,
    [oid],
  )
  return { columns: new Set(cols.rows.map((r) => r.name)), uniqueKeys: keys.rows.map((r) => r.cols) }
}

/** A SQLite table's columns and unique keys (primary key included), or null when there is no such table. */
export function sqliteShape(db: Database.Database, table: string): ActualShape | null {
  const cols = statement<[string], { name: string; pk: number }>(db, 'SELECT name, pk FROM pragma_table_info(?)').all(table)
  if (cols.length === 0) return null
  const indexes = statement<[string], { index_name: string; column: string | null }>(
    db,
    `SELECT il.name AS index_name, ii.name AS column
     FROM pragma_index_list(?) AS il, pragma_index_info(il.name) AS ii
     WHERE il."unique" = 1 AND il.partial = 0 ORDER BY il.name, ii.seqno`,
  ).all(table)
  const keys = new Map<string, string[]>()
  let expression = new Set<string>()
  for (const r of indexes) {
    if (r.column === null) expression = new Set([...expression, r.index_name])
    else keys.set(r.index_name, [...(keys.get(r.index_name) ?? []), r.column])
  }
  const uniqueKeys = [...keys].filter(([name]) => !expression.has(name)).map(([, c]) => c)
  // A rowid table's INTEGER PRIMARY KEY is the rowid itself and has no index of its own.
  const pk = cols.filter((c) => c.pk > 0).map((c) => c.name)
  if (pk.length > 0) uniqueKeys.push(pk)
  return { columns: new Set(cols.map((c) => c.name)), uniqueKeys }
}

/** Where a PostgreSQL URL points, without its credentials: `host:port/database`, or '' when it does not parse. */
export function postgresWhere(url: string): string {
  try {
    const u = new URL(url)
    return `${u.hostname}:${u.port || '5432'}${u.pathname}`
  } catch {
    return ''
  }
}

/** The database's (or the driver's) reason, in words: never the connection string. */
export function storeCause(err: unknown): string {
  const e = err as { message?: string; code?: string; errors?: { message?: string }[] } | null
  // Node reports a refused connection to a name with several addresses as an AggregateError with no message.
  return e?.message || e?.errors?.[0]?.message || e?.code || String(err)
}

/**
 * A store that cannot be opened at start-up, said in one line naming the setting and the cause
 * (code LK_STARTUP, printed as it is instead of a stack). A StoreSchemaError passes unchanged.
 */
export function storeStartupError(setting: string, where: string, err: unknown): Error {
  if (err instanceof StoreSchemaError) return err
  return Object.assign(new Error(`${setting}: cannot open the store${where ? ` at ${where}` : ''}: ${storeCause(err)}`), { code: 'LK_STARTUP' })
}
