// The SHA-256 of an issued token, for audit events: lets the collector's data be joined with the
// issuer's without ever holding the token. Only for tokens an issuer minted (broker JWTs, OAuth
// access tokens), which are long and random: a static secret or a lent password can be short
// enough to guess from its hash offline, so those get none. Cached per Credential object, so a
// token used for many calls is hashed once.
import { createHash } from 'node:crypto'
import type { Credential, CredentialBinding } from '../context.js'
import { perCredential } from '../credentials/per-credential.js'

const HASHED_SOURCES: ReadonlySet<CredentialBinding['source']> = new Set(['broker', 'client_credentials'])
const sha256Hex = perCredential((c) => createHash('sha256').update(c.value).digest('hex'))

export function tokenSha256(binding: CredentialBinding, credential: Credential): string | null {
  return HASHED_SOURCES.has(binding.source) ? sha256Hex(credential) : null
}
