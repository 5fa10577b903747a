// The sidecar's local task API, on its admin port (loopback):
//   POST   /v1/tasks            {purpose, duration_s, user_token?, audiences?} → 201 {task, id, proxy_url, …}
//   GET    /v1/tasks            the open tasks, by ID (never their handles): what an operator revokes by;
//                               a page at a time (?limit=, ?cursor=: listing.ts), in the order they were opened
//   GET    /v1/tasks/<handle>   the task (state: open | revoked) and the audiences it holds tokens for (never the tokens)
//   DELETE /v1/tasks/<handle>   ends it: every token it held is dropped
// Asking for audiences fetches their tokens now, and a user token is verified by the broker even
// when none is asked for, so a user token the broker refuses is reported to the agent when it
// opens the task, not on its first call.
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { CredentialBinding, CredentialSource, Identity, TaskRef } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { TaskError, type Task, type TaskRegistry } from './registry.js'
import { isCompactJws } from '../../lib/oauth.js'
import { parseJsonBody } from '../../lib/json-members.js'
import { cursorAfter, ListQueryError, readListQuery } from './listing.js'
import { withoutTaskHandles } from '../../lib/task-handle.js'
import { holdsTokenShaped } from '../../lib/token-shape.js'
import { revealsSecret } from '../forward/scrub.js'

const MAX_BODY = 65_536
/** Open tasks one sidecar holds at most: far more than one agent's work, far less than its memory. */
export const MAX_OPEN_TASKS = 10_000

class BodyTooLarge extends TaskError {}
class BodyTooSlow extends TaskError {}

/** What a task is opened with: anything else is refused, by name when it reads as one. */
const TASK_FIELDS: ReadonlySet<string> = new Set(['purpose', 'duration_s', 'user_token', 'audiences'])

/**
 * An audience as configured ones are spelled (an http(s) origin or path, no userinfo, query or
 * fragment, at most 200 characters): quoted back when unknown. Anything else may be a token put in
 * its place (`audiences: [userToken]`), and an agent's error text often lands in its model's context.
 */
const AUDIENCE_SHAPE = /^https?:\/\/[A-Za-z0-9.:[\]-]+(\/[A-Za-z0-9._~%/-]*)?$/
const MAX_QUOTED_AUDIENCE = 200

export interface TaskApiDeps {
  tasks: TaskRegistry
  bindings: readonly CredentialBinding[]
  credentials: CredentialSource
  describe(taskId: string): unknown[]
  proxyUrl(handle: string): string
  /** When callers are restricted, the task API is too: only the agent may open tasks. */
  checkCaller?: ((req: IncomingMessage) => Promise<void>) | undefined
  /** The revocation (from the control stream) that stops this task, or the agent for `null`, if any. */
  revokedBy?: ((task: TaskRef | null) => string | null) | undefined
  /** How long a POST's body may take to arrive whole (timeouts.client_headers_ms). */
  bodyTimeoutMs: number
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': Buffer.byteLength(text), ...headers })
  res.end(text)
}

/**
 * A refusal of the task API, said as the proxy's are: `retryable`, and `x-should-retry` where SDKs
 * look. Only an unavailable broker (503) passes by itself; the rest needs another request.
 */
const fail = (res: ServerResponse, status: number, error: string, reason: string) => {
  const retryable = status === 503
  send(res, status, { error, reason, retryable }, { 'x-should-retry': String(retryable) })
}

async function readJson(req: IncomingMessage, timeoutMs: number): Promise<unknown> {
  // Declared too large: said now, not after 64 KiB of it have been read (or never, if they never come).
  if (Number(req.headers['content-length']) > MAX_BODY) throw new BodyTooLarge(`body exceeds ${MAX_BODY} bytes`)
  const chunks: Buffer[] = []
  let size = 0
  // The whole body within the deadline: a body that stopped short (or trickled) held its socket
  // and this read for as long as the agent kept it open. node:http's requestTimeout did not end
  // it: the admin port's clientError waits for the response in flight, which was this one.
  let timer: NodeJS.Timeout | undefined
  const slow = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new BodyTooSlow(`the body did not all arrive within timeouts.client_headers_ms (${timeoutMs} ms)`)), timeoutMs)
  })
  const read = (async () => {
    for await (const c of req as AsyncIterable<Buffer>) {
      size += c.length
      if (size > MAX_BODY) throw new BodyTooLarge(`body exceeds ${MAX_BODY} bytes`)
      chunks.push(c)
    }
  })()
  try {
    await Promise.race([read, slow])
  } catch (err) {
    // Too slow: the read is left to end with the socket, which the 408 closes.
    read.catch(() => {})
    throw err
  } finally {
    clearTimeout(timer)
  }
  // Strict UTF-8 (a purpose or user token the agent never sent was read from other bytes as
  // U+FFFD), and no member named twice ({"user_token": A, …, "user_token": B}: which one it meant is a guess).
  const parsed = parseJsonBody(Buffer.concat(chunks), TASK_FIELDS)
  if ('problem' in parsed) throw new TaskError(parsed.problem)
  return parsed.value
}

