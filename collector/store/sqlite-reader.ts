// A worker thread holding a connection of its own to the SQLite store, for the heavy reads
// (sqlite-reads.ts). better-sqlite3 is synchronous: run on the collector's thread, a query over
// 100,000 events held its event loop for seconds (gRPC ingest and /healthz waited, a sidecar's
// stream was dropped). WAL lets this reader and the writer work at once. One request at a time,
// in order; `ReadWorker` (sqlite.ts) keeps the requests and their answers.
import { parentPort, workerData } from 'node:worker_threads'
import { openDatabase, pragma } from '../../lib/sqlite.js'
import { packEvents, readEvents, readInventory, readVerify } from './sqlite-reads.js'
import type { EventQuery } from './types.js'

export type ReadRequest = { id: number } & ({ op: 'events'; query: EventQuery } | { op: 'inventory' } | { op: 'verify'; sidecar?: string })
export type ReadAnswer = { id: number; ok: true; value: unknown } | { id: number; ok: false; message: string }

/** Set in workerData by ReadWorker (sqlite.ts): a module imported in some other worker does nothing. */
export const READER_MARK = 'latchkeySqliteReader'

const port = parentPort
if (port && (workerData as Record<string, unknown> | null)?.[READER_MARK] === true) {
  let db: ReturnType<typeof openDatabase> | null = null
  const open = () => {
    if (db) return db
    const { path, readOnly } = workerData as { path: string; readOnly: boolean }
    // The store's file exists (its owner made it, or a reader found it): never create one here.
    db = openDatabase(path, { fileMustExist: true, readonly: readOnly })
    pragma(db, 'busy_timeout = 5000')
    // A reader: nothing on this connection may write, whatever a bug asks of it.
    pragma(db, 'query_only = ON')
    return db
  }
  port.on('message', (m: ReadRequest | { op: 'close' }) => {
    if (m.op === 'close') {
      db?.close()
      port.close()
      return
    }
    let answer: ReadAnswer
    let transfer: ArrayBuffer[] = []
    try {
      const d = open()
      if (m.op === 'events') {
        const packed = packEvents(readEvents(d, m.query))
        transfer = [packed.bytes.buffer as ArrayBuffer]
        answer = { id: m.id, ok: true, value: packed }
      } else answer = { id: m.id, ok: true, value: m.op === 'inventory' ? readInventory(d) : readVerify(d, m.sidecar) }
    } catch (err) {
      answer = { id: m.id, ok: false, message: (err as Error)?.message ?? String(err) }
    }
    port.postMessage(answer, transfer)
  })
}
