// The audit event's size limits, one contract for both ends: the collector refuses an event past
// them (collector/store/chain.ts), so the sidecar cuts every field to them before it spools one
// (proxy/audit/collector-sink.ts). An event the collector refuses would be resent for ever and
// hold back every event after it.
//
// Sized for what a sidecar produces. The path comes from a request line, which node:http bounds
// with its header limit (16 KiB by default), so 64 KiB leaves room for a raised
// --max-http-header-size; the decision's reason may quote a policy's explanation; every other
// field is a name, an ID, an address or a code. Megabyte fields (allowed under max_batch_bytes)
// made every query of that agent fail.
export const FIELD_LIMITS = { default: 4096, 'call.path': 65_536, 'call.destination': 65_536, 'decision.reason': 16_384, scopes: 256 } as const
/** A whole event as received, unknown fields included: past the sum of the field limits. */
export const MAX_EVENT_BYTES = 256 * 1024
/** What the sidecar keeps of the scopes, all entries together: well inside MAX_EVENT_BYTES with every other field at its limit. */
export const SCOPES_TOTAL_BYTES = 32 * 1024

const CUT = '…(cut)'

/** `s` if it fits in `limit` UTF-8 bytes; else its start, marked as cut, within the limit. */
export function fitUtf8(s: string, limit: number): string {
  if (s.length * 3 <= limit || Buffer.byteLength(s) <= limit) return s
  // A multi-byte character cut in two decodes as U+FFFD (3 bytes): room is left for it.
  const head = Buffer.from(s).subarray(0, limit - Buffer.byteLength(CUT) - 2).toString('utf8')
  return head + CUT
}
