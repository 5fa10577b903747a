// Routes each binding to the source it names: static secrets, or the broker's task-scoped tokens.
import type { Credential, CredentialBinding, CredentialSource, Identity } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { NONE_HELD } from './held.js'

export class CredentialSources implements CredentialSource {
  constructor(
    private readonly staticSource: CredentialSource,
    private readonly brokerSource: CredentialSource | undefined,
    private readonly clientCredentials: CredentialSource | undefined,
  ) {}

  get(binding: CredentialBinding, identity: Identity): Credential | Promise<Credential> {
    if (binding.source === 'static') return this.staticSource.get(binding, identity)
    if (binding.source === 'client_credentials') {
      if (!this.clientCredentials) throw new LatchkeyError('LK_CREDENTIAL_UNAVAILABLE', `credential ${binding.id} has no client-credentials provider`)
      return this.clientCredentials.get(binding, identity)
    }
    if (!this.brokerSource) throw new LatchkeyError('LK_CREDENTIAL_UNAVAILABLE', `credential ${binding.id} needs the broker, and none is configured`)
    return this.brokerSource.get(binding, identity)
  }

  held(binding: CredentialBinding): readonly Credential[] {
    const source = binding.source === 'static' ? this.staticSource : binding.source === 'client_credentials' ? this.clientCredentials : this.brokerSource
    return source?.held(binding) ?? NONE_HELD
  }
}