/** Handles /v1/tasks…; returns false for any other path. */
export function handleTaskApi(d: TaskApiDeps, req: IncomingMessage, res: ServerResponse, path: string): boolean {
  if (path !== '/v1/tasks' && !path.startsWith('/v1/tasks/')) return false
  void route(d, req, res, path).catch((err: unknown) => {
    if (!res.headersSent) fail(res, 500, 'internal', err instanceof Error ? err.constructor.name : 'error')
  })
  return true
}

async function route(d: TaskApiDeps, req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
  if (d.checkCaller) {
    try {
      await d.checkCaller(req)
    } catch (err) {
      req.resume()
      return fail(res, 403, 'caller_denied', err instanceof LatchkeyError ? err.message : 'the calling process could not be identified')
    }
  }
  if (path === '/v1/tasks') {
    if (req.method === 'GET') return list(d, req, res)
    if (req.method !== 'POST') {
      res.setHeader('allow', 'GET, POST')
      return fail(res, 405, 'method_not_allowed', 'use POST to open a task, GET to list the open ones')
    }
    // Every call of a revoked agent is refused: a task it opened would only be a handle to refusals.
    if (d.revokedBy?.(null) != null) {
      req.resume()
      return fail(res, 403, 'revoked', 'this agent is revoked (revocation:agent): no task can be opened')
    }
    return open(d, req, res)
  }
  let handle: string
  try {
    handle = decodeURIComponent(path.slice('/v1/tasks/'.length))
  } catch {
    return fail(res, 400, 'bad_request', 'the task handle in the path is not valid percent-encoding')
  }
  const task = d.tasks.get(handle)
  if (!task) return fail(res, 404, 'unknown_task', 'no open task has this handle (unknown, ended or expired)')
  if (req.method === 'GET') return send(res, 200, described(d, task, true))
  if (req.method === 'DELETE') {
    d.tasks.end(handle)
    res.writeHead(204).end()
    return
  }
  res.setHeader('allow', 'GET, DELETE')
  return fail(res, 405, 'method_not_allowed', 'use GET or DELETE on a task')
}

function list(d: TaskApiDeps, req: IncomingMessage, res: ServerResponse): void {
  let asked
  try {
    asked = readListQuery(req.url ?? '', d.tasks)
  } catch (err) {
    if (err instanceof ListQueryError) return fail(res, 400, 'bad_request', err.message)
    throw err
  }
  const page = d.tasks.page(asked.after, asked.limit)
  const last = page.tasks.at(-1)
  const next = page.more && last ? cursorAfter(d.tasks, last.listedAs) : null
  send(res, 200, {
    tasks: page.tasks.map((task) => described(d, task, false)),
    next_cursor: next,
    next: next === null ? null : `/v1/tasks?limit=${asked.limit}&cursor=${next}`,
  })
}

/**
 * A task as GET answers it: by ID, never its handle (a proxy credential). A revoked task stays
 * listed until it ends or expires (its calls are refused): an agent polling it learns why, instead
 * of a 404 that would read as "expired, open another". `tokens`: the audiences it holds tokens for.
 */
function described(d: TaskApiDeps, task: Task, tokens: boolean): Record<string, unknown> {
  const revokedBy = d.revokedBy?.(task) ?? null
  return {
    id: task.id,
    state: revokedBy === null ? 'open' : 'revoked',
    ...(revokedBy === null ? {} : { revoked_by: revokedBy }),
    purpose: task.purpose,
    user: task.userSub,
    created_at: new Date(task.createdAt).toISOString(),
    expires_at: new Date(task.expiresAt).toISOString(),
    audiences: task.audiences,
    ...(tokens ? { tokens: d.describe(task.id) } : {}),
  }
}

