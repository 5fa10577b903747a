// The identify stage for a standalone sidecar: the caller is this sidecar's agent. The
// Proxy-Authorization header (a task handle, once tasks exist) is consumed here and never
// forwarded; a malformed one is refused rather than ignored.
import type { Identifier, Identity } from '../context.js'
import { LatchkeyError } from '../errors.js'

export class SidecarAgentIdentifier implements Identifier {
  private readonly anonymous: Identity

  constructor(agentId: string) {
    this.anonymous = Object.freeze({ agentId, taskId: null, userSub: null }) as Identity
  }

  identify(proxyAuthorization: string | undefined): Identity {
    if (proxyAuthorization === undefined) return this.anonymous
    const space = proxyAuthorization.indexOf(' ')
    const scheme = space === -1 ? '' : proxyAuthorization.slice(0, space).toLowerCase()
    if ((scheme !== 'basic' && scheme !== 'bearer') || proxyAuthorization.length - space < 2) {
      throw new LatchkeyError('LK_PROXY_AUTH', 'Proxy-Authorization must be Basic or Bearer')
    }
    // Task handles arrive with the task registry; until then the sidecar's own agent is the caller.
    return this.anonymous
  }
}
