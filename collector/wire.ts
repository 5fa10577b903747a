// The ingest request decoded by hand, keeping each AuditEvent's bytes exactly as received: the
// store hashes and stores those bytes, so nothing is encoded a second time on the hot path.
import { BinaryReader } from '@bufbuild/protobuf/wire'
import { AuditEvent, type SequencedEvent } from '../protos/gen/latchkey/v1/audit.js'

/** A SequencedEvent plus its AuditEvent's wire bytes. */
export type ReceivedEvent = SequencedEvent & { raw?: Uint8Array }

export interface ReceivedBatch {
  sidecarId: string
  events: ReceivedEvent[]
}

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
  const events: ReceivedEvent[] = []
  while (r.pos < r.len) {
    const tag = r.uint32()
    if (tag === 10) sidecarId = r.string()
    else if (tag === 18) events.push(decodeSequenced(r.bytes()))
    else r.skip(tag & 7)
  }
  return { sidecarId, events }
}
