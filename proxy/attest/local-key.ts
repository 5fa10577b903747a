// The local attestor's sidecar half: a fresh single-use attestation, signed with the key
// `latchkey up` generated, for every exchange (the broker refuses a replayed one).
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { loadLocalAttestorKey, signLocalAttestation } from '../../lib/local-attestor.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'
import type { CryptoKey } from 'jose'

export class LocalKeyEvidence implements WorkloadEvidence {
  readonly kind = 'local'
  readonly tokenType = TOKEN_TYPES.local
  private key: Promise<{ kid: string; privateKey: CryptoKey }> | undefined

  constructor(
    private readonly keyFile: string,
    private readonly instanceId: string,
    private readonly brokerAudience: string,
  ) {}

  async get(): Promise<string> {
    this.key ??= loadLocalAttestorKey(this.keyFile).catch((err: Error) => {
      this.key = undefined
      throw new EvidenceUnavailable(`local attestor key ${this.keyFile}: ${(err as NodeJS.ErrnoException).code ?? 'unusable'}`)
    })
    return signLocalAttestation(await this.key, this.instanceId, this.brokerAudience)
  }

  close(): void {}
}
