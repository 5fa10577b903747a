// OAuth constants shared by the broker (which verifies) and the sidecar (which asks).
export const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange'

export const TOKEN_TYPES = {
  jwt: 'urn:ietf:params:oauth:token-type:jwt',
  accessToken: 'urn:ietf:params:oauth:token-type:access_token',
  kubernetes: 'urn:latchkey:token-type:kubernetes-service-account',
  spiffe: 'urn:latchkey:token-type:jwt-svid',
  local: 'urn:latchkey:token-type:local',
  /** A static secret the broker holds and lends to a sidecar for one task (never to the agent). */
  leasedSecret: 'urn:latchkey:token-type:leased-secret',
} as const

/**
 * A JWS in compact serialization (RFC 7515 §7.1): three base64url segments, unpadded (§2), and
 * nothing else. jose's decoder skips whitespace (and takes `=` padding) in the signature, so one
 * token verified under endless spellings: each a new key of the verified-user-token cache (up to
 * 10,000 of 16 KB each from one token and any reusable attestation) and a new fingerprint in the
 * trail for the same token. The sidecar's task API holds a user token to it too, so a token
 * the broker would refuse is refused when the task opens, not at each call's exchange.
 */
export const COMPACT_JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/

/**
 * COMPACT_JWS, each segment in its one canonical spelling (RFC 4648 §3.5: the bits past the last
 * whole byte are zero). Decoders drop those bits, so an ES256 or RS256 signature, whose last
 * character carries 2 bits of it and 4 spare, verified under 16 spellings: 16 verified-user-token
 * cache entries and 16 fingerprints in the trail for one token, each a token the broker never saw.
 */
export function isCompactJws(token: string): boolean {
  if (!COMPACT_JWS.test(token)) return false
  // Canonical when decoding and encoding again gives the same text (a length of 4n+1, which holds
  // no whole byte, does not survive either).
  return token.split('.').every((seg) => Buffer.from(seg, 'base64url').toString('base64url') === seg)
}
