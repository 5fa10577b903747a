// The one object that flows through every pipeline stage for a call, and the narrow interfaces
// the stages implement. See ARCHITECTURE.md for the lifecycle drawing.
import type { Socket } from 'node:net'
import type { AddressClass } from '../lib/config/schema.js'
import type { Ancestor } from '../lib/delegation.js'

/**
 * How the request reached the sidecar. `tunnelled`: plain HTTP sent inside a CONNECT tunnel
 * (what undici's ProxyAgent does by default for http:// targets).
 */
export type Via = 'absolute' | 'connect' | 'reverse' | 'upgrade' | 'tunnelled'

export interface Target {
  scheme: 'http' | 'https'
  /** Normalised: lower-case, no trailing dot, IDN as punycode, IPv6 without brackets, IPv4 canonical dotted. */
  host: string
  port: number
  /** Path with dot segments resolved, as forwarded; always begins with '/'. Empty for CONNECT. */
  path: string
  /** Query string including '?', or ''. */
  search: string
  /** True when `host` is an IP literal. */
  hostIsIp: boolean
  /** The reverse route the agent named (origin-form), else null. */
  route: string | null
}

export interface Identity {
  agentId: string
  /** The task's ID (not its handle: the handle is a proxy credential and is never recorded). */
  taskId: string | null
  /** Delegating user's subject, when a task runs for a user. */
  userSub: string | null
  /** The open task the request named, when it named one. */
  task: TaskRef | null
}

/** The local process on the other end of the connection, when the sidecar could tell. */
export interface CallerProcess {
  pid: number | null
  uid: number
  exe: string | null
  /** sha256 (hex) of the executable. */
  sha256: string | null
}

/** What the credential stage needs of a task; the task registry owns the full record. */
export interface TaskRef {
  readonly id: string
  /** Epoch ms; the task's tokens never outlive it by more than the broker's margin. */
  readonly expiresAt: number
  /** The user's token (subject_token), held in memory only; null when the agent acts for itself. */
  readonly userToken: string | null
  /**
   * When userToken is a delegation token: the delegations it rests on, itself included (its
   * `delegated_from`, task_id and jti). Revoking any of them stops this task (control/state.ts).
   */
  readonly delegatedFrom?: readonly Ancestor[]
  ended: boolean
}

export interface Decision {
  action: 'allow' | 'deny'
  /** Rule ID, `default`, `network:<class>` for resolve-stage denials, or `policy:path-readings` for a path too tangled to judge. */
  rule: string
  reason: string
  /** False when a deny rule is in report mode: logged as a would-be denial, not enforced. */
  enforced: boolean
  /**
   * CONNECT only: the deny rests on method or path rules, which a tunnel of plain HTTP shows
   * request by request. Such a tunnel may open; a TLS one is refused.
   */
  inspectable?: true
}

export interface ResolvedAddress {
  /** The address dialled: the answer's first (every one of them passed the network floor). */
  address: string
  family: 4 | 6
  cls: AddressClass
  /** Every address of the answer, the dialled one first: a deny by address holds a name any of them is in. */
  answer: readonly { address: string }[]
}

export interface Credential {
  /** The secret itself. Never logged, audited or echoed. */
  value: string
  /** A safe identifier for audit: a jti, or source:name for static secrets. */
  id: string
  expiresAt: number | null
  scopes: string[]
}

export interface CredentialBinding {
  id: string
  source: 'static' | 'broker' | 'broker_secret' | 'client_credentials'
  /** broker: the audience asked of the broker. */
  tokenAudience: string
  /** broker: the scopes asked for (empty: all the broker allows). */
  scopes: readonly string[]
  /** Exact origin key `scheme://host:port` the credential may be sent to. */
  audience: string
  secret: string
  /** Lower-case header names removed from the agent's request before injection. */
  strip: readonly string[]
  /** Query parameter names removed before injection. */
  stripQuery: readonly string[]
  inject(headers: Record<string, string | string[] | undefined>, target: Target, credential: Credential): void
  /**
   * Forms of the credential that do not contain the secret as plain text, so a response
   * reflecting one can be recognised: what the injector writes (Basic's base64 of `user:secret`)
   * and the secret re-encoded as base64 (padded or not, URL-safe) or hex; for a JWS compact
   * token, its signature segment alone (the header and payload are not secret).
   */
  encodedForms(credential: Credential): readonly string[]
  /**
   * Why the injector cannot write `value` as the upstream should get it (words following "it"),
   * or null: a header carries printable ASCII only, a query parameter or Basic's base64 any
   * well-formed text. Issued tokens are checked with it before they are cached.
   */
  cannotCarry(value: string): string | null
}

