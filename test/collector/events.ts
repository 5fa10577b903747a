// Audit events for collector tests: real protobuf messages, recognisable fields.
import { createHash, randomUUID } from 'node:crypto'
import { Action, type AuditEvent, type SequencedEvent } from '../../protos/gen/latchkey/v1/audit.js'

export interface EventOpts {
  agent?: string
  ts?: number
  host?: string
  port?: number
  action?: Action
  audience?: string
  path?: string
  status?: number
}

export function makeEvent(o: EventOpts = {}): AuditEvent {
  const audience = o.audience ?? ''
  return {
    id: randomUUID(),
    timeUnixMs: o.ts ?? Date.now(),
    delegation: { user: 'user:alice', agent: o.agent ?? 'agent:summarizer:test:a1', task: 'task-1' },
    call: {
      method: 'GET',
      scheme: 'https',
      host: o.host ?? 'api.example.com',
      port: o.port ?? 443,
      path: o.path ?? '/v1/things',
      destination: '',
      address: '93.184.216.34',
      status: o.status ?? 200,
      bytesIn: 10,
      bytesOut: 200,
      durationMs: 1.5,
      upstreamMs: 1.2,
      traceId: '',
      via: 'absolute',
    },
    decision: { action: o.action ?? Action.ACTION_ALLOW, rule: o.action === Action.ACTION_DENY ? 'deny-admin' : 'allow-api', reason: '', error: '' },
    credential: audience
      ? { provider: 'static', audience, scopes: ['read'], jti: randomUUID(), tokenSha256: createHash('sha256').update('not-a-real-token').digest() }
      : undefined,
    process: undefined,
  }
}

/** Sequences from..to (inclusive), each a fresh event built by `opts(seq)`. */
/**
 * Events for sequences from..to. A sequence's event ID is fixed, so asking again for a sequence
 * is a resend of the same event (a duplicate), as a sidecar's resend is; another event under a held
 * sequence is a conflict the stores refuse.
 */
export function seqEvents(from: number, to: number, opts: (seq: number) => EventOpts = () => ({}), sidecar?: string): SequencedEvent[] {
  const out: SequencedEvent[] = []
  // An event ID names one call in the whole store: another sidecar's events get their own.
  const prefix = sidecar ? `${sidecar}-` : '00000000-0000-4000-8000-'
  for (let s = from; s <= to; s++) out.push({ sequence: s, event: { ...makeEvent(opts(s)), id: `${prefix}${String(s).padStart(12, '0')}` } })
  return out
}

export const PG_URL = process.env.LATCHKEY_TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test'

/** A schema name no other test file or run can be using. */
export function uniqueSchema(prefix = 'lk_test'): string {
  return `${prefix}_${process.pid}_${randomUUID().slice(0, 8)}`.toLowerCase()
}
