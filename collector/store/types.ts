// One interface for every audit store. Implementations: SQLite (embedded default) and PostgreSQL
// (several collector replicas). Both are append-only by construction and pass one conformance
// suite (test/collector/store-conformance.ts).
import type { AuditEvent, SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import type { TableShape } from '../../lib/store-schema.js'

/**
 * What the stores' queries need of a table that already exists (an older version's is kept as it
 * is by CREATE TABLE IF NOT EXISTS): checked at start-up (lib/store-schema.ts), so a collector
 * never reports ready on a table it cannot append to.
 */
export const AUDIT_EVENTS_SHAPE: Omit<TableShape, 'name'> = {
  columns: ['sidecar', 'seq', 'pos', 'id', 'ts', 'agent', 'agent_type', 'host', 'port', 'action', 'audience', 'received', 'payload', 'prev', 'hash'],
  // One event per sequence (dedupe) and one per chain position (a linear chain), per sidecar.
  uniqueKeys: [
    ['sidecar', 'seq'],
    ['sidecar', 'pos'],
  ],
}
/** saveCursors() upserts with ON CONFLICT (name, sidecar). */
export const AUDIT_CURSORS_SHAPE: Omit<TableShape, 'name'> = { columns: ['name', 'sidecar', 'pos'], uniqueKeys: [['name', 'sidecar']] }

export interface AppendResult {
  /** Events newly stored. */
  stored: number
  /** Events already stored under the same (sidecar, sequence), skipped. */
  duplicates: number
  /** Highest sequence in the batch (0 for an empty batch): the value to acknowledge. */
  highest: number
  /** The events newly stored, in chain order (for fan-out after the commit). */
  events: StoredEvent[]
}

export interface StoredEvent {
  sidecar: string
  sequence: number
  /** Position in the sidecar's hash chain, from 1. */
  position: number
  event: AuditEvent
  /** hex SHA-256 of this link (see chain.ts). */
  hash: string
  /** The stored payload's size in bytes (what a bounded answer counts). */
  bytes?: number
}

export interface EventQuery {
  agent: string
  /** Inclusive lower bound on the event's time. */
  since: Date
  until?: Date
  /** Only calls that policy denied (deny, or report-only deny). */
  deniedOnly?: boolean
  limit?: number
  /**
   * Bounds the answer in bytes as well as rows: rows are returned, in order, while the payload
   * bytes before each total less than this, so the last row returned is the one that reached it
   * (when the cut happened). Unset: rows alone bound it.
   */
  maxBytes?: number
  /**
   * Continue after this event (the last one of the previous page): an answer is ordered by
   * (time, sidecar, position), and this is where in that order the page starts. `since` still applies.
   */
  after?: EventCursor
  /**
   * Newest first: the order reversed, and `after` continues towards older events. "What did
   * agent X do today" wants the latest calls, which oldest-first gave only past the limit.
   */
  newest?: boolean
}

/** A place in the order of an events answer: an event's time (ms), sidecar and chain position. */
export interface EventCursor {
  ts: number
  sidecar: string
  position: number
  /** Given by a newest-first answer: it continues only one (read by the API, not the stores). */
  newest?: boolean
}

export interface AgentInventory {
  agent: string
  sidecars: string[]
  firstSeen: Date
  lastSeen: Date
  calls: number
  denied: number
  /**
   * host:port pairs actually called (allowed), sorted bytewise: the first MAX_INVENTORY_HOSTS of
   * them. An agent's hosts grow with what it does (a wildcard rule lets it call a new subdomain
   * each time), and listed whole they made one agent's 48,000 an answer of megabytes.
   */
  hosts: string[]
  /** How many distinct host:port pairs there are in all; more than `hosts` lists when it was cut. */
  hostCount: number
  /** credential audiences actually used, sorted. */
  audiences: string[]
}

/** At most this many of an agent's host:port pairs are listed in the inventory; `hostCount` counts them all. */
export const MAX_INVENTORY_HOSTS = 100

export interface SidecarInventory {
  sidecar: string
  agents: string[]
  lastSeen: Date
  events: number
  lastSequence: number
}

export interface Inventory {
  agents: AgentInventory[]
  sidecars: SidecarInventory[]
}

export interface ChainBreak {
  sidecar: string
  position: number
  sequence: number
  reason: string
}

/**
 * Consecutive links whose sequences do not follow one another: sequences the sidecar numbered but
 * that never reached the collector (a damaged spool record skipped, a spool lost), or, in a store
 * written before the collector refused it, a sequence stored below its chain's head. Not a break:
 * the chain itself holds; but no event under the missing sequences is on record.
 */
export interface SequenceGap {
  sidecar: string
  /** The link after the gap. */
  position: number
  /** The previous link's sequence. */
  previous: number
  sequence: number
}

/** At most this many gaps are listed; `gapCount` counts them all. */
export const MAX_LISTED_GAPS = 1000

export interface VerifyResult {
  ok: boolean
  /** Links checked, over all sidecars. */
  checked: number
  sidecars: number
  /**
   * The first break found per sidecar, in sidecar order; then those found against the fan-out
   * cursors (a removed tail or chain); empty when ok.
   */
  breaks: ChainBreak[]
  /** Sequence gaps, in sidecar and chain order (the first MAX_LISTED_GAPS); absent when there are none. */
  gaps?: SequenceGap[]
  gapCount?: number
}

export interface AuditStore {
  readonly kind: 'sqlite' | 'postgres'
  /** Appends a batch in one transaction; resolves only once it is committed. */
  append(sidecar: string, events: SequencedEvent[]): Promise<AppendResult>
  eventsByAgent(q: EventQuery): Promise<StoredEvent[]>
  inventory(): Promise<Inventory>
  /** Recomputes every chain (or one sidecar's) from the stored payloads. */
  verify(sidecar?: string): Promise<VerifyResult>
  /** One sidecar's events after a chain position, in chain order (fan-out catch-up). */
  after(sidecar: string, position: number, limit: number): Promise<StoredEvent[]>
  /** Every chain's head: sidecar → highest position. */
  heads(): Promise<Map<string, number>>
  /** A named consumer's progress, sidecar → last position it handled. Not evidence: mutable. */
  cursors(name: string): Promise<Map<string, number>>
  /** Moves cursors forward (never back). */
  saveCursors(name: string, positions: Map<string, number>): Promise<void>
  /**
   * Rejects (StoreSchemaError, code LK_STARTUP) when the store was reached and an existing table
   * lacks what the code needs: the collector must not start on it. Resolves otherwise, also when
   * the store cannot be reached now (that is retried, and /readyz says so).
   */
  checkSchema(): Promise<void>
  /** Resolves once the store answers a query; rejects (LK_STORE_UNAVAILABLE) when it cannot. For /readyz. */
  ping(): Promise<void>
  close(): Promise<void>
}

/**
 * The two ways a store is opened: each backend is both (SqliteAuditStore, PostgresAuditStore;
 * collector/collector.ts holds them to this). The collector owns its store: `new` creates it (the
 * SQLite file, the PostgreSQL schema) when it is missing and migrates it. Everyone else only
 * reads it (`latchkey audit -c`, `audit verify -c`): `openReadOnly` opens a store that exists and
 * never creates, migrates or writes anything, so a path or schema with a typo in it is an error
 * (LK_STORE_MISSING, naming the setting and the place) rather than an empty store reported on as
 * "0 calls", "chain verified".
 */
export interface AuditStoreBackend<Options> {
  new (options: Options): AuditStore
  /**
   * Resolves with a store whose reads work and whose writes (append, saveCursors) reject. Rejects,
   * in one line for people, when there is no store there (LK_STORE_MISSING: no file, no schema, or
   * one without the store's tables), when a table lacks what the reads need (LK_STARTUP), or when
   * the store cannot be reached (LK_STARTUP).
   */
  openReadOnly(options: Options): Promise<AuditStore>
}

/**
 * A write the store refused: append-only violations, malformed batches, a store opened read-only;
 * or a store a reader asked for that is not there (LK_STORE_MISSING: nothing was created).
 */
export class StoreError extends Error {
  constructor(
    readonly code: 'LK_STORE_APPEND_ONLY' | 'LK_STORE_BAD_BATCH' | 'LK_STORE_UNAVAILABLE' | 'LK_STORE_MISSING',
    message: string,
  ) {
    super(message)
    this.name = 'StoreError'
  }
}
