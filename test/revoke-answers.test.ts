// `latchkey revoke|unrevoke` at a --broker that is not the broker (a mistyped port): one that never
// answered held the command for undici's five minutes, in the incident it was run for, and one
// whose answer had no end was read whole into memory (2.5 GB in 20 s). Real servers; the command
// in-process, its lines to stderr caught.
import t, { type Test } from 'tap'
import type { ServerResponse } from 'node:http'
import { startUpstream } from './helpers/harness.js'
import { endlessAnswer } from './helpers/endless-answer.js'
import { revokeCommand } from '../cli/revoke.js'

/** A server answering each request with `answer`, closed at the test's end. */
async function serve(t: Test, answer: (res: ServerResponse) => void): Promise<string> {
  const server = await startUpstream({
    handler: (_req, res) => {
      answer(res)
      return true
    },
  })
  t.teardown(server.close)
  return server.origin
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
  const endless = endlessAnswer(201)
  const url = await serve(t, endless.answer)
  const r = await run('revoke', url, 20_000, 30_000)
  t.same(r, { code: 1, stderr: `revoke: the answer from ${url} (HTTP 201) is not a Latchkey broker's: nothing is known to be revoked; check --broker` })
  await new Promise((resolve) => setTimeout(resolve, 200))
  const { closedEarly, sent, total } = endless.outcome()
  t.ok(closedEarly, `the command went away before the end (${sent} of ${total} bytes sent)`)
})
