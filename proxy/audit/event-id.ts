// Call ids: random (version 4) UUIDs, as crypto.randomUUID makes them, but formatted a batch at a
// time. randomUUID builds each id from ~20 string concatenations, ~600 bytes of garbage per call;
// here a batch of ids is one string, and an id is a slice of it.
import { randomFillSync } from 'node:crypto'

const BATCH = 128
const HEX = Buffer.from('0123456789abcdef', 'latin1')
const bytes = Buffer.alloc(16 * BATCH)
const text = Buffer.alloc(36 * BATCH)

let ids = ''
let next = BATCH

function refill(): void {
  randomFillSync(bytes)
  let o = 0
  for (let u = 0; u < BATCH; u++) {
    const b = u * 16
    bytes[b + 6] = (bytes[b + 6]! & 0x0f) | 0x40 // version 4
    bytes[b + 8] = (bytes[b + 8]! & 0x3f) | 0x80 // RFC 9562 variant
    for (let i = 0; i < 16; i++) {
      if (i === 4 || i === 6 || i === 8 || i === 10) text[o++] = 0x2d // '-'
      const x = bytes[b + i]!
      text[o++] = HEX[x >> 4]!
      text[o++] = HEX[x & 15]!
    }
  }
  ids = text.toString('latin1')
  // Nothing of the random bytes outlives the batch's text.
  bytes.fill(0)
}

/** A fresh version 4 UUID, lower-case hex, as crypto.randomUUID returns. */
export function newEventId(): string {
  if (next === BATCH) {
    refill()
    next = 0
  }
  const at = next++ * 36
  return ids.slice(at, at + 36)
}
