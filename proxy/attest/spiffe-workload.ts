// JWT-SVIDs from the SPIFFE Workload API (the SPIRE agent's unix socket), over gRPC with the
// `workload.spiffe.io: true` metadata the API requires. An SVID is reused until half its life
// has passed (SPIRE's own rotation point), then fetched anew.
import { credentials, Metadata, status as grpcStatus, type ServiceError } from '@grpc/grpc-js'
import { decodeJwt } from 'jose'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { SpiffeWorkloadAPIClient, type JWTSVIDResponse } from '../../protos/gen/spiffe/workload.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'

export class SpiffeWorkloadEvidence implements WorkloadEvidence {
  readonly kind = 'spiffe'
  readonly tokenType = TOKEN_TYPES.spiffe
  private readonly client: SpiffeWorkloadAPIClient
  private cached: { svid: string; renewAt: number } | undefined

  constructor(
    private readonly socket: string,
    private readonly audience: string,
    private readonly timeoutMs = 3000,
    private readonly now: () => number = Date.now,
  ) {
    this.client = new SpiffeWorkloadAPIClient(`unix://${socket}`, credentials.createInsecure())
  }

  async get(): Promise<string> {
    if (this.cached && this.now() < this.cached.renewAt) return this.cached.svid
    const md = new Metadata()
    md.set('workload.spiffe.io', 'true')
    const res = await new Promise<JWTSVIDResponse>((resolve, reject) => {
      this.client.fetchJwtsvid({ audience: [this.audience], spiffeId: '' }, md, { deadline: Date.now() + this.timeoutMs }, (err, r) => (err ? reject(err) : resolve(r)))
    }).catch((err: ServiceError) => {
      const code = grpcStatus[err.code] ?? String(err.code)
      throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket}: ${code}`)
    })
    const svid = res.svids[0]?.svid
    if (!svid) throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned no JWT-SVID`)
    let exp: number | undefined
    let iat: number | undefined
    try {
      ;({ exp, iat } = decodeJwt(svid))
    } catch {
      throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned something that is not a JWT-SVID`)
    }
    const nowMs = this.now()
    const expMs = (exp ?? 0) * 1000
    if (expMs <= nowMs) throw new EvidenceUnavailable(`SPIFFE Workload API at ${this.socket} returned an expired JWT-SVID`)
    const startMs = iat !== undefined ? Math.min(iat * 1000, nowMs) : nowMs
    this.cached = { svid, renewAt: startMs + (expMs - startMs) / 2 }
    return svid
  }

  close(): void {
    this.client.close()
  }
}
