// Several broker replicas: they share the revocation store (PostgreSQL), and each revocation made
// on one replica is published to a NATS JetStream stream after its store write; every other
// replica applies it in memory and pushes it down its own control streams. Each replica also
// reconciles with the store every resync_ms, so a revocation whose publish was lost (NATS away)
// still arrives, later.
import { randomUUID } from 'node:crypto'
import { connect, DeliverPolicy, RetentionPolicy, StorageType, type ConsumerMessages, type NatsConnection } from 'nats'
import type { Logger } from '../../lib/log.js'
import { withoutUserinfo } from '../../lib/without-userinfo.js'
import type { RevocationList, RevocationChange } from '../revocations/list.js'
import { REVOCATION_KINDS, type RevocationKind } from '../revocations/store.js'
import { storeCause } from '../../lib/store-schema.js'

interface BusMessage {
  replica: string
  op: 'revoke' | 'unrevoke'
  kind: RevocationKind
  value: string
  reason: string | null
  created_at: number
}

export class RevocationBus {
  readonly replica = randomUUID()
  readonly stats = { published: 0, applied: 0, publishFailed: 0 }
  private messages: ConsumerMessages | undefined
  private closed = false

  private constructor(
    private readonly nc: NatsConnection,
    private readonly cfg: { servers: string[]; stream: string; subject: string },
    private readonly list: RevocationList,
    private readonly log: Logger,
  ) {}

  static async open(cfg: { servers: string[]; stream: string; subject: string }, list: RevocationList, log: Logger): Promise<RevocationBus> {
    let nc: NatsConnection
    try {
      nc = await connect({ servers: cfg.servers, name: 'latchkey-broker', maxReconnectAttempts: -1 })
    } catch (err) {
      // The servers without their userinfo (NATS credentials ride in the URL), and the client's code, not its message, which may quote one.
      throw Object.assign(new Error(`broker.control.nats ${cfg.servers.map(withoutUserinfo).join(',')}: cannot connect (${(err as { code?: string }).code ?? 'error'})`), { code: 'LK_STARTUP' })
    }
    const jsm = await nc.jetstreamManager()
    try {
      const info = await jsm.streams.info(cfg.stream)
      if (!info.config.subjects?.includes(cfg.subject)) await jsm.streams.update(cfg.stream, { ...info.config, subjects: [...(info.config.subjects ?? []), cfg.subject] })
    } catch {
      await jsm.streams.add({ name: cfg.stream, subjects: [cfg.subject], storage: StorageType.File, retention: RetentionPolicy.Limits, max_age: 24 * 3600 * 1e9 })
    }
    const bus = new RevocationBus(nc, cfg, list, log)
    await bus.subscribe()
    list.onChange((c) => {
      if (!c.remote) void bus.publish(c)
    })
    return bus
  }

  private async subscribe(): Promise<void> {
    const consumer = await this.nc.jetstream().consumers.get(this.cfg.stream, { filterSubjects: this.cfg.subject, deliver_policy: DeliverPolicy.New })
    this.messages = await consumer.consume()
    void (async () => {
      for await (const m of this.messages!) {
        let msg: BusMessage
        try {
          msg = m.json<BusMessage>()
        } catch {
          this.log.warn({ subject: m.subject }, 'control bus: message is not JSON; ignored')
          continue
        }
        if (msg.replica === this.replica) continue
        if (!REVOCATION_KINDS.includes(msg.kind) || typeof msg.value !== 'string') {
          this.log.warn({ kind: String(msg.kind) }, 'control bus: malformed revocation message; ignored')
          continue
        }
        // The bus is a hint, the shared store the record: an unrevoke is applied only once the
        // store no longer holds the revocation (the replica that lifted it removed the row before
        // publishing). Taken on the bus's word, anyone able to publish on the subject lifted any
        // revocation on every replica, and again after each resync restored it.
        if (msg.op !== 'revoke') {
          let held: boolean
          try {
            held = await this.list.store.holds(msg.kind, msg.value)
          } catch (err) {
            this.log.warn({ kind: msg.kind, reason: storeCause(err) }, 'control bus: unrevoke not checked (store unavailable); left to the next resync')
            continue
          }
          if (held) {
            this.log.warn({ kind: msg.kind }, 'control bus: unrevoke of a revocation the store still holds; ignored')
            continue
          }
        }
        this.stats.applied++
        this.list.applyRemote(
          msg.op === 'revoke'
            ? { op: 'revoke', revocation: { kind: msg.kind, value: msg.value, reason: msg.reason ?? '', created_at: msg.created_at } }
            : { op: 'unrevoke', kind: msg.kind, value: msg.value },
        )
      }
    })().catch((err: unknown) => {
      if (!this.closed) this.log.error({ err: (err as Error).message }, 'control bus consumer stopped; the store resync still applies remote revocations')
    })
  }

  private async publish(c: RevocationChange): Promise<void> {
    const msg: BusMessage =
      c.op === 'revoke'
        ? { replica: this.replica, op: 'revoke', kind: c.revocation.kind, value: c.revocation.value, reason: c.revocation.reason, created_at: c.revocation.created_at }
        : { replica: this.replica, op: 'unrevoke', kind: c.kind, value: c.value, reason: null, created_at: Date.now() }
    try {
      await this.nc.jetstream().publish(this.cfg.subject, JSON.stringify(msg))
      this.stats.published++
    } catch (err) {
      this.stats.publishFailed++
      this.log.error({ code: (err as { code?: string }).code ?? 'error' }, 'control bus: publish failed; other replicas will see this revocation at their next store resync')
    }
  }

  async close(): Promise<void> {
    this.closed = true
    this.messages?.stop()
    await this.nc.drain().catch(() => {})
  }
}
