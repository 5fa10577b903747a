// A fault in the sidecar itself (an exception no stage meant to throw) is the sidecar's, not the
// upstream's: a 500 LK_INTERNAL the agent is told not to retry, its detail logged for the operator
// without the message, which can quote a URL and the credential in it. No stage is known to throw
// now (a path reading that did, proxy/policy/paths.ts, was the last found), so the fault is made here.
import t from 'tap'
import { LatchkeyError, asLatchkeyError, renderError, type InternalErrorDetail } from '../proxy/errors.js'

const CANARY = 'CANARY-internal-7c1e'

t.test('an unexpected exception: 500 LK_INTERNAL, not retryable, its message never logged or shown', async (t) => {
  const logged: InternalErrorDetail[] = []
  const err = asLatchkeyError(new TypeError(`Invalid URL: https://api.example/x?key=${CANARY}`), (d) => logged.push(d))
  t.equal(err.code, 'LK_INTERNAL')
  const r = renderError(err)
  t.equal(r.status, 500)
  t.same(JSON.parse(r.body), { error: 'internal', code: 'LK_INTERNAL', rule: null, reason: 'internal error in the sidecar', retryable: false })
  t.equal(r.headers['x-should-retry'], 'false', 'SDKs that retry any 5xx are told not to')
  t.equal(logged.length, 1, 'logged once')
  t.equal(logged[0]!.type, 'TypeError')
  t.match(logged[0]!.frames, /internal-errors\.test/, 'with the frames that point at the fault')
  t.notOk(JSON.stringify(logged).includes(CANARY) || r.body.includes(CANARY), 'the message, and the credential it quoted, in neither')
})

t.test('a message over several lines: none of it is logged as frames, even lines that look like frames', async (t) => {
  // The frames were the stack's lines after its first: the rest of a message that ran over lines.
  const logged: InternalErrorDetail[] = []
  asLatchkeyError(new Error(`cannot parse:\nAuthorization: Bearer ${CANARY}\n    at https://api.example/x?key=${CANARY}`), (d) => logged.push(d))
  t.match(logged[0]!.frames, /^ {4}at .*internal-errors\.test/, 'the frames begin with the first real one')
  t.notOk(JSON.stringify(logged).includes(CANARY), 'no line of the message is logged')
})

t.test('a coded error passes as it is; a thrown non-Error still gets a coded answer', async (t) => {
  const coded = new LatchkeyError('LK_POLICY_DENIED', 'denied by rule x', 'x')
  t.equal(asLatchkeyError(coded, () => t.fail('not logged')), coded)
  const logged: InternalErrorDetail[] = []
  t.equal(asLatchkeyError(`a string with ${CANARY}`, (d) => logged.push(d)).code, 'LK_INTERNAL')
  t.equal(asLatchkeyError(null, (d) => logged.push(d)).code, 'LK_INTERNAL')
  t.same(logged, [{ code: undefined, type: undefined, frames: undefined }, { code: undefined, type: undefined, frames: undefined }])
})

t.test('the status line says the status in words, as node:http does, for every code', async (t) => {
  // A 408 said "408 Error": the phrases were a hand-kept table that lacked it.
  t.match(renderError(new LatchkeyError('LK_REQUEST_TIMEOUT', 'slow')).statusText, /^Request Timeout \(/)
  t.match(renderError(new LatchkeyError('LK_INTERNAL', 'x')).statusText, /^Internal Server Error \(/)
  t.match(renderError(new LatchkeyError('LK_POLICY_DENIED', 'x', 'r')).statusText, /^Forbidden \(LK_POLICY_DENIED, rule r: x\)$/)
})
