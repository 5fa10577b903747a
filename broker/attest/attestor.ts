// Workload attestation, broker side: each verifier turns one kind of evidence (a Kubernetes
// service-account token, a SPIFFE JWT-SVID, a local key's signature) into the agent instance it
// proves, using the registry's `match` rules. One interface; one conformance suite runs against
// every implementation (test/broker/attestors.test.ts).
import { MAX_NAME, type Registry } from '../registry.js'
import { TASK_HANDLE } from '../../lib/task-handle.js'

export type AttestorKind = 'kubernetes' | 'spiffe' | 'local'

export interface Attestation {
  kind: AttestorKind
  agentType: string
  /** agent:<type>:<env>:<instance> */
  instanceId: string
  /** The evidence's own subject: system:serviceaccount:…, spiffe://…, the local key's kid. */
  subject: string
  /** When the evidence expires (epoch seconds). */
  expiresAt: number
}

export class AttestationFailed extends Error {
  constructor(
    message: string,
    /** The evidence is genuine but names no registered agent: the workload gets nothing. */
    readonly unregistered = false,
  ) {
    super(message)
  }
}

/** The evidence could not be checked for a reason on the broker's side (its store): try again later. */
export class AttestationUnavailable extends Error {}

export interface AttestationVerifier {
  readonly kind: AttestorKind
  /** The `actor_token_type` URN that names this evidence explicitly. */
  readonly tokenType: string
  /** For `urn:ietf:params:oauth:token-type:jwt`: does this (unverified) payload look like ours? */
  claims(unverified: { iss?: unknown; sub?: unknown }): boolean
  /** Verifies the evidence and maps it to an instance; throws AttestationFailed, AttestationUnavailable or a jose error. */
  verify(token: string, registry: Registry): Promise<Attestation>
}

export { TOKEN_TYPES } from '../../lib/oauth.js'

/**
 * Instance IDs carry only characters that are safe in logs, metrics labels and paths. A name
 * outside that alphabet or longer than a DNS name is refused, never rewritten: truncating or
 * replacing would map two workloads (two long StatefulSet pod names sharing a prefix, `a/b` and
 * `a-b`) to one instance, so revoking one would stop the other and the trail could not tell them
 * apart. Kubernetes pod names (DNS subdomains, at most 253 characters) always pass.
 */
export function checkInstance(raw: string): string {
  if (raw.length > MAX_INSTANCE) throw new AttestationFailed(`the instance name is ${raw.length} characters; at most ${MAX_INSTANCE} are accepted`)
  if (!INSTANCE.test(raw)) throw new AttestationFailed('the instance name must start with a letter or digit and hold only A-Z a-z 0-9 . _ -')
  // The admin API refuses any revocation value holding a task handle (an operator's paste of a
  // proxy credential): an instance named so could be revoked only with every other of its type.
  if (TASK_HANDLE.test(raw)) throw new AttestationFailed("the instance name holds a task handle's shape (lkt_ and 22 characters), which no revocation may name")
  return raw
}
export const MAX_INSTANCE = 253
/** The longest instance ID an attestor can produce: agent:<type>:<env>:<instance>. */
export const MAX_AGENT_ID = 'agent:'.length + MAX_NAME + 1 + MAX_NAME + 1 + MAX_INSTANCE
const INSTANCE = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/
