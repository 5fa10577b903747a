// The ClientHello reader a TLS tunnel's server name is judged by: the framings real clients
// send, and hostile ones (split, duplicated, overrun, oversized), each read or refused.
import t from 'tap'
import { createServer, type AddressInfo } from 'node:net'
import { connect as tlsConnect } from 'node:tls'
import { once } from 'node:events'
import { readClientHello, shownName, MAX_CLIENT_HELLO, MAX_HELLO_BUFFER } from '../proxy/listen/client-hello.js'
import { HelloRetryWatch } from '../proxy/listen/hello-retry.js'
import { LatchkeyError } from '../proxy/errors.js'
import { clientHello, extension, handshake, helloBody, records, serverNameExtension } from './helpers/client-hello.js'

const named = (name: string) => handshake(helloBody([serverNameExtension(name)]))

const cases: [string, Buffer, { kind: string; serverName?: string | null; reason?: RegExp; need?: number; end?: number }][] = [
  ['one record, a name', clientHello('api.example'), { kind: 'hello', serverName: 'api.example' }],
  ['no server_name extension', clientHello(null), { kind: 'hello', serverName: null }],
  ['no extensions block at all (TLS 1.2)', records(handshake(helloBody(null))), { kind: 'hello', serverName: null }],
  ['the name as sent: case and trailing dot kept (the tunnel normalises)', clientHello('API.Example.'), { kind: 'hello', serverName: 'API.Example.' }],
  ['split across two records', records(named('a.example'), [10]), { kind: 'hello', serverName: 'a.example' }],
  ['split across three records, the handshake header itself split', records(named('a.example'), [2, 1]), { kind: 'hello', serverName: 'a.example' }],
  ['0-RTT data after the last record is not read, and where the ClientHello ends is said', Buffer.concat([clientHello('a.example'), Buffer.from([23, 3, 3, 0, 1, 0])]), { kind: 'hello', serverName: 'a.example', end: clientHello('a.example').length }],
  ['the record header only', clientHello('a.example').subarray(0, 5), { kind: 'partial', need: clientHello('a.example').length }],
  ['one byte', Buffer.from([22]), { kind: 'partial', need: 5 }],
  ['first of two records', records(named('a.example'), [10]).subarray(0, 15), { kind: 'partial', need: 20 }],
  ['a record of another type first', Buffer.concat([Buffer.from([21, 3, 3, 0, 2, 2, 40]), clientHello('a.example')]), { kind: 'malformed', reason: /interrupted by a TLS record of type 21/ }],
  ['an application-data record between fragments', Buffer.concat([records(named('a.example'), [10]).subarray(0, 15), Buffer.from([23, 3, 3, 0, 1, 0])]), { kind: 'malformed', reason: /type 23/ }],
  ['a record version that is not 3.x', Buffer.from([22, 2, 0, 0, 1, 1]), { kind: 'malformed', reason: /unknown version/ }],
  ['a zero-length record', Buffer.from([22, 3, 1, 0, 0]), { kind: 'malformed', reason: /record of 0 bytes/ }],
  ['a record over 2^14', Buffer.from([22, 3, 1, 0x40, 1]), { kind: 'malformed', reason: /record of 16385 bytes/ }],
  ['a handshake that is not a ClientHello (ServerHello)', records(handshake(helloBody([]), 2)), { kind: 'malformed', reason: /first handshake message is of type 2/ }],
  ['a ClientHello over the bound', records(handshake(helloBody([extension(21, Buffer.alloc(MAX_CLIENT_HELLO))])), [16384]), { kind: 'malformed', reason: /longer than the 16384 bytes read/ }],
  ['one-byte records, more than 64', records(named('a.example'), new Array<number>(100).fill(1)), { kind: 'malformed', reason: /split across more than 64 TLS records/ }],
  ['64 records are read', records(named('a.example'), new Array<number>(63).fill(1)), { kind: 'hello', serverName: 'a.example' }],
  ['a full-size record, its header only', Buffer.from([22, 3, 1, 0x40, 0]), { kind: 'partial', need: 16389 }],
  ['bytes after the ClientHello in its record', records(Buffer.concat([named('a.example'), Buffer.from([1, 0, 0, 0])])), { kind: 'malformed', reason: /shares its last TLS record/ }],
  ['a body too short for its random', records(handshake(Buffer.alloc(10))), { kind: 'malformed', reason: /ends inside its random/ }],
  ['a session id over 32', records(handshake(Buffer.concat([Buffer.alloc(34), Buffer.from([33]), Buffer.alloc(40)]))), { kind: 'malformed', reason: /session id of 33/ }],
  ['an odd cipher-suite length', records(handshake(Buffer.concat([Buffer.alloc(34), Buffer.from([0, 0, 3, 1, 2, 3, 1, 0])]))), { kind: 'malformed', reason: /cipher suite list of 3/ }],
  ['no compression method', records(handshake(Buffer.concat([Buffer.alloc(34), Buffer.from([0, 0, 2, 0x13, 1, 0])]))), { kind: 'malformed', reason: /no compression method/ }],
  ['an extensions length that overruns', records(handshake(Buffer.concat([helloBody(null), Buffer.from([0, 50]), serverNameExtension('a.example')]))), { kind: 'malformed', reason: /extensions length that does not end/ }],
  ['an extension that overruns the block', records(handshake(Buffer.concat([helloBody(null), Buffer.from([0, 6, 0, 0, 0, 9, 0, 0])]))), { kind: 'malformed', reason: /overruns the extensions/ }],
  ['two server_name extensions', records(handshake(helloBody([serverNameExtension('a.example'), serverNameExtension('b.example')]))), { kind: 'malformed', reason: /extension of type 0 twice/ }],
  ['any extension twice', records(handshake(helloBody([extension(43, Buffer.from([2, 3, 4])), extension(43, Buffer.from([2, 3, 4]))]))), { kind: 'malformed', reason: /type 43 twice/ }],
  ['two names in one list', records(handshake(helloBody([serverNameExtension('a.example', 'b.example')]))), { kind: 'malformed', reason: /names more than one server/ }],
  ['a list length that does not match', records(handshake(helloBody([extension(0, Buffer.from([0, 9, 0, 0, 1, 97]))]))), { kind: 'malformed', reason: /list length does not match/ }],
  ['an empty server_name extension', records(handshake(helloBody([extension(0, Buffer.alloc(0))]))), { kind: 'malformed', reason: /list length does not match/ }],
  ['a name length that overruns its list', records(handshake(helloBody([extension(0, Buffer.from([0, 4, 0, 0, 9, 97]))]))), { kind: 'malformed', reason: /overruns its list/ }],
  ['a name of another type than host_name', records(handshake(helloBody([extension(0, Buffer.from([0, 4, 1, 0, 1, 97]))]))), { kind: 'malformed', reason: /server name of type 1/ }],
  ['a name with a NUL (a C reader stops there)', records(named('allowed.example\0.denied.example')), { kind: 'malformed', reason: /"allowed\.example\\x00\.denied\.example", not a DNS host name/ }],
  ['a name with / (a URL parser stops there)', records(named('allowed.example/x')), { kind: 'malformed', reason: /not a DNS host name/ }],
  ['a name with UTF-8 (IDN comes as punycode)', records(handshake(helloBody([serverNameExtension(Buffer.from('bücher.example'))]))), { kind: 'malformed', reason: /"b\\xc3\\xbccher\.example"/ }],
  ['a name longer than DNS allows', records(named('a'.repeat(300))), { kind: 'malformed', reason: /"a{64}\.\.\."/ }],
]

