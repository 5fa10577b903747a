// JWT-SVIDs from the SPIFFE Workload API (the SPIRE agent's unix socket), over gRPC with the
// `workload.spiffe.io: true` metadata the API requires. An SVID is reused until half its life
// has passed (SPIRE's own rotation point), then fetched anew; while the agent does not answer,
// the one in hand serves out the rest of its life.
//
// Which SVID: a workload may hold several (a pod whose registration entries match more than one
// SPIFFE ID), and the first is not necessarily this sidecar's agent. With `spiffeId` set, that ID
// is requested and an answer holding any other SVID is refused; without it, the answer must hold
// exactly one SVID, and several are refused with the IDs offered, never guessed between.
import { credentials, Metadata, status as grpcStatus, type ServiceError } from '@grpc/grpc-js'
import { decodeJwt } from 'jose'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { SpiffeWorkloadAPIClient, type JWTSVIDResponse } from '../../protos/gen/spiffe/workload.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'

export interface SpiffeWorkloadOptions {
  /** The SPIFFE ID to request, and the only one accepted. Absent: the one SVID the workload holds. */
  spiffeId?: string
  now?: () => number
}

/**
 * What reads as a SPIFFE ID (scheme, trust domain, path; the spec's characters only): nothing a
 * JWT can be. The configured spiffe_id is quoted as it is: the operator wrote it, the config check judged it.
 */
const SPIFFE_ID = /^spiffe:\/\/[a-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/

/**
 * A SPIFFE ID as quoted in a reason: IDs are not secrets, but an answer's bytes are bounded. What
 * the agent put where an ID goes and is none is not repeated: an SVID there (a label and the SVID
 * swapped, or an SVID as another's sub) was quoted into the agent's 503 and the log, whole when
 * short enough, its signature included.
 */
const quote = (id: string) => (SPIFFE_ID.test(id) ? JSON.stringify(id.slice(0, 256)) : '(not a SPIFFE ID: not repeated)')

export class SpiffeWorkloadEvidence implements WorkloadEvidence {
  readonly kind = 'spiffe'
  readonly tokenType = TOKEN_TYPES.spiffe
  private readonly client: SpiffeWorkloadAPIClient
  private readonly spiffeId: string | undefined
  private readonly now: () => number
  private cached: { svid: string; renewAt: number; expMs: number } | undefined

  constructor(
    private readonly socket: string,
    private readonly audience: string,
    private readonly timeoutMs = 3000,
    opts: SpiffeWorkloadOptions = {},
  ) {
    this.spiffeId = opts.spiffeId
    this.now = opts.now ?? Date.now
    this.client = new SpiffeWorkloadAPIClient(`unix://${socket}`, credentials.createInsecure())
  }

  async get(): Promise<string> {
    if (this.cached && this.now() < this.cached.renewAt) return this.cached.svid
    const md = new Metadata()
    md.set('workload.spiffe.io', 'true')
    let res: JWTSVIDResponse
    try {
      res = await new Promise<JWTSVIDResponse>((resolve, reject) => {
        this.client.fetchJwtsvid({ audience: [this.audience], spiffeId: this.spiffeId ?? '' }, md, { deadline: Date.now() + this.timeoutMs }, (err, r) => (err ? reject(err) : resolve(r)))
      })
    } catch (err) {
      // Renewed at half-life so that an agent restarting or briefly unreachable costs nothing: the
      // SVID in hand serves until an exchange could no longer reach the broker before its exp.
      // Only when the agent did not answer: what it answers (another ID, several) is taken.
      if (this.cached && this.now() < this.cached.expMs - this.timeoutMs) return this.cached.svid
      const code = grpcStatus[(err as ServiceError).code] ?? String((err as ServiceError).code)
      throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket}: ${code}`)
    }
    const svids = res.svids ?? []
    if (svids.length === 0) throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned no JWT-SVID`)
    const offered = () => svids.slice(0, 8).map((s) => quote(s.spiffeId)).join(', ') + (svids.length > 8 ? `, and ${svids.length - 8} more` : '')
    if (this.spiffeId !== undefined) {
      if (svids.some((s) => s.spiffeId !== this.spiffeId)) {
        throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} answered a request for ${JSON.stringify(this.spiffeId)} with JWT-SVIDs for ${offered()}; refused`)
      }
    } else if (svids.length > 1) {
      throw new EvidenceUnavailable(
        `SPIFFE Workload API at ${this.socket} returned ${svids.length} JWT-SVIDs (${offered()}); set sidecar.attestation.spiffe.spiffe_id to the one this sidecar's agent is`,
      )
    }
    const { spiffeId, svid } = svids[0]!
    if (!svid) throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned no JWT-SVID`)
    let sub: string | undefined
    let exp: number | undefined
    let iat: number | undefined
    try {
      ;({ sub, exp, iat } = decodeJwt(svid))
    } catch {
      throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned something that is not a JWT-SVID`)
    }
    // The broker attests the JWT's sub, not the label beside it: the two must agree.
    if (sub !== spiffeId) {
      throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned a JWT-SVID for ${quote(String(sub))} labelled ${quote(spiffeId)}; refused`)
    }
    const nowMs = this.now()
    const expMs = (exp ?? 0) * 1000
    if (expMs <= nowMs) throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned an expired JWT-SVID`)
    const startMs = iat !== undefined ? Math.min(iat * 1000, nowMs) : nowMs
    this.cached = { svid, renewAt: startMs + (expMs - startMs) / 2, expMs }
    return svid
  }

  close(): void {
    this.client.close()
  }
}
