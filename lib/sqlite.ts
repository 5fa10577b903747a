// better-sqlite3, used so that Node 24 cannot abort the process. Its Database, Statement and
// iterator objects are node::ObjectWraps, and on Node 24 an ObjectWrap that the garbage collector
// destroys outside a JavaScript context aborts the process (`RemoveEnvironmentCleanupHook`:
// `Assertion failed: (env) != nullptr`), seen here in CI and reported upstream. So none of them is
// ever left for the collector: databases stay referenced for the life of the process, statements
// are prepared once per SQL text and kept, pragmas go through exec (pragma() prepares a throwaway
// statement), and nothing iterates (iterate() creates a throwaway iterator): use all().
import Database from 'better-sqlite3'

const keep: Database.Database[] = []
const statements = new WeakMap<Database.Database, Map<string, Database.Statement>>()

export type { Database }

export function openDatabase(path: string, options?: Database.Options): Database.Database {
  const db = new Database(path, options)
  keep.push(db)
  statements.set(db, new Map())
  return db
}

/** The one prepared statement for this SQL on this database, kept for the database's life. */
export function statement<P extends unknown[] = unknown[], R = unknown>(db: Database.Database, sql: string): Database.Statement<P, R> {
  const cache = statements.get(db)
  if (!cache) throw new Error('statement(): the database was not opened with openDatabase()')
  let s = cache.get(sql)
  if (!s) cache.set(sql, (s = db.prepare(sql)))
  return s as Database.Statement<P, R>
}

/** PRAGMA without a throwaway Statement object. */
export function pragma(db: Database.Database, text: string): void {
  db.exec(`PRAGMA ${text}`)
}