async function open(d: TaskApiDeps, req: IncomingMessage, res: ServerResponse): Promise<void> {
  // The media type exactly (parameters such as charset allowed): not application/jsonx.
  const [mediaType, ...params] = (req.headers['content-type'] ?? '').split(';')
  if (mediaType!.trim().toLowerCase() !== 'application/json') {
    req.resume()
    return fail(res, 415, 'bad_request', 'send the task as application/json')
  }
  // The body is read as UTF-8 bytes as they came: one labelled another charset, or compressed,
  // was read as if it were neither (a gzip body refused as "not valid UTF-8", a plain one
  // labelled gzip opened a task), where another reader would decode it first.
  const charset = params.map((x) => x.trim().toLowerCase()).find((x) => x.startsWith('charset='))
  if (charset !== undefined && !['charset=utf-8', 'charset="utf-8"'].includes(charset)) {
    req.resume()
    return fail(res, 415, 'bad_request', 'send the task as application/json in UTF-8: no other charset is read')
  }
  const encoding = (req.headers['content-encoding'] ?? 'identity').trim().toLowerCase()
  if (encoding !== 'identity') {
    req.resume()
    return fail(res, 415, 'bad_request', 'send the task uncompressed: no Content-Encoding is read')
  }
  let body: Record<string, unknown>
  try {
    const parsed = await readJson(req, d.bodyTimeoutMs)
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new TaskError('body must be a JSON object')
    body = parsed as Record<string, unknown>
  } catch (err) {
    if (err instanceof BodyTooLarge) {
      res.shouldKeepAlive = false
      return fail(res, 413, 'too_large', err.message)
    }
    if (err instanceof BodyTooSlow) {
      res.shouldKeepAlive = false
      res.once('finish', () => req.socket.destroy())
      return fail(res, 408, 'request_timeout', err.message)
    }
    return fail(res, 400, 'bad_request', (err as Error).message)
  }
  const unknown = Object.keys(body).filter((k) => !TASK_FIELDS.has(k))
  if (unknown.length > 0) return fail(res, 400, 'bad_request', `unknown field ${/^[a-z][a-z0-9_]{0,31}$/.test(unknown[0]!) ? JSON.stringify(unknown[0]) : '(not repeated: it is no field name, and may be a token)'}; the fields are ${[...TASK_FIELDS].join(', ')}`)
  const { purpose, duration_s, user_token, audiences } = body
  // Counted in characters as a person counts them (code points), not UTF-16 units.
  if (typeof purpose !== 'string' || purpose.length === 0 || purpose.length > 512 || [...purpose].length > 256) {
    return fail(res, 400, 'bad_request', 'purpose must be a string of 1 to 256 characters')
  }
  // The purpose is what the trail says a task was for: blank says nothing.
  if (purpose.trim() === '') return fail(res, 400, 'bad_request', 'purpose must say what the task is for: it is only whitespace')
  // The purpose is logged, listed to anyone asking GET /v1/tasks and answered back: a credential
  // written there (a JWT, an API key, one of the sidecar's static secrets) would be in all three, and
  // refused it is never kept. A task handle is removed instead (the registry keeps the purpose
  // without it), so one naming its parent task by handle still opens.
  if (holdsTokenShaped(withoutTaskHandles(purpose)) || revealsSecret(purpose, heldSecrets(d, user_token))) {
    return fail(res, 400, 'bad_request', 'purpose holds text shaped as a credential (a JWT, an API key, a long random string): it is logged and listed, so it is refused and not repeated; say in words what the task is for')
  }
  if (typeof duration_s !== 'number') return fail(res, 400, 'bad_request', 'duration_s must be a number of seconds')
  if (user_token !== undefined && (typeof user_token !== 'string' || user_token.length === 0 || user_token.length > 16_384)) {
    return fail(res, 400, 'bad_request', 'user_token must be a JWT string')
  }
  // Only the broker reads a user token: without a broker credential the task would silently act for nobody.
  if (user_token !== undefined && !d.bindings.some((b) => b.source === 'broker')) {
    return fail(res, 400, 'bad_request', 'user_token given, but no broker credential is configured to act for the user with it')
  }
  // What the broker takes (isCompactJws), refused here at once rather than at each call's exchange.
  // The whitespace around it (a token read from a file, its newline kept) is not part of it.
  const userToken = typeof user_token === 'string' ? user_token.trim() : null
  if (userToken !== null && !isCompactJws(userToken)) {
    return fail(res, 400, 'bad_request', 'user_token must be a signed JWT in compact form: three base64url segments joined by dots, without padding, each spelled canonically (no spare bits set)')
  }
  if (audiences !== undefined && (!Array.isArray(audiences) || audiences.some((a) => typeof a !== 'string') || audiences.length > 32)) {
    return fail(res, 400, 'bad_request', 'audiences must be a list of at most 32 strings')
  }
  const wanted = (audiences ?? []) as string[]
  const bindings: CredentialBinding[] = []
  for (const aud of wanted) {
    const b = d.bindings.find((x) => x.source === 'broker' && (x.tokenAudience === aud || x.audience === aud))
    if (!b) return fail(res, 400, 'bad_request', `no broker credential is configured for audience ${aud.length <= MAX_QUOTED_AUDIENCE && AUDIENCE_SHAPE.test(aud) ? JSON.stringify(aud) : '(not repeated: it is no http(s) URL, and may be a token put in its place)'}`)
    bindings.push(b)
  }
  if (d.tasks.size >= MAX_OPEN_TASKS) {
    return fail(res, 429, 'too_many_tasks', `${MAX_OPEN_TASKS} tasks are open; end one (DELETE /v1/tasks/<handle>) or let one expire`)
  }
  let task
  try {
    task = d.tasks.open({ purpose, durationS: duration_s, userToken, audiences: wanted, pending: true })
  } catch (err) {
    return fail(res, 400, 'bad_request', (err as Error).message)
  }
  // Judged again now the body is read: a revocation that landed while it came (the agent's, or a
  // delegation's its user token rests on) refuses the task as one before the POST would. Judged
  // only before it, a task opened with no exchange to void was answered 201 after the agent's
  // revocation; and a revoked delegation the sidecar already knows of needs no broker to say so
  // (down, it made the refusal a retryable 503).
  const revokedBy = d.revokedBy?.(task) ?? null
  if (revokedBy !== null) {
    d.tasks.end(task.handle)
    return fail(res, 403, 'revoked', revokedBy === 'revocation:agent' ? 'this agent is revoked (revocation:agent): no task can be opened' : `the user token rests on a revoked delegation (${revokedBy}): the task is not opened`)
  }
  try {
    await Promise.all(bindings.map((b) => d.credentials.get(b, task.identity)))
    // A user token is the broker's to verify, not the sidecar's: until it has, the task would be
    // recorded as acting for whoever the token claims. One exchange proves it (with no audience
    // asked for, the first broker credential whose exchange succeeds); refused by all, no task.
    if (user_token !== undefined && bindings.length === 0) await verifiedByBroker(d, task.identity)
  } catch (err) {
    d.tasks.end(task.handle)
    // Revoked while its exchange was in flight (the waiters are told LK_REVOKED, never the token):
    // what a POST after the revocation is told, not a retryable "broker unavailable".
    if (err instanceof LatchkeyError && err.code === 'LK_REVOKED') {
      return fail(res, 403, 'revoked', `revoked (${err.rule ?? 'revocation:agent'}) while the task's token was being fetched: the task is not opened`)
    }
    const reason = err instanceof LatchkeyError ? err.message : 'token exchange failed'
    const refused = err instanceof LatchkeyError && err.code === 'LK_CREDENTIAL_REFUSED'
    return fail(res, refused ? 403 : 503, refused ? 'task_refused' : 'broker_unavailable', reason)
  }
  d.tasks.confirm(task)
  send(res, 201, {
    task: task.handle,
    id: task.id,
    purpose: task.purpose,
    user: task.userSub,
    expires_at: new Date(task.expiresAt).toISOString(),
    audiences: wanted,
    proxy_url: d.proxyUrl(task.handle),
  })
}

/**
 * The sidecar's static secrets (as many as its configuration names) and the user token sent. Not
 * the tokens it was issued: up to one per task and audience, each looked for in every spelling,
 * 10,000 of them held the event loop 3.3 s; they are JWTs or random keys, which the shape finds.
 */
function heldSecrets(d: TaskApiDeps, userToken: unknown): string[] {
  const out = d.bindings.filter((b) => b.source === 'static').flatMap((b) => d.credentials.held(b).map((c) => c.value))
  if (typeof userToken === 'string' && userToken.trim() !== '') out.push(userToken.trim())
  return out
}

/** Resolves once one broker credential's exchange for this task succeeds; else throws the first refusal. */
async function verifiedByBroker(d: TaskApiDeps, identity: Identity): Promise<void> {
  let first: unknown = null
  for (const b of d.bindings) {
    if (b.source !== 'broker') continue
    try {
      await d.credentials.get(b, identity)
      return
    } catch (err) {
      first ??= err
      // Unreachable is unreachable for every audience: no use asking again.
      if (!(err instanceof LatchkeyError) || err.code !== 'LK_CREDENTIAL_REFUSED') throw err
    }
  }
  throw first
}
