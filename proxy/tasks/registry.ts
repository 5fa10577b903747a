// Tasks: what an agent is doing, for whom, for how long. An agent opens one on the local API and
// gets a handle; requests name it in Proxy-Authorization (the proxy URL's userinfo). The handle is
// a proxy credential: 128 random bits, never logged or audited (the task's separate ID is). Ending
// a task, or its expiry, drops every token it held.
import { randomBytes, randomUUID } from 'node:crypto'
import { newTaskHandle, withoutTaskHandles } from '../../lib/task-handle.js'
import type { Identity, TaskRef } from '../context.js'
import { subjectAncestry, type Ancestor } from '../../lib/delegation.js'

const NO_ANCESTRY: readonly Ancestor[] = Object.freeze([])

export interface Task extends TaskRef {
  readonly id: string
  readonly handle: string
  readonly purpose: string
  readonly createdAt: number
  readonly expiresAt: number
  readonly userToken: string | null
  /** The user's `sub`, read (not verified: the broker verifies) for audit attribution. */
  readonly userSub: string | null
  readonly delegatedFrom: readonly Ancestor[]
  readonly audiences: readonly string[]
  /** Built once, so the request path allocates nothing to identify a caller. */
  readonly identity: Identity
  ended: boolean
  /**
   * Opened on the API, and the broker has not yet taken its user token (or fetched the audiences
   * it asked for): not announced (onOpen), not listed. Until `confirm`, who it acts for is only
   * what an unverified token claims, and a refused one never opened.
   */
  pending: boolean
  /**
   * Where the task stands in GET /v1/tasks: given when it is first listed (opened, or confirmed
   * when pending), counting up, so a page's cursor is the last one it showed. 0 until then.
   */
  listedAs: number
}

export interface OpenTask {
  purpose: string
  durationS: number
  userToken?: string | null | undefined
  audiences?: readonly string[] | undefined
  /** Held back from onOpen and list() until `confirm` (the task API's checks with the broker). */
  pending?: boolean | undefined
}

export class TaskError extends Error {}

/** Why a task ended: the agent ended it, its time ran out, or the sidecar shut down. */
export type TaskEnd = 'ended' | 'expired' | 'shutdown'

/** A page of the listing: `more` when tasks listed after the last one shown remain. */
export interface TaskPage {
  tasks: Task[]
  more: boolean
}

export class TaskRegistry {
  private readonly byHandle = new Map<string, Task>()
  /**
   * The listed tasks in the order they were listed (Map order is insertion order): a page starts
   * after the last one the previous page showed, so a task ended meanwhile shifts nothing and one
   * listed meanwhile comes last, never on a page already read.
   */
  private readonly listed = new Map<number, Task>()
  private lastListed = 0
  /** This registry's run (tasks live in memory): a listing cursor names it, so one from before a restart is refused, not read against a new numbering. */
  readonly run = randomBytes(6).toString('base64url')
  private readonly endListeners: ((t: Task, why: TaskEnd) => void)[] = []
  private readonly openListeners: ((t: Task) => void)[] = []
  private sweeper: NodeJS.Timeout | undefined
  private defaultTask: Task | undefined

  constructor(
    private readonly agentId: string,
    private readonly opts: {
      maxDurationS: number
      default?: { durationS: number; purpose: string } | undefined
      now?: () => number
      /**
       * Reads a user token's claims, unverified (the broker verifies): its `sub` for attribution,
       * and, for a delegation token, the delegations it rests on. Without it tasks record neither.
       */
      readClaims?: ((token: string) => Record<string, unknown>) | undefined
    },
  ) {}

  private now(): number {
    return this.opts.now ? this.opts.now() : Date.now()
  }

  onEnd(listener: (t: Task, why: TaskEnd) => void): void {
    this.endListeners.push(listener)
  }

  onOpen(listener: (t: Task) => void): void {
    this.openListeners.push(listener)
  }

