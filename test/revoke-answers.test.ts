// `latchkey revoke|unrevoke` at a --broker that is not the broker (a mistyped port): one that never
// answered held the command for undici's five minutes, in the incident it was run for, and one
// whose answer had no end was read whole into memory (2.5 GB in 20 s). Real servers; the command
// in-process, its lines to stderr caught.
import t, { type Test } from 'tap'
import { createServer, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { revokeCommand } from '../cli/revoke.js'

async function serve(t: Test, answer: (res: ServerResponse) => void): Promise<string> {
  const server = createServer((_req, res) => answer(res))
  server.listen(0, '127.0.0.1')
  await new Promise((resolve) => server.once('listening', resolve))
  t.teardown(() => {
    server.closeAllConnections()
    return new Promise((resolve) => server.close(resolve))
  })
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
}

/** The command's exit code and what it printed to stderr; `null` when it had not ended within `withinMs`. */
async function run(op: 'revoke' | 'unrevoke', broker: string, answerMs: number, withinMs: number): Promise<{ code: number; stderr: string } | null> {
  const lines: string[] = []
  const error = console.error
  console.error = (line: string) => void lines.push(line)
  try {
    const ended = revokeCommand(op, 'agent:demo:dev:local', { broker, tokenEnv: 'T' }, { T: 'not-a-real-token' }, answerMs).then((code) => ({ code, stderr: lines.join('\n') }))
    return await Promise.race([ended, new Promise<null>((resolve) => setTimeout(() => resolve(null), withinMs).unref())])
  } finally {
    console.error = error
  }
}

t.test('a --broker that never answers is given up on at the deadline, saying nothing is known to be done', async (t) => {
  const silent = await serve(t, () => {})
  for (const op of ['revoke', 'unrevoke'] as const) {
    const r = await run(op, silent, 500, 10_000)
    t.ok(r, `${op}: ends by itself`)
    t.same(r, { code: 1, stderr: `${op}: the broker at ${silent} did not answer within 0.5 s: nothing is known to be ${op}d; check --broker, and run it again (twice is harmless)` }, `${op}: says so`)
  }
  // Headers, then a body that stops: the deadline holds for the whole answer.
  const stalled = await serve(t, (res) => {
    res.writeHead(201, { 'content-type': 'application/json' })
    res.write('{"created":')
  })
  const r = await run('revoke', stalled, 500, 10_000)
  t.same(r, { code: 1, stderr: `revoke: the broker at ${stalled} did not answer within 0.5 s: nothing is known to be revoked; check --broker, and run it again (twice is harmless)` })
})

t.test('an answer without end is read no further than 1 MiB, and is no broker\'s', async (t) => {
  // 64 MiB in all, then the end: read whole (as before) it is no JSON either; cut, it is never all sent.
  const TOTAL = 64 * 1024 * 1024
  let sent = 0
  let closedEarly = false
  const endless = await serve(t, (res) => {
    res.writeHead(201, { 'content-type': 'application/json' })
    const chunk = Buffer.alloc(64 * 1024, '[')
    res.on('close', () => (closedEarly = sent < TOTAL))
    const write = () => {
      while (sent < TOTAL) {
        sent += chunk.length
        if (!res.write(chunk)) return void res.once('drain', write)
      }
      res.end()
    }
    write()
  })
  const r = await run('revoke', endless, 20_000, 30_000)
  t.same(r, { code: 1, stderr: `revoke: the answer from ${endless} (HTTP 201) is not a Latchkey broker's: nothing is known to be revoked; check --broker` })
  await new Promise((resolve) => setTimeout(resolve, 200))
  t.ok(closedEarly, `the command went away before the end (${sent} of ${TOTAL} bytes sent)`)
})
