// Shared by the HTTP API and the CLI: parsing "since", and the JSON shape of a stored event.
import { AuditEvent } from '../protos/gen/latchkey/v1/audit.js'
import type { StoredEvent } from './store/types.js'

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** "24h", "30m", "7d", "90s", or an ISO-8601 time. Throws naming the value when it is neither. */
export function parseSince(value: string, now = Date.now()): Date {
  const m = /^(\d+)([smhd])$/.exec(value.trim())
  if (m) return new Date(now - Number(m[1]) * UNITS[m[2]!]!)
  const t = Date.parse(value)
  if (Number.isNaN(t)) throw new Error(`since "${value}" is neither a duration (like 24h, 30m, 7d) nor an ISO-8601 time`)
  return new Date(t)
}

export interface EventJson {
  sidecar: string
  sequence: number
  position: number
  hash: string
  event: unknown
}

export function eventToJson(e: StoredEvent): EventJson {
  return { sidecar: e.sidecar, sequence: e.sequence, position: e.position, hash: e.hash, event: AuditEvent.toJSON(e.event) }
}
