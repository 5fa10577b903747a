// Differential: the path the policy judged against the path common servers route. Hostile
// spellings of a denied path go through a real sidecar, on each entry path, to a raw-socket
// upstream that records each request line exactly as it came; every line forwarded is then read
// by a small model of each server's normalisation below, and none may route where policy denies.
import t from 'tap'
import type { Socket } from 'node:net'
import { startTcpUpstream, startTestSidecar, rawRequest, insideTunnel, type RawResponse } from '../helpers/harness.js'

/** Every %XX a byte, the bytes read as UTF-8 (a bad sequence as U+FFFD, as Python's unquote reads it). */
function decodeBytes(s: string): string {
  return Buffer.from(s.replace(/%([0-9A-Fa-f]{2})|[^%]+|%/g, (m: string, hex?: string) => (hex ? String.fromCharCode(parseInt(hex, 16)) : Buffer.from(m).toString('latin1'))), 'latin1').toString('utf8')
}

/** Strict UTF-8 decoding of every %XX, or null where it fails (Go, Tomcat and IIS answer 400). */
function decodeStrict(s: string): string | null {
  try {
    return decodeURIComponent(s)
  } catch {
    return null
  }
}

/** Dot segments resolved, slashes merged; one above the root clamped (Python, Go) or refused (nginx, Tomcat, IIS: null). */
function resolved(p: string, clamp: boolean): string | null {
  const out: string[] = []
  const segments = p.split('/').slice(1)
  for (const s of segments) {
    if (s === '' || s === '.') continue
    if (s === '..') {
      if (out.length === 0 && !clamp) return null
      out.pop()
    } else out.push(s)
  }
  const last = segments.at(-1)
  return '/' + out.join('/') + (out.length && (last === '' || last === '.' || last === '..') ? '/' : '')
}

const pathOf = (target: string) => target.split('?')[0]!

/** Each server's reading of a request target: the path it routes, or null where it refuses the request. */
const SERVERS: Record<string, (target: string) => string | null> = {
  // Node's documented `new URL(req.url, base)` (Express matches the path as sent, which this reads
  // the same but for a leading `//`; case-blind, as the check below is).
  'node URL': (x) => new URL(x, 'http://base').pathname,
  // Python's http.server: cut at `?` and `#`, every escape decoded (%2F too), normpath.
  'python http.server': (x) => resolved(decodeBytes(x.split('?')[0]!.split('#')[0]!), true),
  // nginx: every escape decoded, merge_slashes, dot segments (above the root: 400).
  nginx: (x) => resolved(decodeBytes(pathOf(x)), false),
  // Go's net/http: URL.Path decoded, then cleanPath.
  'go net/http': (x) => {
    const p = decodeStrict(pathOf(x))
    return p === null ? null : resolved(p, true)
  },
  // Tomcat: `;params` dropped from each segment, an encoded / or \ refused, decoded, normalised.
  tomcat: (x) => {
    const bare = pathOf(x).replace(/;[^/]*/g, '')
    if (/%2f|%5c/i.test(bare)) return null
    const p = decodeStrict(bare)
    return p === null || p.includes('\\') ? null : resolved(p, false)
  },
  // IIS: decoded, `\` is `/`, a segment's trailing dots and spaces dropped (Windows names), dot segments.
  iis: (x) => iis(decodeStrict(pathOf(x))),
  // A Windows server that folds compatibility forms first (fullwidth `／`, `＼`, `．`, `ａ` become
  // ASCII, as NFKC and an ANSI code page's best fit make them), then reads the path as IIS does.
  'iis, fullwidth folded': (x) => iis(decodeStrict(pathOf(x))?.normalize('NFKC') ?? null),
}

function iis(p: string | null): string | null {
  if (p === null) return null
  const segments = p.replace(/\\/g, '/').split('/').map((s) => (s === '.' || s === '..' ? s : s.replace(/[. ]+$/, '')))
  return resolved(segments.join('/'), false)
}

