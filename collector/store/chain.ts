// The hash chain both stores share. Each stored event is one link:
//   hash = SHA-256( "latchkey.audit.v1" 0x00 sidecar 0x00 u64be(position) u64be(sequence) prev(32) payload )
// where payload is the event's protobuf encoding as received and stored, and prev is the previous
// link's hash in the same sidecar's chain (32 zero bytes for position 1). Changing, removing or
// reordering any stored event breaks every link after it.
import { createHash } from 'node:crypto'
import { Action, AuditEvent, type SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'
import { StoreError, type StoredEvent, type VerifyResult } from './types.js'
import { MAX_DATE_MS } from '../../lib/max-date.js'

export const GENESIS = Buffer.alloc(32)
const DOMAIN = Buffer.from('latchkey.audit.v1\0')

export function linkHash(sidecar: string, position: number, sequence: number, prev: Buffer, payload: Uint8Array): Buffer {
  const nums = Buffer.allocUnsafe(16)
  nums.writeBigUInt64BE(BigInt(position), 0)
  nums.writeBigUInt64BE(BigInt(sequence), 8)
  return createHash('sha256').update(DOMAIN).update(sidecar).update('\0').update(nums).update(prev).update(payload).digest()
}

/** The columns a store indexes, derived from the event; verify re-derives and compares them. */
export interface Row {
  event: AuditEvent
  sequence: number
  position: number
  id: string
  ts: number
  agent: string
  agentType: string
  host: string
  port: number
  action: number
  audience: string
  payload: Buffer
  prev: Buffer
  hash: Buffer
}

/** agent:<type>:<env>:<instance> → type; anything else → "unknown". */
export function agentType(agent: string): string {
  const parts = agent.split(':')
  return parts.length >= 4 && parts[0] === 'agent' && parts[1] ? parts[1] : 'unknown'
}


/** The highest TCP port; the sidecar sends 0 for a call that had none (refused before one was known). */
const MAX_PORT = 65_535

/**
 * The actions the protocol defines (protos' `Action`, without ts-proto's UNRECOGNIZED): proto3
 * enums are open, so an int32 on the wire can carry any other number, which no query's "denied"
 * filter knows and PostgreSQL's smallint column may not hold.
 */
const ACTIONS: ReadonlySet<number> = new Set(Object.values(Action).filter((v): v is number => typeof v === 'number' && v !== Action.UNRECOGNIZED))
const MAX_ACTION = Math.max(...ACTIONS)

/** The numeric fields stored in columns of their own, out of their range; null when both fit. */
function outOfRange(ev: AuditEvent): string | null {
  const port = ev.call?.port ?? 0
  if (!Number.isInteger(port) || port < 0 || port > MAX_PORT) return `call.port ${port} is not a TCP port (1 to ${MAX_PORT}, or 0 for none)`
  const action = ev.decision?.action ?? 0
  if (!ACTIONS.has(action)) return `decision.action ${action} is not an action the protocol defines (0 to ${MAX_ACTION})`
  return null
}

/** The event fields stored in text columns besides the payload, by the name a refusal gives. */
const NUL_CHECKED: ReadonlyArray<readonly [string, (ev: AuditEvent) => string]> = [
  ['id', (ev) => ev.id],
  ['delegation.agent', (ev) => ev.delegation?.agent ?? ''],
  ['call.host', (ev) => ev.call?.host ?? ''],
  ['credential.audience', (ev) => ev.credential?.audience ?? ''],
]

/** An ID as quoted in a refusal: bounded, since the refusal travels back as a gRPC status. */
function clip(s: string): string {
  return s.length > 100 ? `${s.slice(0, 100)}…` : s
}

/** Size limits per field, in UTF-8 bytes: see lib/audit-limits.ts (the sidecar cuts to them). */
export { FIELD_LIMITS, MAX_EVENT_BYTES } from '../../lib/audit-limits.js'
import { FIELD_LIMITS, MAX_EVENT_BYTES } from '../../lib/audit-limits.js'

const STRING_FIELDS: ReadonlyArray<readonly [string, (ev: AuditEvent) => string | undefined]> = [
  ['id', (ev) => ev.id],
  ['delegation.user', (ev) => ev.delegation?.user],
  ['delegation.agent', (ev) => ev.delegation?.agent],
  ['delegation.task', (ev) => ev.delegation?.task],
  ['call.method', (ev) => ev.call?.method],
  ['call.scheme', (ev) => ev.call?.scheme],
  ['call.host', (ev) => ev.call?.host],
  ['call.path', (ev) => ev.call?.path],
  ['call.destination', (ev) => ev.call?.destination],
  ['call.address', (ev) => ev.call?.address],
  ['call.trace_id', (ev) => ev.call?.traceId],
  ['call.via', (ev) => ev.call?.via],
  ['decision.rule', (ev) => ev.decision?.rule],
  ['decision.reason', (ev) => ev.decision?.reason],
  ['decision.error', (ev) => ev.decision?.error],
  ['credential.provider', (ev) => ev.credential?.provider],
  ['credential.audience', (ev) => ev.credential?.audience],
  ['credential.jti', (ev) => ev.credential?.jti],
  ['process.executable', (ev) => ev.process?.executable],
]

function utf8Over(s: string, limit: number): number | null {
  if (s.length * 3 <= limit) return null
  const n = Buffer.byteLength(s)
  return n > limit ? n : null
}

/** The first field past its limit, as a refusal names it; null when all fit. */
export function oversizedField(ev: AuditEvent, payloadBytes: number): string | null {
  for (const [name, get] of STRING_FIELDS) {
    const limit = (FIELD_LIMITS as Record<string, number>)[name] ?? FIELD_LIMITS.default
    const n = utf8Over(get(ev) ?? '', limit)
    if (n !== null) return `${name} is ${n} bytes, more than ${limit}`
  }
  const scopes = ev.credential?.scopes ?? []
  if (scopes.length > FIELD_LIMITS.scopes) return `credential.scopes has ${scopes.length} entries, more than ${FIELD_LIMITS.scopes}`
  for (const sc of scopes) {
    const n = utf8Over(sc, FIELD_LIMITS.default)
    if (n !== null) return `a credential.scopes entry is ${n} bytes, more than ${FIELD_LIMITS.default}`
  }
  // Every field fits: what is left is fields this collector does not know, which no query shows.
  if (payloadBytes > MAX_EVENT_BYTES) return `the event is ${payloadBytes} bytes encoded, more than ${MAX_EVENT_BYTES}`
  return null
}

export function isDenied(action: number): boolean {
  return action === Action.ACTION_DENY || action === Action.ACTION_REPORT
}

/**
 * Validates a batch and drops duplicates (already stored, or repeated inside the batch). Returns
 * the new events in the order received. `stored` maps each sequence already held to its event ID:
 * a resend carries the same event, while another event under a held sequence (a sidecar that lost
 * its spool and counts from 1 again, or a second process sharing its id) is refused, never acked
 * as a duplicate, so the sidecar keeps it, says so, and nothing is lost in silence. Two different
 * events under one sequence in the same batch are refused alike. `headSequence` is the highest
 * sequence the chain holds: a new event must come after it (and after the batch's earlier ones).
 */
export function newEvents(
  sidecar: string,
  events: SequencedEvent[],
  stored: Map<number, string>,
  headSequence = 0,
  /** The batch's event IDs already stored anywhere in the store: id → where. */
  idsHeld: Map<string, { sidecar: string; sequence: number }> = new Map(),
): SequencedEvent[] {
  if (!sidecar) throw new StoreError('LK_STORE_BAD_BATCH', 'batch has no sidecar id')
  const seen = new Map<number, string>()
  const seenIds = new Map<string, number>()
  let head = headSequence
  const out: SequencedEvent[] = []
  for (const e of events) {
    if (!Number.isSafeInteger(e.sequence) || e.sequence < 1) {
      throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${String(e.sequence)} is not a positive integer`)
    }
    if (!e.event) throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence} carries no event`)
    if (!e.event.delegation?.agent) {
      throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence} has no delegation.agent`)
    }
    // No sidecar's clock reads before 1970: such an event would be counted by the inventory yet
    // never returned by a query (which starts at 0).
    if (!Number.isSafeInteger(e.event.timeUnixMs) || e.event.timeUnixMs <= 0) {
      throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence} has no time (time_unix_ms must be a positive epoch time)`)
    }
    // Nor past the last instant a Date holds: every reader (the CLI, the inventory) would fail on
    // it, and an open-ended query ("since 24h") would return it for ever.
    if (e.event.timeUnixMs > MAX_DATE_MS) {
      throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence} has a time beyond year 275760 (time_unix_ms ${e.event.timeUnixMs})`)
    }
    // The indexed text columns: PostgreSQL's text cannot hold U+0000 (it would fail the batch as
    // if the store were down, and the sidecar would retry it for ever), so neither store takes one.
    const nul = NUL_CHECKED.find(([, get]) => get(e.event!).includes('\u0000'))
    if (nul) throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence}: ${nul[0]} contains a NUL character`)
    // Port and action have columns of their own (the inventory's host:port, the "denied" filter):
    // a value the sidecar never sends is refused, as PostgreSQL's integer and smallint would
    // refuse the larger ones as if the store were down, and the sidecar would retry for ever.
    const range = outOfRange(e.event)
    if (range) throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence}: ${range}`)
    const raw = (e as { raw?: Uint8Array }).raw
    const big = oversizedField(e.event, raw ? raw.byteLength : AuditEvent.encode(e.event).finish().byteLength)
    if (big) throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence}: ${big}`)
    const held = stored.get(e.sequence)
    if (held !== undefined && held !== e.event.id) {
      throw new StoreError(
        'LK_STORE_BAD_BATCH',
        `sidecar ${sidecar}: sequence ${e.sequence} already holds another event; the sidecar is counting again from a lost spool, or two sidecars share this id: give it a new sidecar id (its events stay spooled)`,
      )
    }
    if (held !== undefined) continue
    const earlier = seen.get(e.sequence)
    if (earlier !== undefined) {
      // The same event twice in one batch is a duplicate; two events under one sequence are the
      // conflict above, refused alike whether the second comes in a later batch or this one.
      if (earlier === e.event.id) continue
      throw new StoreError(
        'LK_STORE_BAD_BATCH',
        `sidecar ${sidecar}: sequence ${e.sequence} appears twice in the batch with different events (${clip(earlier)}, ${clip(e.event.id)}): a sidecar numbers each event once`,
      )
    }
    // A sidecar's spool sends in sequence order and resends from its last ack, so every sequence
    // below what it already delivered is either stored (a resend: a duplicate) or lost at the
    // sidecar for good. A new one there is an event written into the past after the fact: refused,
    // so nothing can be backdated into a gap of a chain.
    if (e.sequence <= head) {
      throw new StoreError(
        'LK_STORE_BAD_BATCH',
        `sidecar ${sidecar}: sequence ${e.sequence} was never stored but the chain already holds sequence ${head}: a sidecar sends in order, so an unseen sequence below its head is refused`,
      )
    }
    // An event ID names one call: the same ID under another sequence, or another sidecar, is a
    // replay (a stolen batch re-sent with a sidecar's token), and would list the call twice.
    const elsewhere = idsHeld.get(e.event.id)
    const inBatch = seenIds.get(e.event.id)
    if (elsewhere || inBatch !== undefined) {
      const where = elsewhere ? `sidecar ${clip(elsewhere.sidecar)} sequence ${elsewhere.sequence}` : `sequence ${inBatch} of this batch`
      throw new StoreError('LK_STORE_BAD_BATCH', `sidecar ${sidecar}: sequence ${e.sequence}: event id ${clip(e.event.id)} is already stored under ${where}: an event is recorded once`)
    }
    seenIds.set(e.event.id, e.sequence)
    head = e.sequence
    seen.set(e.sequence, e.event.id)
    out.push(e)
  }
  return out
}

