// Broker events for the audit trail: every exchange (granted or refused, with the reason), every
// registry change that widens what an agent may get, every revocation. Events name tokens by jti
// and hash, never by value. Sinks: the log (always), a JSON-lines file, in-process listeners (the
// seam the collector stream plugs into).
import { createWriteStream, mkdirSync, type WriteStream } from 'node:fs'
import { dirname } from 'node:path'
import type { Logger } from '../lib/log.js'

export interface ExchangeEvent {
  type: 'token.exchange'
  ts: string
  outcome: 'granted' | 'refused'
  /** RFC error code when refused. */
  error: string | null
  reason: string
  agent: string | null
  agent_type: string | null
  attestor: string | null
  /** The agents that delegated to this one, outermost first (nested `act`). */
  delegated_by: string[]
  user: string | null
  task: string | null
  audience: string | null
  scopes: string[]
  jti: string | null
  exp: number | null
}

export interface PolicyWidenedEvent {
  type: 'policy.widened'
  ts: string
  agent_type: string
  audience: string
  added: string[]
}

export interface PolicyRejectedEvent {
  type: 'policy.rejected'
  ts: string
  reason: string
}

export interface RevocationEvent {
  type: 'revocation'
  ts: string
  op: 'revoke' | 'unrevoke'
  kind: string
  value: string
  reason: string | null
}

export type BrokerEvent = ExchangeEvent | PolicyWidenedEvent | PolicyRejectedEvent | RevocationEvent

export class BrokerEvents {
  private readonly listeners: ((e: BrokerEvent) => void)[] = []
  private readonly file: WriteStream | undefined

  constructor(
    private readonly log: Logger,
    jsonlPath?: string,
  ) {
    if (jsonlPath) {
      mkdirSync(dirname(jsonlPath), { recursive: true })
      this.file = createWriteStream(jsonlPath, { flags: 'a', mode: 0o600 })
    }
  }

  on(listener: (e: BrokerEvent) => void): void {
    this.listeners.push(listener)
  }

  emit(e: BrokerEvent): void {
    if (e.type === 'token.exchange') this.log.info({ event: e }, `exchange ${e.outcome}`)
    else this.log.warn({ event: e }, e.type)
    this.file?.write(JSON.stringify(e) + '\n')
    for (const l of this.listeners) l(e)
  }

  close(): Promise<void> {
    return new Promise((resolve) => (this.file ? this.file.end(resolve) : resolve()))
  }
}