for (const [name, bytes, expected] of cases) {
  t.test(name, async (t) => {
    t.match(readClientHello(bytes), expected)
  })
}

t.test('a ClientHello split at every byte boundary reads the same once whole, and partial before', async (t) => {
  const hello = records(named('split.example'), [7, 30])
  for (let cut = 1; cut < hello.length; cut++) {
    const read = readClientHello(hello.subarray(0, cut))
    if (read.kind !== 'partial' || read.need <= cut) return t.fail(`cut at ${cut}: ${JSON.stringify(read)}`)
  }
  t.match(readClientHello(hello), { kind: 'hello', serverName: 'split.example' })
})

t.test('the bounds hold: a ClientHello of exactly MAX_CLIENT_HELLO bytes is read, in records of the most a record holds', async (t) => {
  const filler = MAX_CLIENT_HELLO - named('a.example').length - 4
  const big = handshake(helloBody([serverNameExtension('a.example'), extension(21, Buffer.alloc(filler))]))
  t.equal(big.length, MAX_CLIENT_HELLO)
  const framed = records(big, [16384])
  t.ok(framed.length <= MAX_HELLO_BUFFER)
  t.match(readClientHello(framed), { kind: 'hello', serverName: 'a.example' })
})

t.test("a real client's ClientHello (Node's OpenSSL) is read, its name found", async (t) => {
  const server = createServer((s) => {
    s.once('data', (d: Buffer) => {
      first = d
      s.destroy()
    })
  })
  let first: Buffer | null = null
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => server.close())
  const client = tlsConnect({ host: '127.0.0.1', port: (server.address() as AddressInfo).port, servername: 'real.example', ALPNProtocols: ['h2', 'http/1.1'] })
  await new Promise((resolve) => client.on('error', () => {}).on('close', resolve))
  t.match(readClientHello(first!), { kind: 'hello', serverName: 'real.example' })
})

