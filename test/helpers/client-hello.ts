// TLS ClientHellos built byte by byte, well-formed or not, for the tunnel's server-name check
// (proxy/listen/client-hello.ts): the framings a real client sends and the ones an evasion would.

const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff])
const u24 = (n: number) => Buffer.from([n >> 16, (n >> 8) & 0xff, n & 0xff])

/** One extension: type, length, data. */
export const extension = (type: number, data: Buffer): Buffer => Buffer.concat([u16(type), u16(data.length), data])

/** A server_name extension whose one list holds each name given (RFC 6066 §3), as host_name entries. */
export const serverNameExtension = (...names: (string | Buffer)[]): Buffer => {
  const entries = Buffer.concat(names.map((n) => (typeof n === 'string' ? Buffer.from(n, 'latin1') : n)).map((n) => Buffer.concat([Buffer.from([0]), u16(n.length), n])))
  return extension(0, Buffer.concat([u16(entries.length), entries]))
}

/** A ClientHello's body: TLS 1.2 legacy version, a zero random, no session id, one suite, null compression, then `extensions` (none: no extensions block at all). */
export const helloBody = (extensions: Buffer[] | null): Buffer => {
  const fixed = Buffer.concat([Buffer.from([3, 3]), Buffer.alloc(32), Buffer.from([0]), u16(2), Buffer.from([0x13, 0x01]), Buffer.from([1, 0])])
  if (extensions === null) return fixed
  const block = Buffer.concat(extensions)
  return Buffer.concat([fixed, u16(block.length), block])
}

/** A handshake message: type (1, ClientHello), 24-bit length, body. */
export const handshake = (body: Buffer, type = 1): Buffer => Buffer.concat([Buffer.from([type]), u24(body.length), body])

/** `message` in TLS handshake records: one, or one per size given (the last taking the rest). */
export const records = (message: Buffer, sizes: number[] = []): Buffer => {
  const out: Buffer[] = []
  let at = 0
  for (const size of [...sizes, message.length]) {
    if (at >= message.length) break
    const part = message.subarray(at, Math.min(at + size, message.length))
    out.push(Buffer.from([22, 3, 1]), u16(part.length), part)
    at += part.length
  }
  return Buffer.concat(out)
}

/** A well-formed ClientHello in one record, naming `serverName` (none if null) among a few other extensions (a GREASE ECH among them). */
export const clientHello = (serverName: string | null): Buffer =>
  records(
    handshake(
      helloBody([
        extension(0x0a0a, Buffer.alloc(0)),
        ...(serverName === null ? [] : [serverNameExtension(serverName)]),
        extension(0x002b, Buffer.from([2, 3, 4])),
        extension(0xfe0d, Buffer.alloc(32, 7)),
      ]),
    ),
  )