export interface CallContext {
  via: Via
  startedAt: number
  /** performance.now() at start, for durations. */
  t0: number
  method: string
  target: Target | null
  /** The upstream's path a Destination header names (WebDAV COPY, MOVE), once judged; else null. */
  destination: string | null
  /**
   * The methods a POSTed form, JSON or multipart body names as `_method` (what Laravel, Rails or
   * Express act on instead), each judged as itself where the method matters; null for none. The
   * trail records them with the method: an allowed `_method=DELETE` was recorded as a plain POST.
   */
  methodOverrides: string[] | null
  identity: Identity
  caller: CallerProcess | null
  decision: Decision | null
  resolved: ResolvedAddress | null
  binding: CredentialBinding | null
  credential: Credential | null
  /** Where `credential` came from: the response is checked for every value it holds for `binding` (CredentialSource.held). */
  credentialSource: CredentialSource | null
  status: number
  bytesIn: number
  bytesOut: number
  /** ms from start to upstream response headers. */
  upstreamMs: number | null
  errorCode: string | null
  errorReason: string | null
  /** Times the credential turned up in the response body and was overwritten (forward/body-scrub.ts). */
  credentialInBody: number
  /** An open byte relay (a dialled TLS tunnel, a WebSocket): judged again when the policy changes (Pipeline.cutDenied). */
  relayed: boolean
  /**
   * The forward under way, once dispatched: a cut (revocation, task end) stops it at once, before
   * undici can write the request on a connection that opens meanwhile; the client socket's close
   * comes an event-loop turn later.
   */
  forward: { abort(err: Error): void } | null
  /**
   * Set while admission waits (DNS, a token exchange): how a cut then answers the call, at once and
   * with the refusal, not a bare close (Pipeline.cut).
   */
  admitting: ((cut: Error) => void) | null
  /** A cut that came while admission waited, already answered: once admission settles the call goes nowhere. */
  cutWith: Error | null
  /** While admitted and unfinished: the client socket it holds, and its links in Pipeline.live (LiveCalls owns these three). */
  liveSocket: Socket | null
  livePrev: CallContext | null
  liveNext: CallContext | null
}

export interface Identifier {
  /** Consumes Proxy-Authorization; returns the identity or throws a LatchkeyError (407). */
  identify(proxyAuthorization: string | undefined): Identity
  /**
   * Who a call refused before identification is recorded under: this sidecar's agent with no
   * task, so "what did agent X do" finds its malformed and not-sent calls too.
   */
  readonly unidentified: Identity
}

export interface Decider {
  /**
   * `resolved`: for a target named by DNS, what it resolved to. Deny rules written by address
   * (CIDRs, IP literals) are also matched against every address of the answer, so which one comes
   * first (round-robin DNS reorders them) never decides; allows by CIDR, against the one dialled.
   */
  decide(method: string, target: Target, resolved?: Pick<ResolvedAddress, 'address' | 'answer'>): Decision
  /** Whether a name's resolved address can change a decision (the policy has such deny rules). */
  readonly decidesByAddress: boolean
  /** Every method a rule names (upper-cased): the only ones decided otherwise than a method no rule names. */
  readonly methods: ReadonlySet<string>
}

export type Resolution = { address: ResolvedAddress } | { denied: Decision }

export interface Resolver {
  /**
   * Resolves and classifies; returns the address to dial, or a denial. Never dials. Answers
   * synchronously when nothing needs asking (an IP literal, a cached name), so the common path
   * allocates no promise.
   */
  resolve(target: Target): Resolution | Promise<Resolution>
}

export interface CredentialSource {
  get(binding: CredentialBinding, identity: Identity): Promise<Credential> | Credential
  /**
   * Every credential value this source holds for the binding, or issued and not yet expired:
   * each task's token and one a refresh superseded, not only the caller's. A credentialed call's
   * response is checked for all of them (forward/scrub.ts, body-scrub.ts): an upstream that shows
   * one request's token to another (a "last request" view, a cached echo) would otherwise hand
   * one task another's. The same array while the set is unchanged (the scrubbers cache their
   * needles by it), a new one when it changes; bounded as the source's cache is; never logged.
   */
  held(binding: CredentialBinding): readonly Credential[]
}

export interface AuditEvent {
  id: string
  ts: string
  agent: string
  task: string | null
  user: string | null
  via: Via
  method: string
  scheme: string | null
  host: string | null
  port: number | null
  path: string | null
  /** A WebDAV COPY or MOVE's Destination, as the upstream's path (decided as the path is); null for any other call. */
  destination: string | null
  address: string | null
  status: number
  bytes_in: number
  bytes_out: number
  duration_ms: number
  upstream_ms: number | null
  decision: 'allow' | 'deny' | 'report' | null
  rule: string | null
  reason: string | null
  /** token_sha256: only for issuer-minted tokens (proxy/audit/token-hash.ts), absent otherwise. */
  credential: { binding: string; id: string; audience: string; scopes: string[]; token_sha256?: string } | null
  error: string | null
  caller: CallerProcess | null
}

export interface AuditSink {
  /** Must not block or throw: the request path calls it. */
  write(event: AuditEvent): void
  /**
   * When true, a forwarded call is recorded (write() called) before the response's last bytes are
   * written, so a sink whose write() persists synchronously has the event before the agent has the
   * response. Default (false): the response goes first and the call is recorded right after.
   */
  readonly recordBeforeResponse?: boolean
  /**
   * With recordBeforeResponse: whether write() now puts the event where the sink promises (false
   * while its spool cannot be written); the response of a call it cannot keep is cut short.
   */
  keepsNow?(): boolean
  /** When present and false, the pipeline refuses new egress (503 LK_AUDIT_UNAVAILABLE): the sink cannot keep more. */
  accepting?(): boolean
  /** Why it is not accepting, for the refusal and /readyz. */
  unavailableReason?(): string
  /** Reopens what it writes to (SIGHUP: a log rotation moved the file). */
  reopen?(): void
  /** Persist everything written so far. */
  flush(): Promise<void>
  close(): Promise<void>
}
