// Shared by the HTTP API and the CLI: parsing "since", and the JSON shape of a stored event.
import { AuditEvent } from '../protos/gen/latchkey/v1/audit.js'
import type { StoredEvent } from './store/types.js'

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** "24h", "30m", "7d", "90s", or an ISO-8601 time. Throws naming the value when it is neither. */
/** A time bound: a duration before now (24h, 30m, 7d) or an ISO-8601 time; `name` is the parameter, for the error. */
export function parseSince(value: string, now = Date.now(), name = 'since'): Date {
  const m = /^(\d+)([smhd])$/.exec(value.trim())
  const t = m ? now - Number(m[1]) * UNITS[m[2]!]! : Date.parse(value)
  // A Date holds ±8.64e15 ms; a duration reaching past that is a mistake, not "all of time".
  if (Number.isNaN(t) || Math.abs(t) > 8.64e15) {
    throw new Error(`${name} "${value.slice(0, 64)}" is neither a duration (like 24h, 30m, 7d) nor an ISO-8601 time within range`)
  }
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