/** The request lines a raw upstream was sent, with the Host each carried; each answered 200 "ok". */
async function recordingUpstream(t: Parameters<typeof startTcpUpstream>[0]) {
  const lines: { line: string; host: string; probe: string }[] = []
  const upstream = await startTcpUpstream(t, (s: Socket) => {
    let pending = ''
    s.on('data', (d: Buffer) => {
      pending += d.toString('latin1')
      for (let end = pending.indexOf('\r\n\r\n'); end !== -1; end = pending.indexOf('\r\n\r\n')) {
        const [line, ...headers] = pending.slice(0, end).split('\r\n')
        pending = pending.slice(end + 4)
        const header = (name: string) => headers.find((h) => h.toLowerCase().startsWith(name + ':'))?.slice(name.length + 1).trim() ?? ''
        lines.push({ line: line!, host: header('host'), probe: header('x-probe') })
        s.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')
      }
    })
  })
  return { ...upstream, lines }
}

// The generator: separators, dot segments and names, each spelled as some server reads it.
const SEPARATORS = ['/', '\\', '%2F', '%2f', '%5C', '%5c', '%252F', '%255C', '%EF%BC%8F', '%EF%BC%BC', '%EF%B9%A8', ';/', '/;x/', '//', '/./', '%3B/']
const DOTS = ['..', '%2e%2e', '%2E.', '.%2E', '%252e%252e', '%EF%BC%8E%EF%BC%8E', '%E2%80%A5', '%E2%80%A4%E2%80%A4', '..;', '..;x', '..%20', '..%3B', '%C0%AE%C0%AE', '..%00', '..%C2%A0']
/** Separators for the entry paths given fewer: a slash, and each way of spelling one a server decodes or folds. */
const FEW_SEPARATORS = ['/', '%2F', '%5C', '%EF%BC%BC']
const ADMINS = ['admin', 'ADMIN', '%61dmin', '%2561dmin', '%EF%BD%81dmin', 'admin.', 'admin%20', 'admin;x', 'admin%3F', 'admin%23', 'admin%2e', 'ad%C2%ADmin']

/** Spellings that climb out of `from` (a segment, a route's base) into each of `to`. */
function climbs(from: string, to: readonly string[], separators = SEPARATORS): string[] {
  const out: string[] = []
  for (const sep of separators) for (const dots of DOTS) for (const name of to) out.push(`${from}${sep}${dots}${sep}${name}`)
  return out
}

/** Sends each request, a few at a time, each on its own connection closed after its answer (a generous quiet wait: only a sidecar that fails to close waits it out). */
async function sendAll(port: number, requests: readonly string[], inTunnel: boolean): Promise<RawResponse[]> {
  const answers: RawResponse[] = new Array(requests.length)
  let next = 0
  const worker = async () => {
    for (let i = next++; i < requests.length; i = next++) {
      const r = await rawRequest(port, requests[i]!, 5_000)
      answers[i] = inTunnel ? insideTunnel(r) : r
    }
  }
  await Promise.all(Array.from({ length: 8 }, worker))
  return answers
}