/** The batch's event IDs worth looking up: those the batch checks would not refuse anyway. */
export function askableIds(events: SequencedEvent[]): string[] {
  return events.map((e) => e.event?.id ?? '').filter((id) => id.length <= FIELD_LIMITS.default && !id.includes('\u0000'))
}

/** Builds the chained rows for new events after the head (position, hash). */
export function chainRows(sidecar: string, events: SequencedEvent[], headPosition: number, headHash: Buffer): Row[] {
  const rows: Row[] = []
  let prev = headHash
  let position = headPosition
  for (const e of events as Array<SequencedEvent & { raw?: Uint8Array }>) {
    const { sequence, raw } = e
    const ev = e.event!
    // The bytes as received when the ingest kept them (collector/wire.ts); else encoded here.
    const payload = raw ? Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength) : Buffer.from(AuditEvent.encode(ev).finish())
    position++
    const hash = linkHash(sidecar, position, sequence, prev, payload)
    rows.push({
      event: ev,
      sequence,
      position,
      id: ev.id,
      ts: ev.timeUnixMs,
      agent: ev.delegation!.agent,
      agentType: agentType(ev.delegation!.agent),
      host: ev.call?.host ?? '',
      port: ev.call?.port ?? 0,
      action: ev.decision?.action ?? 0,
      audience: ev.credential?.audience ?? '',
      payload,
      prev,
      hash,
    })
    prev = hash
  }
  return rows
}

