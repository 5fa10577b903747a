// OAuth errors as RFC 6749 §5.2 and RFC 8693 §2.2.2 define them: a stable `error` code for
// clients, a human `error_description` that names what was wrong and never echoes a token.
export type OAuthErrorCode =
  | 'invalid_request'
  | 'invalid_client'
  | 'invalid_grant'
  | 'unauthorized_client'
  | 'unsupported_grant_type'
  | 'invalid_scope'
  | 'invalid_target'
  | 'temporarily_unavailable'

export class OAuthError extends Error {
  constructor(
    readonly error: OAuthErrorCode,
    readonly description: string,
    /** RFC 6749 §5.2: 400, or 401 when client authentication failed; 503 when what failed is on the broker's side. */
    readonly status = 400,
    /** Internal reason for the audit event (never sent): e.g. "actor_token: expired". */
    readonly reason = description,
  ) {
    super(`${error}: ${description}`)
  }

  body(): string {
    return JSON.stringify({ error: this.error, error_description: this.description })
  }
}
