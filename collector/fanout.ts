// Fan-out of every stored event to NATS JetStream (SIEMs, the kill switch): one durable stream,
// subject `<subject_prefix>.<agent type>`, body the event as JSON (the query API's shape), and
// JetStream's own dedupe keyed by `<sidecar>:<sequence>` so a retried publish is stored once.
// Published after the store commit, in order, retried with backoff while NATS is away. Progress
// is kept in the store as a cursor per sidecar (saved every second and on close); on start,
// catchUp() publishes every stored event past the cursors before the collector takes ingest,
// so events committed but not yet published when a collector died still go out (at least once:
// a republish inside JetStream's duplicate window is dropped by the msgID).
import { connect, RetentionPolicy, StorageType, type JetStreamClient, type NatsConnection } from 'nats'
import type { Logger } from '../lib/log.js'
import { withoutUserinfo } from '../lib/without-userinfo.js'
import { agentType } from './store/chain.js'
import type { AuditStore, StoredEvent } from './store/types.js'
import type { FanOut } from './collector.js'
import type { NatsConfig } from './config.js'
import { eventToJson } from './query.js'

export interface FanOutStats {
  published: number
  retries: number
  dropped: number
}

const MAX_QUEUE = 100_000
const CURSOR = 'nats'
const SAVE_MS = 1000

export function subjectFor(prefix: string, agent: string): string {
  return `${prefix}.${agentType(agent).replace(/[^A-Za-z0-9_-]/g, '_')}`
}

export class JetStreamFanOut implements FanOut {
  readonly stats: FanOutStats = { published: 0, retries: 0, dropped: 0 }
  private queue: StoredEvent[] = []
  private running = false
  private closed = false
  private idle: Array<() => void> = []
  /** Positions published since the last save. */
  private progress = new Map<string, number>()
  private store: AuditStore | null = null
  private saveTimer: NodeJS.Timeout | null = null

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    private readonly config: NatsConfig,
    private readonly log: Logger,
  ) {}

  /**
   * Publishes every stored event past the saved cursors, then keeps the cursors up to date.
   * Call before the collector accepts ingest, so catch-up and live events stay in chain order.
   */
  async catchUp(store: AuditStore): Promise<number> {
    this.store = store
    const cursors = await store.cursors(CURSOR)
    let published = 0
    for (const [sidecar, head] of await store.heads()) {
      let at = cursors.get(sidecar) ?? 0
      while (at < head) {
        const page = await store.after(sidecar, at, 1000)
        if (page.length === 0) break
        this.publish(page)
        await this.settled()
        at = page[page.length - 1]!.position
        published += page.length
      }
    }
    await this.saveProgress()
    if (published > 0) this.log.info({ published }, 'nats fan-out caught up with events stored but not yet published')
    this.saveTimer = setInterval(() => void this.saveProgress(), SAVE_MS)
    this.saveTimer.unref()
    return published
  }

  private async saveProgress(): Promise<void> {
    if (!this.store || this.progress.size === 0) return
    const p = this.progress
    this.progress = new Map()
    try {
      await this.store.saveCursors(CURSOR, p)
    } catch (err) {
      // Not saved: merge back; a later save (or a republish, deduplicated) covers it.
      for (const [k, v] of p) this.progress.set(k, Math.max(v, this.progress.get(k) ?? 0))
      this.log.warn({ err: (err as Error).message }, 'nats fan-out cursor not saved')
    }
  }

  /** Connects and makes sure the durable stream exists (created or its subjects updated). */
  static async open(config: NatsConfig, log: Logger): Promise<JetStreamFanOut> {
    let nc: NatsConnection
    try {
      nc = await connect({ servers: config.servers, name: 'latchkey-collector', maxReconnectAttempts: -1 })
    } catch (err) {
      // The servers without their userinfo (NATS credentials ride in the URL), and the client's code, not its message, which may quote one.
      throw Object.assign(new Error(`collector.nats ${config.servers.map(withoutUserinfo).join(',')}: cannot connect (${(err as { code?: string }).code ?? 'error'})`), { code: 'LK_STARTUP' })
    }
    const jsm = await nc.jetstreamManager()
    const subjects = [`${config.subject_prefix}.>`]
    try {
      const info = await jsm.streams.info(config.stream)
      if (!info.config.subjects?.includes(subjects[0]!)) await jsm.streams.update(config.stream, { ...info.config, subjects: [...(info.config.subjects ?? []), ...subjects] })
    } catch {
      await jsm.streams.add({ name: config.stream, subjects, storage: StorageType.File, retention: RetentionPolicy.Limits, duplicate_window: 2 * 60 * 1_000_000_000 })
    }
    return new JetStreamFanOut(nc, nc.jetstream(), config, log)
  }

  publish(events: StoredEvent[]): void {
    if (this.closed) return
    const room = MAX_QUEUE - this.queue.length
    if (events.length > room) {
      this.stats.dropped += events.length - Math.max(0, room)
      this.log.error({ dropped: events.length - room }, 'nats fan-out queue full: events not published (they are in the store)')
      events = events.slice(0, Math.max(0, room))
    }
    this.queue.push(...events)
    if (!this.running) void this.drain()
  }

  private async drain(): Promise<void> {
    this.running = true
    let delay = 50
    while (this.queue.length > 0 && !this.closed) {
      const e = this.queue[0]!
      try {
        await this.js.publish(subjectFor(this.config.subject_prefix, e.event.delegation?.agent ?? ''), JSON.stringify(eventToJson(e)), {
          msgID: `${e.sidecar}:${e.sequence}`,
        })
        this.queue.shift()
        this.stats.published++
        this.progress.set(e.sidecar, e.position)
        delay = 50
      } catch (err) {
        this.stats.retries++
        if (this.stats.retries % 50 === 1) this.log.warn({ code: (err as { code?: string }).code, queued: this.queue.length }, 'nats publish failed; retrying')
        await new Promise((r) => setTimeout(r, delay))
        delay = Math.min(delay * 2, 2000)
      }
    }
    this.running = false
    for (const f of this.idle.splice(0)) f()
  }

  /** Resolves once everything queued so far is published (tests, shutdown). */
  settled(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve()
    return new Promise((r) => this.idle.push(r))
  }

  async close(): Promise<void> {
    await Promise.race([this.settled(), new Promise((r) => setTimeout(r, 2000))])
    this.closed = true
    if (this.saveTimer) clearInterval(this.saveTimer)
    await this.saveProgress()
    await this.nc.drain()
  }
}