/** A just-stored row as a StoredEvent (no decode: the row holds the event). */
export function rowToStored(sidecar: string, r: Row): StoredEvent {
  return { sidecar, sequence: r.sequence, position: r.position, event: r.event, hash: r.hash.toString('hex'), bytes: r.payload.byteLength }
}

export function toStored(sidecar: string, r: { sequence: number; position: number; payload: Uint8Array; hash: Uint8Array }): StoredEvent {
  return { sidecar, sequence: r.sequence, position: r.position, event: AuditEvent.decode(r.payload), hash: Buffer.from(r.hash).toString('hex'), bytes: r.payload.byteLength }
}

/**
 * Checks one sidecar's links, in position order. Returns the first break, or null. `prev` is the
 * expected previous hash; the caller feeds links in order.
 */
export class ChainVerifier {
  private prev: Buffer = GENESIS
  private expectPosition = 1
  private lastSequence = 0
  checked = 0
  /** Set by check() when the link's sequence does not follow the previous link's: the previous one. */
  gapAfter: number | null = null
  constructor(readonly sidecar: string) {}

  check(r: VerifiedRow): string | null {
    this.checked++
    if (r.position !== this.expectPosition) return `position ${r.position} follows ${this.expectPosition - 1}: a link is missing`
    this.expectPosition++
    if (!Buffer.from(r.prev).equals(this.prev)) return 'prev does not equal the previous link hash'
    const hash = linkHash(this.sidecar, r.position, r.sequence, this.prev, r.payload)
    if (!hash.equals(Buffer.from(r.hash))) return 'hash does not match the stored payload (payload or hash altered)'
    this.prev = hash
    this.gapAfter = r.sequence === this.lastSequence + 1 ? null : this.lastSequence
    this.lastSequence = r.sequence
    let ev: AuditEvent
    try {
      ev = AuditEvent.decode(r.payload)
    } catch {
      return 'payload is not a valid AuditEvent'
    }
    // Every column a query or the inventory reads instead of the payload, re-derived from it.
    const agent = ev.delegation?.agent ?? ''
    const want: Array<[string, unknown, unknown]> = [
      ['id', ev.id, r.id],
      ['ts', ev.timeUnixMs, r.ts],
      ['agent', agent, r.agent],
      ['agent_type', agentType(agent), r.agentType],
      ['host', ev.call?.host ?? '', r.host],
      ['port', ev.call?.port ?? 0, r.port],
      ['action', ev.decision?.action ?? 0, r.action],
      ['audience', ev.credential?.audience ?? '', r.audience],
    ]
    const differ = want.filter(([, a, b]) => a !== b).map(([name]) => name)
    if (differ.length > 0) return `indexed column(s) ${differ.join(', ')} differ from the payload`
    return null
  }
}