t.test('shownName keeps an attacker-chosen name to one printable, bounded, quoted line', async (t) => {
  t.equal(shownName('a.example'), '"a.example"')
  t.equal(shownName('a"b\\c\r\n\u0085'), '"a\\x22b\\x5cc\\x0d\\x0a\\x85"')
  t.equal(shownName('x'.repeat(1000)), `"${'x'.repeat(64)}..."`)
})

t.test("the watch past the first ClientHello: what the server's first answer lets through, and what a second ClientHello must name", async (t) => {
  const judge = (name: string | null) => (name === 'a.example' ? null : new LatchkeyError('LK_TLS_NAME_MISMATCH', `named ${name}`))
  const serverHello = (random: Buffer) => records(handshake(Buffer.concat([Buffer.from([3, 3]), random, Buffer.from([0, 0x13, 1, 0])]), 2))
  const retry = serverHello(Buffer.from('cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c', 'hex'))
  const changeCipherSpec = Buffer.from([20, 3, 3, 0, 1, 1])
  const earlyData = Buffer.from([23, 3, 3, 0, 3, 7, 7, 7])
  const second = clientHello('a.example')

  let w = new HelloRetryWatch(judge)
  t.same(w.client(Buffer.concat([changeCipherSpec, earlyData])), { send: Buffer.concat([changeCipherSpec, earlyData]), done: false }, 'before the answer: a ChangeCipherSpec and 0-RTT data go on')
  t.same(w.client(Buffer.concat([earlyData.subarray(0, 6), earlyData.subarray(6), second.subarray(0, 3)])), { send: earlyData, done: false }, 'a handshake record is held, from its first byte')
  t.same(w.server(serverHello(Buffer.alloc(32, 1)).subarray(0, 20)), { send: Buffer.alloc(0), done: false }, 'a ServerHello is read to the end of its random')
  t.same(w.server(serverHello(Buffer.alloc(32, 1)).subarray(20)), { send: second.subarray(0, 3), done: true }, 'an ordinary ServerHello ends the watch, the held bytes go on')

  w = new HelloRetryWatch(judge)
  w.client(second)
  t.same(w.server(Buffer.from([21, 3, 3, 0, 2, 2, 40])), { send: second, done: true }, 'an alert for an answer ends the watch too')

  w = new HelloRetryWatch(judge)
  const oneByteRecords = Buffer.concat([...retry.subarray(5)].map((b) => Buffer.from([22, 3, 3, 0, 1, b])))
  t.match(w.server(oneByteRecords), { code: 'LK_UPSTREAM_PROTOCOL', reason: /more than 8 records/ }, "a server head spread thin is refused: its being a retry request cannot be ruled out")

  w = new HelloRetryWatch(judge)
  t.match(w.client(Buffer.alloc(MAX_HELLO_BUFFER + 1, 22)), { code: 'LK_BAD_REQUEST', reason: /before the server's first answer/ }, 'what is held is bounded')

  w = new HelloRetryWatch(judge)
  t.same(w.server(retry), { send: Buffer.alloc(0), done: false }, 'a retry request: the watch reads the second ClientHello')
  t.same(w.client(Buffer.concat([changeCipherSpec, second.subarray(0, 10)])), { send: changeCipherSpec, done: false }, 'its ChangeCipherSpec goes on, the ClientHello is held till whole')
  t.same(w.client(second.subarray(10)), { send: second, done: true }, 'whole, naming the host: it goes on and the watch ends')

  w = new HelloRetryWatch(judge)
  w.server(retry)
  t.match(w.client(clientHello('b.example')), { code: 'LK_TLS_NAME_MISMATCH', reason: /^in the ClientHello after the server's HelloRetryRequest, named b\.example$/ }, 'naming another: refused')
  w = new HelloRetryWatch(judge)
  w.server(retry)
  t.same(w.client(Buffer.from([23, 3, 3, 0, 1, 0, 21, 3, 3])), { send: Buffer.from([23, 3, 3, 0, 1, 0]), done: false }, 'other records pass while the second ClientHello is awaited')
  t.same(w.client(Buffer.from([0, 2])), { send: Buffer.from([21, 3, 3, 0, 2]), done: false }, 'their headers read across writes')
  t.match(w.client(Buffer.from([2, 40, 22, 3, 3, 0, 4, 2, 0, 0, 0])), { code: 'LK_BAD_REQUEST', reason: /after the server's HelloRetryRequest, the tunnel's TLS ClientHello is not one/ }, 'a handshake record that is no ClientHello: refused')
})