  open(req: OpenTask): Task {
    if (!Number.isInteger(req.durationS) || req.durationS < 1) throw new TaskError('duration_s must be a whole number of seconds, at least 1')
    if (req.durationS > this.opts.maxDurationS) throw new TaskError(`duration_s ${req.durationS} exceeds the maximum of ${this.opts.maxDurationS}`)
    let userSub: string | null = null
    let delegatedFrom = NO_ANCESTRY
    if (req.userToken && this.opts.readClaims) {
      let claims: Record<string, unknown>
      try {
        claims = this.opts.readClaims(req.userToken)
      } catch {
        throw new TaskError('user_token is not a JWT')
      }
      userSub = typeof claims.sub === 'string' ? claims.sub.slice(0, 256) : null
      const ancestry = subjectAncestry(claims)
      // The broker would refuse it too; read in part, a revocation of what it hid would not stop the task.
      if (!ancestry) throw new TaskError('user_token is a delegation token whose delegated_from, jti or task_id cannot be read')
      if (ancestry.length > 0) delegatedFrom = Object.freeze(ancestry)
    }
    const createdAt = this.now()
    const id = randomUUID()
    const handle = newTaskHandle()
    const task: Task = {
      id,
      handle,
      // The agent's words, logged and listed to anyone who asks GET /v1/tasks: a handle it wrote
      // there ("subtask of lkt_…") would be a proxy credential in both. Kept without it.
      purpose: withoutTaskHandles(req.purpose),
      createdAt,
      expiresAt: createdAt + req.durationS * 1000,
      userToken: req.userToken ?? null,
      userSub,
      delegatedFrom,
      audiences: req.audiences ?? [],
      identity: undefined as unknown as Identity,
      ended: false,
      pending: req.pending ?? false,
      listedAs: 0,
    }
    ;(task as { identity: Identity }).identity = Object.freeze({ agentId: this.agentId, taskId: id, userSub, task })
    this.byHandle.set(handle, task)
    if (!task.pending) this.announce(task)
    return task
  }

  /** A pending task the broker has accepted: now it is open, announced and listed. */
  confirm(task: Task): void {
    if (!task.pending || task.ended) return
    task.pending = false
    this.announce(task)
  }

  private announce(task: Task): void {
    task.listedAs = ++this.lastListed
    this.listed.set(task.listedAs, task)
    for (const l of this.openListeners) l(task)
  }

  /** The open task for a handle; an expired one is ended on the way. */
  get(handle: string): Task | undefined {
    const task = this.byHandle.get(handle)
    if (!task) return undefined
    if (task.expiresAt <= this.now()) {
      this.endTask(task, 'expired')
      return undefined
    }
    return task
  }

  /** For agents that never open a task, when configured: renewed when it expires. */
  getDefault(): Task | undefined {
    const d = this.opts.default
    if (!d) return undefined
    if (!this.defaultTask || this.defaultTask.ended || this.defaultTask.expiresAt <= this.now()) {
      if (this.defaultTask && !this.defaultTask.ended) this.endTask(this.defaultTask, 'expired')
      this.defaultTask = this.open({ purpose: d.purpose, durationS: d.durationS })
    }
    return this.defaultTask
  }

  end(handle: string): boolean {
    const task = this.byHandle.get(handle)
    if (!task) return false
    this.endTask(task, 'ended')
    return true
  }

  private endTask(task: Task, why: TaskEnd): void {
    if (task.ended) return
    task.ended = true
    this.byHandle.delete(task.handle)
    this.listed.delete(task.listedAs)
    for (const l of this.endListeners) l(task, why)
  }

  /** Ends expired tasks once a second, so their tokens go even if nobody asks. */
  start(): void {
    this.sweeper = setInterval(() => this.sweep(), 1000)
    this.sweeper.unref()
  }

  private sweep(): void {
    const now = this.now()
    for (const t of this.byHandle.values()) if (t.expiresAt <= now) this.endTask(t, 'expired')
  }

  close(): void {
    clearInterval(this.sweeper)
    for (const t of [...this.byHandle.values()]) this.endTask(t, 'shutdown')
  }

  /**
   * At most `limit` open tasks listed after `after` (a task's `listedAs`; 0 from the start), in
   * the order they were listed; expired ones are ended first, as the sweeper would.
   */
  page(after: number, limit: number): TaskPage {
    this.sweep()
    const tasks: Task[] = []
    for (const t of this.listed.values()) {
      if (t.listedAs <= after) continue
      if (tasks.length === limit) return { tasks, more: true }
      tasks.push(t)
    }
    return { tasks, more: false }
  }

  get size(): number {
    return this.byHandle.size
  }

  /** Open tasks opened with a token derived from this delegation task or jti. */
  derivedFrom(kind: 'task' | 'jti', value: string): Task[] {
    const out: Task[] = []
    for (const t of this.byHandle.values()) {
      if (t.delegatedFrom.some((a) => (kind === 'task' ? a.task_id === value : a.jti === value))) out.push(t)
    }
    return out
  }
}
