// The identify stage: Proxy-Authorization names the task. The proxy URL the task API hands out is
// http://task:<handle>@host:port: the handle is the password, because undici and Python's urllib
// send proxy credentials only when the URL has both a user and a password (curl sends either).
// A bare http://<handle>@… and Bearer <handle> are accepted too. The header is
// consumed here and never forwarded. No header: the default task when configured, else the
// sidecar's agent with no task (or, with tasks.required, a 407). A malformed header, or a handle
// of no open task, is a 407 (a 403 on a route or in a tunnel: errors.ts asOriginRefusal).
import type { Identifier, Identity } from '../context.js'
import { LatchkeyError } from '../errors.js'
import type { TaskRegistry } from '../tasks/registry.js'
import { TASK_HANDLE, WHOLE_TASK_HANDLE } from '../../lib/task-handle.js'

export class TaskIdentifier implements Identifier {
  private readonly anonymous: Identity
  readonly unidentified: Identity

  constructor(
    agentId: string,
    private readonly tasks: TaskRegistry,
    /** tasks.required: a call that names no task is refused, not made as the agent with no task. */
    private readonly taskRequired = false,
  ) {
    this.anonymous = Object.freeze({ agentId, taskId: null, userSub: null, task: null }) as Identity
    this.unidentified = this.anonymous
  }

  identify(proxyAuthorization: string | undefined): Identity {
    if (proxyAuthorization === undefined) {
      const fallback = this.tasks.getDefault()?.identity
      if (fallback) return fallback
      if (this.taskRequired) throw new LatchkeyError('LK_PROXY_AUTH', 'this sidecar requires a task: open one with POST /v1/tasks and use its proxy_url')
      return this.anonymous
    }
    const space = proxyAuthorization.indexOf(' ')
    const scheme = space === -1 ? '' : proxyAuthorization.slice(0, space).toLowerCase()
    const value = space === -1 ? '' : proxyAuthorization.slice(space + 1).trim()
    let task
    if (scheme === 'bearer' && value.length > 0) task = this.tasks.get(value)
    else if (scheme === 'basic' && value.length > 0) {
      const decoded = Buffer.from(value, 'base64').toString('utf8')
      const colon = decoded.indexOf(':')
      const user = colon === -1 ? decoded : decoded.slice(0, colon)
      const password = colon === -1 ? '' : decoded.slice(colon + 1)
      // One field holds the handle: the password when there is one (task:<handle>), else the user
      // (<handle>@). A wrong password is wrong, whatever the user field happens to hold.
      const handle = password.length > 0 ? password : user
      // Two handles, one as user and one as password (two proxy URLs spliced): which task the call
      // runs under would be a guess, as with two Proxy-Authorization headers. The password's was taken.
      if (password.length > 0 && user !== password && WHOLE_TASK_HANDLE.test(user) && WHOLE_TASK_HANDLE.test(password)) {
        throw new LatchkeyError('LK_PROXY_AUTH', 'the proxy credential names two task handles (user and password): which task the call runs under would be a guess; use one task\'s proxy_url as it is')
      }
      task = handle.length > 0 ? this.tasks.get(handle) : undefined
    } else throw new LatchkeyError('LK_PROXY_AUTH', 'Proxy-Authorization must be Basic or Bearer with a task handle')
    if (!task) {
      // No task handle in it at all: most likely no proxy credential, but a client library's
      // (aiohttp sends a ClientSession's default Authorization header to the proxy as this one).
      if (!carriesTaskHandle(proxyAuthorization)) {
        throw new LatchkeyError('LK_PROXY_AUTH', 'the proxy credential names no open task: it holds no task handle (send none, or use the proxy_url of a task opened with POST /v1/tasks; aiohttp sends a ClientSession\'s default Authorization header as Proxy-Authorization: pass that header per request instead)')
      }
      throw new LatchkeyError('LK_PROXY_AUTH', 'the proxy credential names no open task (unknown, ended or expired): open one with POST /v1/tasks')
    }
    return task.identity
  }
}

/** A task handle standing alone: not part of a longer base64url run. */
const HANDLE = new RegExp(`(?:^|[^A-Za-z0-9_-])${TASK_HANDLE.source}(?![A-Za-z0-9_-])`)

/**
 * Whether an Authorization header (meant for the upstream) carries a task handle: what a client
 * sends when given the proxy_url as a base URL (http://task:<handle>@sidecar/<route>/…), or an
 * agent that put its handle in the wrong header. Plain or in Basic's base64.
 */
export function carriesTaskHandle(authorization: string | undefined): boolean {
  if (authorization === undefined) return false
  if (HANDLE.test(authorization)) return true
  const space = authorization.indexOf(' ')
  if (space === -1 || authorization.slice(0, space).toLowerCase() !== 'basic') return false
  return HANDLE.test(Buffer.from(authorization.slice(space + 1).trim(), 'base64').toString('latin1'))
}
