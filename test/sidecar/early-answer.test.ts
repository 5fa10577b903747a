// An upstream that answers an upload before reading it (nginx's client_max_body_size 413, an API's
// 401) and closes: its kernel resets the connection, the sidecar's next body write fails, and the
// answer waits unread. It must reach the agent as the upstream sent it, not as a retryable 502
// that SDKs answer by sending the whole upload again (forward/early-answer.ts).
import t from 'tap'
import { createServer, type Server } from 'node:http'
import { once } from 'node:events'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { writeFileSync, mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { startTestSidecar, loopbackPolicy, assertNoCanary, CANARY } from '../helpers/harness.js'

const run = promisify(execFile)

async function listen(server: Server): Promise<number> {
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return (server.address() as AddressInfo).port
}

t.test('an answer sent before the upload was read reaches the agent, not a 502', async (t) => {
  const seen: string[] = []
  // Answers at once, reading nothing: node:http closes with the body unread, so the kernel resets.
  const upstream = createServer((req, res) => {
    seen.push(`${req.method} ${req.url} ${req.headers.authorization === `Bearer ${CANARY}` ? 'credential' : 'none'}`)
    res.writeHead(413, { 'content-type': 'application/json', connection: 'close' })
    res.end('{"error":"too large"}')
  })
  const port = await listen(upstream)
  // One that takes the upload's head and then goes, answering nothing: still a 502.
  const silent = createServer((req) => req.socket.destroy())
  const silentPort = await listen(silent)
  const s = await startTestSidecar({
    ...loopbackPolicy([port, silentPort]),
    credentials: [{ id: 'up', audience: `http://127.0.0.1:${port}`, source: 'static', secret: 'CANARY', inject: { type: 'bearer' } }],
  })
  t.teardown(async () => {
    await s.close()
    upstream.close()
    silent.close()
  })
  const file = join(mkdtempSync(join(tmpdir(), 'lk-early-')), 'upload.bin')
  writeFileSync(file, Buffer.alloc(8 * 1024 * 1024, 'x'))

  const statuses: string[] = []
  for (const expect of [[], ['-H', 'Expect:']]) {
    for (let i = 0; i < 10; i++) {
      const out = await run('curl', ['-sS', '-x', s.proxy, ...expect, '-T', file, '-w', '\n%{http_code}', `http://127.0.0.1:${port}/upload`])
      statuses.push(out.stdout.replace(/\n/g, ' '))
    }
  }
  t.same(new Set(statuses), new Set(['{"error":"too large"} 413']), "all 20 uploads got the upstream's own 413 and body, with Expect: 100-continue and without")
  t.equal(seen.length, 20, 'each reached the upstream once')
  t.ok(seen.every((l) => l === 'PUT /upload credential'), 'with the credential')

  const lost = await run('curl', ['-sS', '-x', s.proxy, '-T', file, '-w', '\n%{http_code}', `http://127.0.0.1:${silentPort}/upload`])
  t.match(lost.stdout, /"code":"LK_UPSTREAM_UNREACHABLE"[^]*\n502$/, 'an upstream that answered nothing is still a 502 (not a hang)')

  const audit = await s.audit()
  t.equal(audit.filter((e) => e.status === 413 && e.error === null).length, 20, 'audited as the 413s they were')
  t.equal(audit.filter((e) => e.status === 502 && e.error === 'LK_UPSTREAM_UNREACHABLE').length, 1)
  assertNoCanary(t, s, ...statuses, lost.stdout)
})