/** A stored link as verify reads it: the hashed parts and every column derived from the payload. */
export type VerifiedRow = Omit<Row, 'event' | 'payload' | 'prev' | 'hash'> & { payload: Uint8Array; prev: Uint8Array; hash: Uint8Array }

/**
 * The cursor each append moves to the head it reached, in the same transaction (a row per sidecar
 * in audit_cursors): it anchors chains whether or not a fan-out is configured.
 */
export const INGEST_CURSOR = 'ingest'

/**
 * The rows alone cannot show a chain's tail (or all of it) removed: what is left still links. The
 * cursors are a cross-check: the ingest's own and a fan-out's never move past what was stored, so
 * a cursor beyond a chain's head means links were removed after it was saved. Adds one break per such
 * sidecar (unless it already has one). `only`: the sidecar verify was asked about.
 */
export function checkAgainstCursors(result: VerifyResult, heads: Map<string, number>, cursors: Array<{ name: string; sidecar: string; pos: number }>, only?: string): void {
  const broken = new Set(result.breaks.map((b) => b.sidecar))
  const key = (c: { sidecar: string; name: string }) => [c.sidecar, c.name === INGEST_CURSOR ? '' : c.name]
  const order = (a: { sidecar: string; name: string }, b: { sidecar: string; name: string }) => {
    const [x, y] = [key(a), key(b)]
    return x[0]! < y[0]! ? -1 : x[0]! > y[0]! ? 1 : x[1]! < y[1]! ? -1 : x[1]! > y[1]! ? 1 : 0
  }
  for (const c of cursors.sort(order)) {
    if (only !== undefined && c.sidecar !== only) continue
    const head = heads.get(c.sidecar) ?? 0
    if (c.pos <= head || broken.has(c.sidecar)) continue
    broken.add(c.sidecar)
    result.ok = false
    result.breaks.push({
      sidecar: c.sidecar,
      position: head + 1,
      sequence: 0,
      reason:
        (head === 0 ? 'no link is stored' : `the chain ends at position ${head}`) +
        (c.name === INGEST_CURSOR ? `, but the collector stored up to position ${c.pos}` : `, but consumer "${c.name}" already handled position ${c.pos}`) +
        (head === 0 ? ': the whole chain was removed' : ': links were removed from its tail'),
    })
  }
}
