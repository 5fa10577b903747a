// `latchkey revoke|unrevoke`: the operator's side of the broker's admin API. Exit 0 when the
// broker confirmed, 1 with the broker's reason otherwise; prints the time the broker took.
import type { RevocationKind } from '../broker/revocations/store.js'
import { withoutUserinfo } from '../lib/without-userinfo.js'
import { readJsonObject } from '../lib/json-answer.js'

const DEFAULT_BROKER_URL = 'http://127.0.0.1:15003'
/**
 * How long the broker has to answer, in all. It answers a revocation at once; a service at a
 * mistyped --broker that never answered held the command five minutes (undici's own timeout), in
 * the incident it was run for.
 */
const ANSWER_MS = 30_000
/** The most of an answer read: the broker's is some hundred bytes; another service's can be without end (2.5 GB in 20 s). */
const MAX_ANSWER_BYTES = 1024 * 1024

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

export async function revokeCommand(
  op: 'revoke' | 'unrevoke',
  agent: string | undefined,
  opts: { task?: string; jti?: string; reason?: string; broker?: string; tokenEnv: string },
  env: NodeJS.ProcessEnv = process.env,
  answerMs = ANSWER_MS,
): Promise<number> {
  const targets: [RevocationKind, string | undefined][] = [
    ['agent', agent],
    ['task', opts.task],
    ['jti', opts.jti],
  ]
  const given = targets.filter(([, v]) => v !== undefined) as [RevocationKind, string][]
  if (given.length !== 1) {
    console.error(`${op}: name exactly one of: an agent instance ID, --task <id>, --jti <id>`)
    return 2
  }
  const [kind, value] = given[0]!
  const token = env[opts.tokenEnv]
  if (!token) {
    console.error(`${op}: set ${opts.tokenEnv} to the broker's admin token`)
    return 2
  }
  // --broker, else LATCHKEY_BROKER_URL: named in errors by where it was given, and shown without
  // userinfo. fetch refuses a URL that carries some, in an error that quoted it whole (password
  // and all), and one that does not parse in an error quoting it too: both are said here instead.
  const [brokerUrl, where] = opts.broker !== undefined ? [opts.broker, '--broker'] : env.LATCHKEY_BROKER_URL !== undefined ? [env.LATCHKEY_BROKER_URL, 'LATCHKEY_BROKER_URL'] : [DEFAULT_BROKER_URL, '--broker']
  let url: URL
  try {
    url = new URL(brokerUrl)
  } catch {
    console.error(`${op}: ${where} is not a URL (http://host:port expected)`)
    return 2
  }
  if (url.username || url.password) {
    // Shown as the URL parser read it, its userinfo masked.
    console.error(`${op}: ${where} ${url.protocol}//***@${url.host}: must not carry userinfo (user:password@): the broker takes the admin token from ${opts.tokenEnv}`)
    return 2
  }
  const base = brokerUrl.replace(/\/$/, '')
  const started = performance.now()
  const signal = AbortSignal.timeout(answerMs)
  const late = () => {
    console.error(`${op}: the broker at ${base} did not answer within ${answerMs / 1000} s: nothing is known to be ${op === 'revoke' ? 'revoked' : 'unrevoked'}; check --broker, and run it again (twice is harmless)`)
    return 1
  }
  let res: Response
  try {
    res =
      op === 'revoke'
        ? await fetch(`${base}/v1/revocations`, {
            method: 'POST',
            headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
            body: JSON.stringify({ kind, value, ...(opts.reason ? { reason: opts.reason } : {}) }),
            signal,
          })
        : await fetch(`${base}/v1/revocations/${kind}/${encodeURIComponent(value)}`, { method: 'DELETE', headers: { authorization: `Bearer ${token}` }, signal })
  } catch (err) {
    if (signal.aborted) return late()
    // fetch says only "fetch failed"; why (ECONNREFUSED, ENOTFOUND, …) is in its cause.
    // Its message can quote the URL: any userinfo in a word of it is masked.
    const cause = (err as { cause?: { code?: unknown; message?: unknown } }).cause
    const why = String(cause?.code ?? cause?.message ?? (err as Error).message).split(/\s+/).map(withoutUserinfo).join(' ')
    console.error(`${op}: cannot reach the broker at ${base}: ${why}`)
    return 1
  }
  let answer: Record<string, unknown> | undefined | 'too large'
  try {
    answer = res.body ? await readJsonObject(res.body, MAX_ANSWER_BYTES) : undefined
  } catch {
    // Cut off mid-answer: by the timeout, or the connection.
    if (signal.aborted) return late()
    answer = undefined
  }
  const body = (typeof answer === 'object' ? answer : {}) as {
    error_description?: string
    created?: unknown
    removed?: unknown
    revocation?: { kind?: unknown; value?: unknown }
    registered?: unknown
    connected?: unknown
  }
  const ms = (performance.now() - started).toFixed(1)
  // Success is the broker's own answer about this revocation, not any 2xx: another service at a
  // mistyped --broker (or a proxy's page) answering 200 had an operator believe the agent stopped.
  const notTheBroker = () => {
    console.error(`${op}: the answer from ${base} (HTTP ${res.status}) is not a Latchkey broker's: nothing is known to be ${op === 'revoke' ? 'revoked' : 'unrevoked'}; check --broker`)
    return 1
  }
  if (answer === 'too large') return notTheBroker()
  if (op === 'revoke' && (res.status === 201 || res.status === 200)) {
    if (typeof body.created !== 'boolean' || body.revocation?.kind !== kind || body.revocation.value !== value) return notTheBroker()
    console.log(`${kind} ${value} ${body.created ? 'revoked' : 'was already revoked'} (${ms} ms)`)
    // A mistyped ID is revoked as readily as the right one, and the agent meant runs on: say what
    // the broker knows of it (an older broker says nothing, and neither is this).
    if (body.registered === false) {
      console.error(`warning: no agent type in the broker's registry has instances like ${value} (agent:<type>:<env>:<instance>): check the ID; the revocation stands`)
    } else if (kind === 'task' && UUID.test(value) && value !== value.toLowerCase()) {
      // Task IDs are opaque and matched exactly, and the sidecar's are lowercase UUIDs: one copied
      // through something that upper-cased it was "revoked" while the task it meant ran on.
      console.error(`warning: ${value} has upper-case letters; task IDs are matched exactly and a sidecar's are lower-case (${value.toLowerCase()}): check the ID; the revocation stands`)
    } else if (body.connected === 0) {
      console.error(
        `warning: no sidecar of ${value} has a control stream open to this broker: check the ID; a sidecar connected to another replica, or connecting later, is still told`,
      )
    }
    return 0
  }
  if (op === 'unrevoke' && res.status === 200) {
    if (body.removed !== true) return notTheBroker()
    console.log(`${kind} ${value} unrevoked (${ms} ms)`)
    return 0
  }
  if (op === 'unrevoke' && res.status === 404 && body.removed === false) {
    console.error(`${kind} ${value} was not revoked`)
    return 1
  }
  console.error(`${op}: broker answered ${res.status}: ${body.error_description ?? 'no reason given'}`)
  return 1
}
