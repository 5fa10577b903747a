// The ingest request decoded by hand, keeping each AuditEvent's bytes exactly as received: the
// store hashes and stores those bytes, so nothing is encoded a second time on the hot path.
import { BinaryReader } from '@bufbuild/protobuf/wire'
import { AuditEvent, type SequencedEvent } from '../protos/gen/latchkey/v1/audit.js'

/** A SequencedEvent plus its AuditEvent's wire bytes. */
export type ReceivedEvent = SequencedEvent & { raw?: Uint8Array }

export interface ReceivedBatch {
  sidecarId: string
  events: ReceivedEvent[]
  /** Set, with no event decoded, when the batch holds more than MAX_BATCH_EVENTS. */
  oversized?: number
}

/**
 * A sidecar sends at most audit.collector.batch_events (≤ 10,000) per batch. Many more tiny events
 * fit in max_batch_bytes: 150,000 of them took the collector from 92 to 323 MB of RSS once decoded,
 * so they are counted before any is decoded.
 */
export const MAX_BATCH_EVENTS = 10_000

function decodeSequenced(buf: Uint8Array): ReceivedEvent {
  const r = new BinaryReader(buf)
  let sequence = 0
  let raw: Uint8Array | undefined
  while (r.pos < r.len) {
    const tag = r.uint32()
    if (tag === 8) {
      const v = r.uint64()
      // Out of range is left to the store, which names it.
      sequence = typeof v === 'bigint' && v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.NaN : Number(v)
    } else if (tag === 18) raw = r.bytes()
    else r.skip(tag & 7)
  }
  return { sequence, event: raw ? AuditEvent.decode(raw) : undefined, raw }
}

export function decodeIngestRequest(buf: Uint8Array): ReceivedBatch {
  const r = new BinaryReader(buf)
  let sidecarId = ''
  const entries: Uint8Array[] = []
  while (r.pos < r.len) {
    const tag = r.uint32()
    if (tag === 10) sidecarId = r.string()
    else if (tag === 18) entries.push(r.bytes())
    else r.skip(tag & 7)
  }
  if (entries.length > MAX_BATCH_EVENTS) return { sidecarId, events: [], oversized: entries.length }
  return { sidecarId, events: entries.map(decodeSequenced) }
}
