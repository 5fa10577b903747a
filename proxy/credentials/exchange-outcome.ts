// What a token exchange can come back with, apart from the client that performs it: the token
// cache and the OAuth issuer need these types without loading the broker client (and with it
// jose and all of undici) into a sidecar that has no broker configured.
export type ExchangeOutcome = 'refused' | 'unreachable' | 'evidence' | 'invalid_response'

export class ExchangeFailed extends Error {
  constructor(
    readonly outcome: ExchangeOutcome,
    message: string,
  ) {
    super(message)
  }
}

export interface IssuedToken {
  token: string
  jti: string
  scopes: string[]
  /** Relative lifetime from the broker's expires_in: immune to clock skew between the two hosts. */
  expiresInMs: number
}

/** The most of a token endpoint's answer that is read: a token response is a few kilobytes. */
export const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
/** The longest lifetime taken from expires_in, whatever the issuer says (a day). */
export const MAX_EXPIRES_IN_S = 24 * 60 * 60

/** Reads a body up to `limit` bytes; past that, stops reading and returns null. */
export async function readCapped(body: AsyncIterable<Buffer> & { destroy(err?: Error): unknown }, limit: number): Promise<string | null> {
  const chunks: Buffer[] = []
  let n = 0
  for await (const chunk of body) {
    n += chunk.length
    if (n > limit) {
      body.destroy()
      return null
    }
    chunks.push(chunk)
  }
  return Buffer.concat(chunks).toString('utf8')
}
