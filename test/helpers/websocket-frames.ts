// WebSocket frames as an upstream writes them (RFC 6455 §5.2: unmasked), for test servers: the
// sidecar reads what an upstream sends on a credentialed WebSocket frame by frame, so a test
// upstream speaks frames, not raw bytes. An agent's are masked (§5.3): clientFrame.
import { randomBytes } from 'node:crypto'

/** One unmasked frame: `opcode` 1 (text) by default, FIN set unless `fin` is false. */
export function serverFrame(payload: Buffer | string, opts: { opcode?: number; fin?: boolean } = {}): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload) : payload
  const b0 = (opts.fin === false ? 0 : 0x80) | (opts.opcode ?? 0x1)
  if (body.length < 126) return Buffer.concat([Buffer.from([b0, body.length]), body])
  if (body.length < 65536) {
    const h = Buffer.from([b0, 126, 0, 0])
    h.writeUInt16BE(body.length, 2)
    return Buffer.concat([h, body])
  }
  const h = Buffer.alloc(10)
  h[0] = b0
  h[1] = 127
  h.writeBigUInt64BE(BigInt(body.length), 2)
  return Buffer.concat([h, body])
}

/** One frame as a client writes it: serverFrame's, masked with a random key. */
export function clientFrame(payload: Buffer | string, opts: { opcode?: number; fin?: boolean } = {}): Buffer {
  const plain = serverFrame(payload, opts)
  const at = plain.length - (typeof payload === 'string' ? Buffer.byteLength(payload) : payload.length)
  const key = randomBytes(4)
  const body = plain.subarray(at).map((b, i) => b ^ key[i % 4]!)
  const head = Buffer.from(plain.subarray(0, at))
  head[1] = head[1]! | 0x80
  return Buffer.concat([head, key, body])
}

/** A Close frame's payload read: its status code and reason. */
export function closeOf(payload: Buffer): { code: number; reason: string } {
  return { code: payload.readUInt16BE(0), reason: payload.subarray(2).toString() }
}

/**
 * The payloads of the frames in `bytes`, in order (whole frames only), unmasked if masked; `end`
 * is where each frame ends in `bytes` (the last one's is bytes.length when nothing follows it).
 */
export function framePayloads(bytes: Buffer): { opcode: number; fin: boolean; masked: boolean; payload: Buffer; end: number }[] {
  const out: { opcode: number; fin: boolean; masked: boolean; payload: Buffer; end: number }[] = []
  let i = 0
  while (i + 2 <= bytes.length) {
    const len7 = bytes[i + 1]! & 0x7f
    let at = i + 2
    let len = len7
    if (len7 === 126) {
      len = bytes.readUInt16BE(at)
      at += 2
    } else if (len7 === 127) {
      len = Number(bytes.readBigUInt64BE(at))
      at += 8
    }
    const key = bytes[i + 1]! & 0x80 ? bytes.subarray(at, (at += 4)) : null
    if (at + len > bytes.length) break
    const payload = key ? Buffer.from(bytes.subarray(at, at + len).map((b, j) => b ^ key[j % 4]!)) : bytes.subarray(at, at + len)
    out.push({ opcode: bytes[i]! & 0x0f, fin: (bytes[i]! & 0x80) !== 0, masked: key !== null, payload, end: at + len })
    i = at + len
  }
  return out
}
