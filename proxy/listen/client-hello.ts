// The TLS ClientHello at the start of a CONNECT tunnel, read for its server name (SNI) alone, so
// the name the TLS client asks the upstream for can be held to the host the CONNECT was decided
// for (tunnel.ts). Strict and bounded, failing closed: the agent writes every byte, and a name
// this parser and the upstream's TLS stack would read differently is domain fronting.
//
// Read: TLS records of type 22 (handshake; RFC 8446 §5.1), as many as the ClientHello spans
// (splitting it across records, or across TCP segments, is a known way past SNI inspection),
// then the ClientHello (§4.1.2), its extensions (§4.2) and the server_name extension (RFC 6066
// §3). Refused: any other record type before the ClientHello is whole, a zero-length or
// over-long record, a first handshake message that is not a ClientHello, a length that overruns
// what holds it or leaves bytes unaccounted for, a ClientHello over MAX_CLIENT_HELLO or across
// more than MAX_HELLO_RECORDS records, any
// extension twice (RFC 8446 §4.2; OpenSSL refuses it too), a server_name extension with other
// than exactly one host_name, and a host_name with bytes no DNS name has.
// Not read here: anything past the ClientHello's last record (0-RTT data may follow it in the
// same segment; a second ClientHello after a HelloRetryRequest is hello-retry.ts's) and every
// other extension. encrypted_client_hello (0xfe0d) is not looked into:
// Chromium sends a GREASE one in every ClientHello, indistinguishable from real ECH, so its
// presence refuses nothing; the outer SNI is judged, and real ECH's (the provider's public name)
// then fails to match. What the inner ClientHello names cannot be seen; that is the residual.

/** The largest ClientHello (handshake message, header included) read; past it the tunnel is refused. Chromium's, post-quantum key share and all, is under 2 KiB. */
export const MAX_CLIENT_HELLO = 16 * 1024
/**
 * The most TLS records a ClientHello is read across. Real clients use one; an
 * evasion splits it into many, each of which costs the tunnel a read of all before it again.
 */
export const MAX_HELLO_RECORDS = 64
/** Bytes buffered before the ClientHello must be whole: it, and a 5-byte header for each record it is split across. */
export const MAX_HELLO_BUFFER = MAX_CLIENT_HELLO + MAX_HELLO_RECORDS * 5

const RECORD_HANDSHAKE = 22
const HANDSHAKE_CLIENT_HELLO = 1
const EXT_SERVER_NAME = 0
const NAME_TYPE_HOST_NAME = 0
/** RFC 8446 §5.1: a record's fragment is at most 2^14 bytes. */
const MAX_RECORD = 16384
/** A DNS name's length with a trailing dot (RFC 1035: 253 without). */
const MAX_HOST_NAME = 254
/** Letters, digits, hyphen, dot; underscore, which real names carry (`_dmarc`, some CDN hosts). IDN comes as punycode (RFC 6066 §3). */
const HOST_NAME_BYTES = /^[A-Za-z0-9._-]+$/

export type ClientHelloRead =
  /** More bytes are needed: nothing new can be read before the tunnel has sent `need` in all (within the bound). */
  | { kind: 'partial'; need: number }
  /** The ClientHello, whole: its server name, or null if it sent none; `end`, where its last record ends in the bytes read. */
  | { kind: 'hello'; serverName: string | null; end: number }
  /** Not a ClientHello this reads without guessing: why, for the operator. */
  | { kind: 'malformed'; reason: string }

const malformed = (why: string): ClientHelloRead => ({ kind: 'malformed', reason: `the tunnel's TLS ClientHello ${why}` })

/**
 * Reads the ClientHello at the start of `bytes` (all the tunnel has sent so far). One record
 * holding it, the common case, costs no copy; fragments across records are joined once, when
 * the ClientHello is whole.
 */
export function readClientHello(bytes: Buffer): ClientHelloRead {
  const fragments: Buffer[] = []
  let held = 0
  /** The ClientHello's length, header included, once its 4-byte header is in. */
  let whole = -1
  let at = 0
  for (;;) {
    if (whole < 0 && held >= 4) {
      const header = fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments, 4)
      if (header[0] !== HANDSHAKE_CLIENT_HELLO) return malformed(`is not one: its first handshake message is of type ${header[0]}`)
      whole = 4 + header.readUIntBE(1, 3)
      if (whole > MAX_CLIENT_HELLO) return malformed(`is longer than the ${MAX_CLIENT_HELLO} bytes read (${whole})`)
    }
    if (whole >= 0 && held >= whole) {
      // A ClientHello is alone in its flight (RFC 8446 §4): nothing else shares its records.
      if (held > whole) return malformed('shares its last TLS record with other bytes')
      const hello = fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments, held)
      return readBody(hello.subarray(4), at)
    }
    if (bytes.length - at < 5) return partial(at + 5)
    if (bytes[at] !== RECORD_HANDSHAKE) return malformed(`is interrupted by a TLS record of type ${bytes[at]}`)
    if (bytes[at + 1] !== 3) return malformed('is in a TLS record of an unknown version')
    const length = bytes.readUInt16BE(at + 3)
    // RFC 8446 §5.1: no zero-length handshake fragment (an endless run of them would pass any bound on the ClientHello).
    if (length === 0 || length > MAX_RECORD) return malformed(`is in a TLS record of ${length} bytes (1 to ${MAX_RECORD})`)
    if (at + 5 + length > MAX_HELLO_BUFFER) return tooSplit
    if (bytes.length - at - 5 < length) return partial(at + 5 + length)
    if (fragments.length === MAX_HELLO_RECORDS) return malformed(`is split across more than ${MAX_HELLO_RECORDS} TLS records`)
    fragments.push(bytes.subarray(at + 5, at + 5 + length))
    at += 5 + length
    held += length
  }
}

