// Kubernetes projected service-account tokens: signature against the cluster's JWKS, `iss`, `aud`
// (this broker), `exp`/`nbf` within 30 s, and the pod binding. A token not bound to a pod (the
// legacy secret-based kind) is refused: it outlives the workload it names. Its age is bounded by
// `iat` (required), not by `exp`: the API server may extend exp to a year for clients that do
// not re-read the file, while the kubelet replaces the file at 80% of the TTL or after 24 h.
import type { JWTVerifyGetKey } from 'jose'
import { verifyJwt } from '../jwt.js'
import type { Registry } from '../registry.js'
import { AttestationFailed, checkInstance, TOKEN_TYPES, type Attestation, type AttestationVerifier } from './attestor.js'

interface KubernetesClaims {
  namespace?: unknown
  serviceaccount?: { name?: unknown; uid?: unknown }
  pod?: { name?: unknown; uid?: unknown }
}

export class KubernetesVerifier implements AttestationVerifier {
  readonly kind = 'kubernetes'
  readonly tokenType = TOKEN_TYPES.kubernetes

  constructor(
    private readonly keys: JWTVerifyGetKey,
    private readonly issuer: string,
    private readonly audience: string,
    /** broker.attestors.kubernetes.max_token_age_s */
    private readonly maxTokenAgeS: number,
  ) {}

  claims(p: { iss?: unknown }): boolean {
    return p.iss === this.issuer
  }

  async verify(token: string, registry: Registry): Promise<Attestation> {
    const payload = await verifyJwt(token, this.keys, {
      issuer: this.issuer,
      audience: this.audience,
      requiredClaims: ['sub', 'iat'],
      maxTokenAgeS: this.maxTokenAgeS,
      soleAudience: true,
    })
    const k8s = payload['kubernetes.io'] as KubernetesClaims | undefined
    const ns = k8s?.namespace
    const sa = k8s?.serviceaccount?.name
    const pod = k8s?.pod?.name
    if (typeof ns !== 'string' || typeof sa !== 'string') throw new AttestationFailed('no kubernetes.io namespace/serviceaccount claims')
    if (typeof pod !== 'string' || typeof k8s?.pod?.uid !== 'string') throw new AttestationFailed('not bound to a pod (kubernetes.io.pod missing)')
    if (payload.sub !== `system:serviceaccount:${ns}:${sa}`) throw new AttestationFailed('sub does not match the service account claims')
    for (const [type, spec] of Object.entries(registry.agents)) {
      const m = spec.match.kubernetes
      if (m && m.namespace === ns && m.service_account === sa) {
        return {
          kind: 'kubernetes',
          agentType: type,
          instanceId: `agent:${type}:${spec.env}:${checkInstance(pod)}`,
          subject: payload.sub,
          expiresAt: payload.exp!,
        }
      }
    }
    throw new AttestationFailed(`no agent type matches service account ${ns}/${sa}`, true)
  }
}
