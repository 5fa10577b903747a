// Workload evidence, sidecar side: what the sidecar presents to the broker as `actor_token` to
// prove which workload it serves. One interface; the broker's verifiers are the other half.
export interface WorkloadEvidence {
  readonly kind: 'kubernetes' | 'spiffe' | 'local'
  /** The RFC 8693 token type URN the broker routes on. */
  readonly tokenType: string
  /** Fresh-enough evidence; throws EvidenceUnavailable with a reason that names no secret. */
  get(): Promise<string>
  close(): void
}

export class EvidenceUnavailable extends Error {}