const tooSplit = malformed(`is not whole within ${MAX_HELLO_BUFFER} bytes (split across too many TLS records, or too long)`)
const partial = (need: number): ClientHelloRead => (need > MAX_HELLO_BUFFER ? tooSplit : { kind: 'partial', need })

/** The ClientHello's body (RFC 8446 §4.1.2; TLS 1.2's, RFC 5246 §7.4.1.2, has the same shape). */
function readBody(b: Buffer, end: number): ClientHelloRead {
  let at = 2 + 32 // legacy_version, random
  if (b.length < at + 1) return malformed('ends inside its random')
  const sessionId = b[at]!
  if (sessionId > 32) return malformed(`has a session id of ${sessionId} bytes (at most 32)`)
  at += 1 + sessionId
  if (b.length < at + 2) return malformed('ends before its cipher suites')
  const suites = b.readUInt16BE(at)
  if (suites < 2 || suites % 2 !== 0) return malformed(`has a cipher suite list of ${suites} bytes`)
  at += 2 + suites
  if (b.length < at + 1) return malformed('ends inside its cipher suites')
  const compressions = b[at]!
  if (compressions < 1) return malformed('has no compression method')
  at += 1 + compressions
  if (b.length < at) return malformed('ends inside its compression methods')
  // TLS 1.2 allows a ClientHello without extensions: it names no server.
  if (b.length === at) return { kind: 'hello', serverName: null, end }
  if (b.length < at + 2) return malformed('ends inside its extensions length')
  const extensionsEnd = at + 2 + b.readUInt16BE(at)
  if (extensionsEnd !== b.length) return malformed('has an extensions length that does not end where it does')
  at += 2
  const seen = new Set<number>()
  let serverName: string | null = null
  while (at < extensionsEnd) {
    if (extensionsEnd - at < 4) return malformed('ends inside an extension header')
    const type = b.readUInt16BE(at)
    const length = b.readUInt16BE(at + 2)
    at += 4
    if (extensionsEnd - at < length) return malformed(`has an extension (type ${type}) that overruns the extensions`)
    if (seen.has(type)) return malformed(`has the extension of type ${type} twice`)
    seen.add(type)
    if (type === EXT_SERVER_NAME) {
      const name = readServerName(b.subarray(at, at + length))
      if (typeof name !== 'string') return name
      serverName = name
    }
    at += length
  }
  return { kind: 'hello', serverName, end }
}

/** RFC 6066 §3: ServerNameList, held to exactly one entry, a host_name. */
function readServerName(e: Buffer): string | ClientHelloRead {
  if (e.length < 2 || e.readUInt16BE(0) !== e.length - 2) return malformed('has a server_name extension whose list length does not match it')
  if (e.length < 5) return malformed('has a server_name extension naming nothing')
  const type = e[2]
  const length = e.readUInt16BE(3)
  if (type !== NAME_TYPE_HOST_NAME) return malformed(`has a server name of type ${type} (only host_name, 0, is defined)`)
  if (length === 0 || 5 + length > e.length) return malformed('has a server name whose length overruns its list, or is 0')
  if (5 + length < e.length) return malformed('names more than one server')
  const raw = e.subarray(5, 5 + length)
  const name = raw.toString('latin1')
  if (length > MAX_HOST_NAME || !HOST_NAME_BYTES.test(name)) return malformed(`names the server ${shownName(name)}, not a DNS host name (letters, digits, -, _ and ., at most ${MAX_HOST_NAME})`)
  return name
}

/**
 * A server name the agent chose, fit for a log line, an audit event and a reason: quoted, at most
 * 64 characters of it, anything but printable ASCII (and `"`, `\`) as \xHH.
 */
export function shownName(name: string): string {
  const clipped = name.length > 64
  let out = ''
  for (const ch of clipped ? name.slice(0, 64) : name) {
    const c = ch.charCodeAt(0)
    out += c < 0x20 || c > 0x7e || ch === '"' || ch === '\\' ? `\\x${c.toString(16).padStart(2, '0')}` : ch
  }
  return `"${out}${clipped ? '...' : ''}"`
}