t.test('no spelling the sidecar forwards is a path a common server routes where policy denies', async (t) => {
  const a = await recordingUpstream(t)
  const b = await recordingUpstream(t)
  const s = await startTestSidecar({
    policy: {
      default: 'deny',
      rules: [
        { id: 'no-admin', action: 'deny', hosts: ['127.0.0.1'], ports: [a.port], paths: ['/admin/**'] },
        { id: 'open-a', action: 'allow', hosts: ['127.0.0.1'], ports: [a.port] },
        { id: 'v1-only', action: 'allow', hosts: ['127.0.0.1'], ports: [b.port], paths: ['/v1/**'] },
      ],
    },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [a.port, b.port] }] },
    routes: { up: `http://127.0.0.1:${a.port}`, b: `http://127.0.0.1:${b.port}` },
  })
  t.teardown(() => s.close())
  const hostA = `127.0.0.1:${a.port}`
  const hostB = `127.0.0.1:${b.port}`
  const get = (target: string, host: string, probe: string) => `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nX-Probe: ${probe}\r\nConnection: close\r\n\r\n`
  // Each also names the other upstream in its Host header: the upstream dialled must get its own.
  // Every spelling through absolute-form; fewer through the others, whose paths are judged the
  // same way once read (the route's name read first, the tunnel's origin put on the path).
  const entries: [string, (path: string, probe: string) => string, boolean, string[]][] = [
    ['absolute-form', (p, probe) => get(`http://${hostA}${p}`, hostB, probe), false, [...climbs('/public', ['%EF%BD%81dmin', 'ADMIN%20']), ...ADMINS.flatMap((name) => SEPARATORS.map((sep) => `/${name}${sep}x`))]],
    ['reverse route', (p, probe) => get(`/up${p}`, '127.0.0.1', probe), false, climbs('/public', ['admin'], FEW_SEPARATORS)],
    ['origin-form inside a plaintext tunnel', (p, probe) => `CONNECT ${hostA} HTTP/1.1\r\nHost: ${hostA}\r\n\r\n` + get(p, hostB, probe), true, climbs('/public', ['Admin.'], FEW_SEPARATORS)],
  ]
  // Calls that must still pass.
  const legitimate = ['/public/x', '/public/projects/group%2Fproject/issues', '/public/caf%C3%A9', '/public/a%5Cb', '/public/..%2Fx', '/public/%EF%BD%81dmin']
  const probes = new Map<string, string>()
  for (const [entry, request, inTunnel, toAdmin] of entries) {
    const spellings = [...toAdmin, ...legitimate]
    const answers = await sendAll(s.sidecar.port, spellings.map((p, i) => request(p, `${entry}#${i}`)), inTunnel)
    spellings.forEach((p, i) => probes.set(`${entry}#${i}`, p))
    const statuses = new Set(answers.map((r) => r.status))
    t.same([...statuses].filter((x) => ![200, 400, 403].includes(x)), [], `${entry}: each answered, forwarded or refused`)
    t.same(legitimate.map((p) => answers[toAdmin.length + legitimate.indexOf(p)]!.status), legitimate.map(() => 200), `${entry}: the legitimate calls pass`)
  }
  // Out of /v1, where only /v1/** is allowed: inside the `b` route, in absolute form, and across
  // the boundary of a route into another (`/b/../up/admin` is route `up`'s /admin).
  const v1Entries: [string, (path: string, probe: string) => string, string[], string][] = [
    ['route b', (p, probe) => get(`/b${p}`, '127.0.0.1', probe), climbs('/v1', ['admin'], FEW_SEPARATORS), '/v1/projects/group%2Fproject/issues'],
    ['absolute-form v1', (p, probe) => get(`http://${hostB}${p}`, hostB, probe), climbs('/v1', ['other/x'], FEW_SEPARATORS), '/v1/projects/group%2Fproject/issues'],
    ['across routes', (p, probe) => get(p, '127.0.0.1', probe), climbs('/b', ['up/ADMIN.']), '/b/v1/x/../../../up/x'],
  ]
  for (const [entry, request, spellings, passes] of v1Entries) {
    const answers = await sendAll(s.sidecar.port, [...spellings, passes].map((p, i) => request(p, `${entry}#${i}`)), false)
    ;[...spellings, passes].forEach((p, i) => probes.set(`${entry}#${i}`, p))
    t.equal(answers.at(-1)!.status, 200, `${entry}: ${passes} passes`)
  }

  const target = (line: string) => line.split(' ')[1]!
  for (const [name, server] of Object.entries(SERVERS)) {
    const admin = a.lines.filter(({ line }) => /^\/admin(?:\/|$)/i.test(server(target(line)) ?? ''))
    t.same(admin.map(({ line, probe }) => `${probes.get(probe)} sent as ${line}`), [], `${name}: nothing forwarded routes to /admin`)
    const outside = b.lines.filter(({ line }) => {
      const routed = server(target(line))
      return routed !== null && !/^\/v1(?:\/|$)/.test(routed)
    })
    t.same(outside.map(({ line, probe }) => `${probes.get(probe)} sent as ${line}`), [], `${name}: nothing forwarded on the /v1 allow routes outside /v1`)
  }
  t.same(a.lines.filter(({ host }) => host !== hostA).map(({ line, host }) => `${line} Host: ${host}`), [], 'each upstream got its own Host, whatever the agent wrote')
  t.same(b.lines.filter(({ host }) => host !== hostB).map(({ line, host }) => `${line} Host: ${host}`), [], 'each upstream got its own Host, whatever the agent wrote (v1)')
})
