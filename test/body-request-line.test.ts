// RequestLineScanner: finds `HTTP/` in any case, however a body is cut into chunks (see
// proxy/forward/body-request-line.ts and test/sidecar/pool-isolation.test.ts, where a CL.0
// upstream is sent the bodies it would read as a request).
import t from 'tap'
import { RequestLineScanner } from '../proxy/forward/body-request-line.js'

const found = (chunks: Buffer[]): boolean => {
  const s = new RequestLineScanner()
  return chunks.some((c) => s.feed(c))
}

t.test('found in any case, at any cut, in chunks of any size', async (t) => {
  const table: Array<[string, boolean]> = [
    ['DELETE /admin HTTP/1.1\r\nX: ', true],
    ['delete /admin http/1.1\r\n', true],
    ['GET / HtTp/1.0', true],
    ['HTTP/', true],
    ['xHTTP/', true],
    ['{"url": "https://example.com/a/b", "note": "HTTP 1.1"}', false],
    ['HTTP', false],
    ['HTTP /1.1', false],
    ['H/TTP/', false],
    ['//////', false],
    ['', false],
    // Bytes that agree with `http` in the low five bits only: a case fold by masking would take them.
    ['\x08\x14\x14\x10/', false],
    ['(4401/', false],
    // The other protocols llhttp reads a request line's version in, headers and all.
    ['GET /admin RTSP/1.0\r\nX: ', true],
    ['SOURCE /admin ice/1.0\r\n', true],
    ['RTSP', false],
    ['ICE /', false],
    ['(CE/', false],
    // ICE only as a version, after its space: bodies name /service/ and /device/ all the time.
    ['{"url": "/api/service/device/price/"}', false],
    ['xICE/1.0', false],
  ]
  for (const [text, want] of table) {
    const bytes = Buffer.from(text, 'latin1')
    t.equal(found([bytes]), want, `${JSON.stringify(text)} whole`)
    for (let cut = 1; cut < bytes.length; cut++) t.equal(found([bytes.subarray(0, cut), bytes.subarray(cut)]), want, `${JSON.stringify(text)} cut at ${cut}`)
    t.equal(found([...bytes].map((b) => Buffer.from([b]))), want, `${JSON.stringify(text)} a byte at a time`)
    t.equal(found([Buffer.alloc(0), bytes.subarray(0, 2), Buffer.alloc(0), bytes.subarray(2)]), want, `${JSON.stringify(text)} with empty chunks between`)
  }
})

t.test('a first line that is a request line without a version (HTTP/0.9), split as Python splits it', async (t) => {
  const table: Array<[string, boolean]> = [
    ['GET /admin/x\r\nX-Ignore: ', true],
    ['GET /admin/x\n', true],
    ['DELETE /admin/x \r\n', true],
    // Leading blank space and lines, which nginx skips and str.split() ignores.
    ['\r\n\r\n  GET /admin/x\r\n', true],
    // Separators Python's str.split() splits a Latin-1 line at, besides the space.
    ['GET\t/admin\n', true],
    ['GET\x0c/admin\n', true],
    ['GET\x0b/admin\n', true],
    ['GET\r/admin\n', true],
    ['GET\x1f/admin\n', true],
    ['GET\x85/admin\n', true],
    ['GET\xa0/admin\n', true],
    ['hello world\n', true],
    // Not two words, the first a token, on a first line that ends: no such request line.
    ['GET /admin/x', false],
    ['GET\n/admin x\n', false],
    ['GET /admin x y\n', false],
    ['GET /admin xHTTP\n', false],
    ['/admin x\n', false],
    ['{"a": 1}\n', false],
    ['a=1&b=2\n', false],
    ['a=1 b\n', false],
    ['onlyoneword\n', false],
    ['\n\n', false],
    ['x\n GET /admin\n', false],
    ['\x00GET /a\n', false],
  ]
  for (const [text, want] of table) {
    const bytes = Buffer.from(text, 'latin1')
    t.equal(found([bytes]), want, `${JSON.stringify(text)} whole`)
    for (let cut = 1; cut < bytes.length; cut++) t.equal(found([bytes.subarray(0, cut), bytes.subarray(cut)]), want, `${JSON.stringify(text)} cut at ${cut}`)
    t.equal(found([...bytes].map((b) => Buffer.from([b]))), want, `${JSON.stringify(text)} a byte at a time`)
  }
  // Read as far as the first line: a body of a megabyte with no line end costs its first bytes only.
  const s = new RequestLineScanner()
  t.notOk(s.feed(Buffer.from('{"x": "' + 'a'.repeat(1 << 20) + '"}')), 'JSON: not a request line, and not read past its first byte for one')
  t.notOk(new RequestLineScanner().feed(Buffer.from('A'.repeat(1 << 20) + ' /x\n')), 'a word longer than any method is none')
  t.notOk(new RequestLineScanner().feed(Buffer.from('GET /' + 'a'.repeat(70_000) + '\n')), 'a line longer than a server reads as a request line is none')
  t.ok(new RequestLineScanner().feed(Buffer.from('GET /' + 'a'.repeat(60_000) + '\n')), 'a long one within it is')
})

t.test('found deep in a large body, and not in one without it', async (t) => {
  const body = Buffer.alloc(1 << 20, '/a/')
  t.notOk(found([body]), 'a megabyte of slashes')
  body.write('http/', 700_000, 'latin1')
  t.ok(found([body.subarray(0, 700_002), body.subarray(700_002)]), 'cut in the middle of it, deep in the body')
})
