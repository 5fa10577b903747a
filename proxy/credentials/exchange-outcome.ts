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
