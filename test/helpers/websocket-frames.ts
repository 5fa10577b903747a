// WebSocket frames as an upstream writes them (RFC 6455 §5.2: unmasked), for test servers: the
// sidecar reads what an upstream sends on a credentialed WebSocket frame by frame, so a test
// upstream speaks frames, not raw bytes.

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

/** The payloads of the unmasked frames in `bytes`, in order (whole frames only). */
export function framePayloads(bytes: Buffer): { opcode: number; fin: boolean; payload: Buffer }[] {
  const out: { opcode: number; fin: boolean; payload: Buffer }[] = []
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
    if (at + len > bytes.length) break
    out.push({ opcode: bytes[i]! & 0x0f, fin: (bytes[i]! & 0x80) !== 0, payload: bytes.subarray(at, at + len) })
    i = at + len
  }
  return out
}
