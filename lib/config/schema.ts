// The one config file's shape (version 1). The JSON Schema below is the source of truth for
// validation; the TypeScript types beside it describe the same shape after defaults are applied.

export type Action = 'allow' | 'deny'
export type Mode = 'enforce' | 'report'

export interface RuleConfig {
  id: string
  action: Action
  /** Overrides policy.mode for this rule: a `report` deny rule logs but lets the call through. */
  mode?: Mode
  hosts?: string[]
  cidrs?: string[]
  ports?: number[]
  methods?: string[]
  paths?: string[]
  schemes?: ('http' | 'https')[]
}

export type InjectConfig =
  | { type: 'bearer' }
  | { type: 'header'; name: string; format?: string }
  | { type: 'query'; name: string }
  | { type: 'basic'; username: string }

export interface CredentialBindingConfig {
  id: string
  /** Exact origin the credential may go to: scheme://host[:port]. */
  audience: string
  /** static: a secret from env/secrets.file. broker: a task-scoped token from the broker (RFC 8693). */
  source: 'static' | 'broker' | 'broker_secret' | 'client_credentials'
  /** static only: the secret's name. */
  secret?: string
  /** broker only: the `audience` asked of the broker; defaults to the origin above. */
  token_audience?: string
  /** broker and client_credentials: scopes asked for; empty asks for everything allowed. */
  scopes?: string[]
  /** client_credentials only: the external authorization server and this client's registration. */
  oauth?: { token_url: string; client_id: string; client_secret: string; auth_method: 'client_secret_basic' | 'client_secret_post'; resource?: string }
  inject: InjectConfig
  /** Extra agent-sent headers to remove on this audience, beyond the defaults. */
  strip?: string[]
}

export interface NetworkRangeConfig {
  cidr: string
  ports?: number[]
}

export interface Config {
  version: 1
  sidecar: {
    agent_id: string
    listen: { host: string; port: number }
    admin: { host: string; port: number }
    allow_remote_clients: boolean
    /** Extra CA certificates (PEM) trusted for upstream TLS, on top of the system roots. */
    upstream_ca_file?: string
    timeouts: {
      /** A name's lookup, queued or in getaddrinfo; past it 504 LK_DNS_TIMEOUT. */
      dns_ms: number
      connect_ms: number
      headers_ms: number
      body_ms: number
      client_headers_ms: number
      drain_ms: number
      tunnel_idle_ms: number
      /** The longest an idle upstream keep-alive connection is kept, whatever the upstream's Keep-Alive asks. */
      upstream_idle_ms: number
    }
    max_pools: number
    /** Open connections to the proxy port at once; past it a new one closes the oldest carrying no call, or is closed unread (listen/cap.ts). */
    max_connections: number
    /**
     * Where task-scoped tokens come from. Required when any credential has source: broker.
     * https:// unless loopback or insecure_plaintext: workload evidence and user tokens go there.
     */
    broker?: { url: string; timeout_ms: number; min_remaining_ms: number; insecure_plaintext: boolean }
    /** The control stream from the broker: revocations and policy bundles. */
    control?: SidecarControlConfig
    /** A policy file (YAML: mode, default, rules) that replaces `policy` and is reloaded on change and SIGHUP. */
    policy_file?: string
    /** Watch policy_file for changes (default); false: reload on SIGHUP only. */
    policy_watch: boolean
    /** Which local processes call: identified per connection through /proc, optionally restricted. */
    callers: { identify: boolean; allowed_uids: number[]; allowed_executables: string[] }
    /** Workload evidence the sidecar presents to the broker; exactly one of kubernetes, spiffe, local. */
    attestation: {
      kubernetes?: { token_file: string }
      /** spiffe_id: the SVID to ask the Workload API for, and the only one accepted; without it, a workload must hold exactly one. */
      spiffe?: { socket: string; audience?: string; spiffe_id?: string }
      local?: { key_file: string; audience?: string }
    }
  }
  tasks: {
    max_duration_s: number
    /**
     * Every call must name an open task: one without Proxy-Authorization is refused (407) rather
     * than made as the agent with no task, so ending a task ends its egress, static credentials
     * included. Off by default.
     */
    required: boolean
    /** A task for agents that never open one (no Proxy-Authorization). Off by default. */
    default: { enabled: boolean; duration_s: number; purpose: string }
  }
  policy: {
    mode: Mode
    default: Action
    rules: RuleConfig[]
  }
  network: {
    /** Address classes or CIDRs a resolved address may never be, unless `allow` lets it. */
    deny: string[]
    allow: NetworkRangeConfig[]
    dns_cache_ms: number
    /** A failed lookup (a timeout included) is answered from memory this long; never longer than dns_cache_ms. */
    dns_negative_cache_ms: number
    /** Names being looked up at once (queued for a lookup thread included); past it 503 LK_DNS_BUSY. */
    dns_max_lookups: number
  }
  routes: Record<string, string>
  credentials: CredentialBindingConfig[]
  secrets: {
    file?: string
    env_prefix: string
    /** How often secrets.file is checked for a change (stat: its resolved path, mtime, size, inode), in ms; 0: reloaded on SIGHUP only. */
    reload_interval_ms: number
  }
  audit: { jsonl: { path: string; flush_ms: number }; collector: AuditCollectorConfig | null }
  log: { level: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent' }
  /** Present only where this file configures a broker (`latchkey broker`, `latchkey up`). */
  broker?: BrokerConfig
}

export type JwksSourceConfig = { jwks_file: string; jwks_url?: undefined } | { jwks_url: string; jwks_file?: undefined }

export interface BrokerConfig {
  /** `iss` of every token the broker signs, and its public base URL. */
  issuer: string
  /** The `aud` every workload attestation must carry: this broker. Defaults to the issuer. */
  audience?: string
  /** tls: required off loopback unless insecure_plaintext (token exchange carries workload evidence and user tokens). */
  listen: { host: string; port: number; tls: { cert_file: string; key_file: string } | null; insecure_plaintext: boolean }
  keys: { dir: string; alg: 'ES256' | 'EdDSA'; rotate_after_s: number }
  registry_file: string
  tokens: { floor_s: number; default_duration_s: number; max_body_bytes: number }
  /** The user IdP whose tokens arrive as `subject_token`. Absent: no user tokens are accepted. */
  users?: JwksSourceConfig & { issuer: string; audience: string; scope_claim: string }
  attestors: {
    /** max_token_age_s: a service-account token issued longer ago (by its iat) is refused; exp is not the bound (the API server may extend it to a year). */
    kubernetes?: JwksSourceConfig & { issuer: string; audience?: string; max_token_age_s: number }
    /** max_lifetime_s: a JWT-SVID meant to live longer (exp − iat, or exp − now without iat) is refused. */
    spiffe?: JwksSourceConfig & { trust_domain: string; audience?: string; max_lifetime_s: number }
    local?: { keys_file: string }
  }
  /** Revocation store; neither given: SQLite at `.latchkey/broker.db`. */
  store: { sqlite?: { path: string }; postgres?: { url: string; schema: string } }
  /** Environment variable holding the bearer token of the admin API (revocations). */
  admin_token_env: string
  /** Resource servers allowed to call introspection: id → environment variable holding its secret. */
  introspection_clients: Record<string, string>
  events: { jsonl?: { path: string } }
  /** Secrets the broker lends for a task, by audience: audience → env var holding the secret. */
  leased_secrets: Record<string, string>
  /** The control stream (gRPC Watch) to sidecars: revocations and policy bundles. Absent: off. */
  control?: BrokerControlConfig
}

export interface BrokerControlConfig {
  host: string
  port: number
  /** Environment variable holding the shared token sidecars present (Bearer). */
  token_env: string
  heartbeat_ms: number
  /** The sidecar policy bundle distributed to every sidecar (YAML: mode, default, rules); watched. */
  policy_file?: string
  /** At most 3 MiB: a snapshot must fit gRPC's default 4 MiB message limit. */
  max_bundle_bytes: number
  /** How often the revocation list is reconciled with the store (catches changes other replicas made while NATS was away). */
  resync_ms: number
  /** Several replicas: revocations made on one are published here and applied by the others. */
  nats?: { servers: string[]; stream: string; subject: string }
  /** TLS for the control listener: this broker's certificate, and optionally the CA sidecars' client certificates must chain to. */
  tls: { cert_file: string; key_file: string; client_ca_file?: string } | null
  /** Listen without TLS on an address other than loopback: sidecars cannot tell this broker from an impostor. */
  insecure_plaintext: boolean
}

export interface SidecarControlConfig {
  /** The broker's control address: grpc://host:port. */
  url: string
  /**
   * TLS to the broker: the CA its certificate must chain to (and the name to check, when not the
   * URL's host), and optionally this sidecar's client certificate. Required unless the URL is
   * loopback or insecure_plaintext is set: whoever answers at the URL gets the control token and
   * sets this sidecar's policy and revocations.
   */
  tls: { ca_file: string; cert_file?: string; key_file?: string; server_name?: string } | null
  insecure_plaintext: boolean
  /** Name of the secret (secrets.file or env <env_prefix><NAME>) holding the control token. */
  token_secret: string
  /** Past this long without hearing from the broker, no new tokens are minted (fail closed). */
  stale_after_ms: number
  backoff_min_ms: number
  backoff_max_ms: number
  max_bundle_bytes: number
  /**
   * Where the revocations last heard from the broker are kept, so a restarted sidecar enforces
   * them before its first call, until the broker's next snapshot. Unset: beside the audit state
   * (`<audit.jsonl.path without extension>.revocations.json`, or `<audit.collector.spool_dir>.revocations.json`).
   * Unreadable or corrupt at start: the sidecar does not start (delete the file to start with none).
   */
  state_file?: string
}

/** audit.collector: stream every event to the collector over gRPC, through a local spool. Replaces the JSON-lines sink when set. */
export interface AuditCollectorConfig {
  /** host:port of the collector's gRPC ingest. */
  address: string
  /** This sidecar's instance ID at the collector (its events are deduplicated per ID). */
  sidecar_id: string
  /** Name of the secret (secrets.file or env <env_prefix><NAME>) holding this sidecar's collector token. Required without tls. */
  token_secret?: string
  /** mTLS to the collector: its CA, and this sidecar's client certificate (CN = sidecar_id). */
  tls: { ca_file: string; cert_file: string; key_file: string } | null
  /** Without tls off loopback: the collector (and the audit trail) cannot be told from an impostor. */
  insecure_plaintext: boolean
  spool_dir: string
  spool_max_bytes: number
  segment_bytes: number
  /** When the spool is full: refuse new egress (fail closed) or keep serving and count dropped events. */
  on_full: 'refuse' | 'drop'
  batch_events: number
  backoff_min_ms: number
  backoff_max_ms: number
  close_timeout_ms: number
}

/** Every address class the resolver knows; `network.deny` may name any of them. */
export const ADDRESS_CLASSES = [
  'unspecified',
  'loopback',
  'private',
  'link-local',
  'metadata',
  'cgnat',
  'multicast',
  'broadcast',
  'reserved',
  'documentation',
  'benchmarking',
  'unique-local',
  'site-local',
] as const
export type AddressClass = (typeof ADDRESS_CLASSES)[number] | 'public'

export const DEFAULT_DENIED_CLASSES: readonly AddressClass[] = ADDRESS_CLASSES

const port = { type: 'integer', minimum: 1, maximum: 65535 }
const ms = (def: number, min = 1) => ({ type: 'integer', minimum: min, maximum: 3_600_000, default: def })
const nonEmpty = { type: 'string', minLength: 1 }

const rule = {
  type: 'object',
  additionalProperties: false,
  required: ['id', 'action'],
  properties: {
    id: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' },
    action: { enum: ['allow', 'deny'] },
    mode: { enum: ['enforce', 'report'] },
    hosts: { type: 'array', minItems: 1, items: nonEmpty },
    cidrs: { type: 'array', minItems: 1, items: nonEmpty },
    ports: { type: 'array', minItems: 1, items: port },
    methods: { type: 'array', minItems: 1, items: { type: 'string', pattern: '^[A-Za-z]+$' } },
    paths: { type: 'array', minItems: 1, items: { type: 'string', pattern: '^/' } },
    schemes: { type: 'array', minItems: 1, items: { enum: ['http', 'https'] } },
  },
}

// The discriminator makes ajv judge only the branch `type` names: without it, one wrong key under
// `inject` was eleven contradictory lines, one per branch (`type: must be "header"`, ...).
const inject = {
  type: 'object',
  required: ['type'],
  properties: { type: { enum: ['bearer', 'header', 'query', 'basic'] } },
  discriminator: { propertyName: 'type' },
  oneOf: [
    { additionalProperties: false, properties: { type: { const: 'bearer' } }, required: ['type'] },
    {
      additionalProperties: false,
      required: ['type', 'name'],
      properties: {
        type: { const: 'header' },
        name: { type: 'string', pattern: "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$" },
        format: { type: 'string', pattern: '\\{token\\}' },
      },
    },
    {
      additionalProperties: false,
      required: ['type', 'name'],
      properties: { type: { const: 'query' }, name: nonEmpty },
    },
    {
      additionalProperties: false,
      required: ['type', 'username'],
      properties: { type: { const: 'basic' }, username: { type: 'string', pattern: '^[^:]*$' } },
    },
  ],
}

/** A port to connect to, 1 to 65535, written without leading zeros (within a pattern). */
export const PORT_PATTERN = '(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])'

const httpUrl = { type: 'string', pattern: '^https?://[^\\s]+$' }
const jwksSource = {
  jwks_file: nonEmpty,
  jwks_url: httpUrl,
}

/**
 * How old (Kubernetes, from iat) or how long-lived (SPIFFE) workload evidence may be. A day by
 * default: the kubelet replaces a projected token at 80% of its TTL or after 24 h, whichever is
 * first; SPIRE's JWT-SVIDs live minutes. Evidence kept longer is a copy worth stealing.
 */
const evidenceAge = { type: 'integer', minimum: 60, maximum: 31_536_000, default: 86_400 }

const broker = {
  type: 'object',
  additionalProperties: false,
  required: ['issuer', 'registry_file'],
  properties: {
    issuer: httpUrl,
    audience: nonEmpty,
    listen: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        host: { ...nonEmpty, default: '127.0.0.1' },
        port: { ...port, minimum: 0, default: 15003 },
        tls: { type: ['object', 'null'], additionalProperties: false, default: null, required: ['cert_file', 'key_file'], properties: { cert_file: nonEmpty, key_file: nonEmpty } },
        insecure_plaintext: { type: 'boolean', default: false },
      },
    },
    keys: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        dir: { ...nonEmpty, default: '.latchkey/broker-keys' },
        alg: { enum: ['ES256', 'EdDSA'], default: 'ES256' },
        rotate_after_s: { type: 'integer', minimum: 60, maximum: 31_536_000, default: 86_400 },
      },
    },
    registry_file: nonEmpty,
    tokens: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        floor_s: { type: 'integer', minimum: 1, maximum: 86_400, default: 60 },
        default_duration_s: { type: 'integer', minimum: 1, maximum: 86_400, default: 300 },
        max_body_bytes: { type: 'integer', minimum: 1024, maximum: 1_048_576, default: 65_536 },
      },
    },
    users: {
      type: 'object',
      additionalProperties: false,
      required: ['issuer', 'audience'],
      properties: { issuer: nonEmpty, audience: nonEmpty, scope_claim: { ...nonEmpty, default: 'scope' }, ...jwksSource },
    },
    attestors: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        kubernetes: {
          type: 'object',
          additionalProperties: false,
          required: ['issuer'],
          properties: { issuer: nonEmpty, audience: nonEmpty, ...jwksSource, max_token_age_s: evidenceAge },
        },
        spiffe: {
          type: 'object',
          additionalProperties: false,
          required: ['trust_domain'],
          properties: { trust_domain: { type: 'string', pattern: '^[a-z0-9._-]+$' }, audience: nonEmpty, ...jwksSource, max_lifetime_s: evidenceAge },
        },
        local: {
          type: 'object',
          additionalProperties: false,
          required: ['keys_file'],
          properties: { keys_file: nonEmpty },
        },
      },
    },
    store: {
      type: 'object',
      additionalProperties: false,
      default: {},
      maxProperties: 1,
      properties: {
        sqlite: { type: 'object', additionalProperties: false, required: ['path'], properties: { path: nonEmpty } },
        postgres: {
          type: 'object',
          additionalProperties: false,
          required: ['url'],
          properties: { url: { type: 'string', pattern: '^postgres(ql)?://' }, schema: { type: 'string', pattern: '^[a-z_][a-z0-9_]{0,62}$', default: 'latchkey' } },
        },
      },
    },
    admin_token_env: { type: 'string', pattern: '^[A-Z_][A-Z0-9_]*$', default: 'LATCHKEY_BROKER_ADMIN_TOKEN' },
    introspection_clients: {
      type: 'object',
      default: {},
      propertyNames: { pattern: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' },
      additionalProperties: { type: 'string', pattern: '^[A-Z_][A-Z0-9_]*$' },
    },
    leased_secrets: {
      type: 'object',
      default: {},
      propertyNames: { minLength: 1, maxLength: 512 },
      additionalProperties: { type: 'string', pattern: '^[A-Z_][A-Z0-9_]*$' },
    },
    events: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: { jsonl: { type: 'object', additionalProperties: false, required: ['path'], properties: { path: nonEmpty } } },
    },
    control: {
      type: 'object',
      additionalProperties: false,
      properties: {
        host: { ...nonEmpty, default: '127.0.0.1' },
        port: { ...port, minimum: 0, default: 15004 },
        token_env: { type: 'string', pattern: '^[A-Z_][A-Z0-9_]*$', default: 'LATCHKEY_CONTROL_TOKEN' },
        heartbeat_ms: ms(1_000, 20),
        policy_file: nonEmpty,
        max_bundle_bytes: { type: 'integer', minimum: 1024, maximum: 3_145_728, default: 262_144 },
        resync_ms: ms(5_000, 50),
        tls: {
          type: ['object', 'null'],
          additionalProperties: false,
          default: null,
          required: ['cert_file', 'key_file'],
          properties: { cert_file: nonEmpty, key_file: nonEmpty, client_ca_file: nonEmpty },
        },
        insecure_plaintext: { type: 'boolean', default: false },
        nats: {
          type: 'object',
          additionalProperties: false,
          required: ['servers'],
          properties: {
            servers: { type: 'array', minItems: 1, items: nonEmpty },
            stream: { type: 'string', pattern: '^[A-Za-z0-9_-]+$', default: 'LATCHKEY_CONTROL' },
            subject: { type: 'string', pattern: '^[A-Za-z0-9_.-]+$', default: 'latchkey.control.revocations' },
          },
        },
      },
    },
  },
}

export const configSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['version'],
  properties: {
    version: { const: 1 },
    sidecar: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        agent_id: {
          type: 'string',
          pattern: '^agent:[a-z0-9][a-z0-9-]*:[a-z0-9][a-z0-9-]*:[A-Za-z0-9][A-Za-z0-9_.-]*$',
          // The broker's instance names are at most 253 characters; type and env are short.
          maxLength: 512,
          default: 'agent:local:dev:0',
        },
        listen: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: { host: { ...nonEmpty, default: '127.0.0.1' }, port: { ...port, minimum: 0, default: 15001 } },
        },
        admin: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: { host: { ...nonEmpty, default: '127.0.0.1' }, port: { ...port, minimum: 0, default: 15002 } },
        },
        allow_remote_clients: { type: 'boolean', default: false },
        upstream_ca_file: nonEmpty,
        timeouts: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: {
            // A DNS server that never answers holds a getaddrinfo thread for glibc's 10 s and more;
            // a call waits this long at most (resolve/resolver.ts).
            dns_ms: ms(5_000),
            connect_ms: ms(5_000),
            // As long as the LLM SDKs wait (OpenAI, Anthropic: 10 minutes): a model still thinking is not a dead upstream.
            headers_ms: ms(600_000),
            body_ms: ms(300_000),
            client_headers_ms: ms(30_000),
            drain_ms: ms(10_000, 0),
            // A CONNECT tunnel or WebSocket with no bytes either way this long is closed. Longer than
            // headers_ms: inside TLS the sidecar cannot tell a model still thinking from a dead peer.
            tunnel_idle_ms: ms(900_000),
            // An idle upstream keep-alive connection is closed after this, however long the upstream's
            // `Keep-Alive: timeout=` offers (undici alone believed up to 600 s): each holds a descriptor.
            upstream_idle_ms: ms(30_000),
          },
        },
        max_pools: { type: 'integer', minimum: 1, maximum: 100_000, default: 256 },
        // Far more than one agent opens; each holds two descriptors (the agent's and the upstream's).
        // Also the limit on upstream sockets open at once, pooled and relayed (forward/pools.ts).
        max_connections: { type: 'integer', minimum: 1, maximum: 1_000_000, default: 1024 },
        broker: {
          type: 'object',
          additionalProperties: false,
          required: ['url'],
          properties: {
            url: { type: 'string', pattern: '^https?://[^\\s]+$' },
            timeout_ms: ms(3_000),
            min_remaining_ms: ms(5_000, 0),
            insecure_plaintext: { type: 'boolean', default: false },
          },
        },
        control: {
          type: 'object',
          additionalProperties: false,
          required: ['url', 'token_secret'],
          properties: {
            url: { type: 'string', pattern: `^grpc://[^\\s/]+:${PORT_PATTERN}/?$` },
            token_secret: { type: 'string', pattern: '^[A-Za-z0-9_]+$' },
            stale_after_ms: ms(30_000, 50),
            backoff_min_ms: ms(100),
            backoff_max_ms: ms(5_000),
            max_bundle_bytes: { type: 'integer', minimum: 1024, maximum: 3_145_728, default: 262_144 },
            state_file: nonEmpty,
            tls: {
              type: ['object', 'null'],
              additionalProperties: false,
              default: null,
              required: ['ca_file'],
              properties: { ca_file: nonEmpty, cert_file: nonEmpty, key_file: nonEmpty, server_name: nonEmpty },
            },
            insecure_plaintext: { type: 'boolean', default: false },
          },
        },
        policy_file: nonEmpty,
        policy_watch: { type: 'boolean', default: true },
        callers: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: {
            identify: { type: 'boolean', default: false },
            allowed_uids: { type: 'array', uniqueItems: true, items: { type: 'integer', minimum: 0, maximum: 4_294_967_295 }, default: [] },
            allowed_executables: { type: 'array', uniqueItems: true, items: { type: 'string', pattern: '^[0-9a-f]{64}$' }, default: [] },
          },
        },
        attestation: {
          type: 'object',
          additionalProperties: false,
          default: {},
          maxProperties: 1,
          properties: {
            kubernetes: { type: 'object', additionalProperties: false, required: ['token_file'], properties: { token_file: nonEmpty } },
            spiffe: { type: 'object', additionalProperties: false, required: ['socket'], properties: { socket: nonEmpty, audience: nonEmpty, spiffe_id: { type: 'string', pattern: '^spiffe://[a-z0-9._-]+(/[^\\s/]+)*$', maxLength: 2048 } } },
            local: { type: 'object', additionalProperties: false, required: ['key_file'], properties: { key_file: nonEmpty, audience: nonEmpty } },
          },
        },
      },
    },
    tasks: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        max_duration_s: { type: 'integer', minimum: 1, maximum: 604_800, default: 86_400 },
        required: { type: 'boolean', default: false },
        default: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: {
            enabled: { type: 'boolean', default: false },
            duration_s: { type: 'integer', minimum: 1, maximum: 604_800, default: 3_600 },
            purpose: { type: 'string', maxLength: 256, default: 'default task' },
          },
        },
      },
    },
    policy: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        mode: { enum: ['enforce', 'report'], default: 'enforce' },
        default: { enum: ['allow', 'deny'], default: 'deny' },
        rules: { type: 'array', items: rule, default: [] },
      },
    },
    network: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        deny: { type: 'array', items: nonEmpty, default: [...DEFAULT_DENIED_CLASSES] },
        allow: {
          type: 'array',
          default: [],
          items: {
            type: 'object',
            additionalProperties: false,
            required: ['cidr'],
            properties: { cidr: nonEmpty, ports: { type: 'array', minItems: 1, items: port } },
          },
        },
        dns_cache_ms: ms(30_000, 0),
        // Short: long enough that an agent retrying a dead name does not take a lookup thread each
        // time, short enough that a name just created is soon found.
        dns_negative_cache_ms: ms(5_000, 0),
        dns_max_lookups: { type: 'integer', minimum: 1, maximum: 100_000, default: 64 },
      },
    },
    routes: {
      type: 'object',
      default: {},
      propertyNames: { pattern: '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$' },
      additionalProperties: { type: 'string', pattern: '^https?://' },
    },
    credentials: {
      type: 'array',
      default: [],
      items: {
        type: 'object',
        additionalProperties: false,
        required: ['id', 'audience', 'source', 'inject'],
        properties: {
          id: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' },
          audience: { type: 'string', pattern: '^https?://' },
          source: { enum: ['static', 'broker', 'broker_secret', 'client_credentials'] },
          oauth: {
            type: 'object',
            additionalProperties: false,
            required: ['token_url', 'client_id', 'client_secret'],
            properties: {
              token_url: { type: 'string', pattern: '^https?://[^\\s]+$' },
              client_id: { type: 'string', minLength: 1, maxLength: 256 },
              client_secret: { type: 'string', pattern: '^[A-Za-z0-9_.-]+$' },
              auth_method: { enum: ['client_secret_basic', 'client_secret_post'], default: 'client_secret_basic' },
              resource: { type: 'string', minLength: 1 },
            },
          },
          secret: { type: 'string', pattern: '^[A-Za-z0-9_.-]+$' },
          token_audience: { type: 'string', minLength: 1, maxLength: 512 },
          scopes: { type: 'array', uniqueItems: true, items: { type: 'string', pattern: '^[\\x21\\x23-\\x5B\\x5D-\\x7E]+$' } },
          inject,
          strip: { type: 'array', items: { type: 'string', pattern: "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$" } },
        },
      },
    },
    secrets: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        file: nonEmpty,
        env_prefix: { type: 'string', pattern: '^[A-Z0-9_]*$', default: 'LATCHKEY_SECRET_' },
        reload_interval_ms: ms(2000, 0),
      },
    },
    audit: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        jsonl: {
          type: 'object',
          additionalProperties: false,
          default: {},
          properties: { path: { ...nonEmpty, default: 'latchkey-audit.jsonl' }, flush_ms: ms(20) },
        },
        collector: {
          type: ['object', 'null'],
          additionalProperties: false,
          default: null,
          required: ['address', 'sidecar_id'],
          properties: {
            address: { type: 'string', pattern: `^[^\\s/]+:${PORT_PATTERN}$` },
            sidecar_id: nonEmpty,
            token_secret: nonEmpty,
            tls: {
              type: ['object', 'null'],
              additionalProperties: false,
              default: null,
              required: ['ca_file', 'cert_file', 'key_file'],
              properties: { ca_file: nonEmpty, cert_file: nonEmpty, key_file: nonEmpty },
            },
            insecure_plaintext: { type: 'boolean', default: false },
            spool_dir: { ...nonEmpty, default: 'latchkey-spool' },
            // At most 1 TiB: no disk a spool is given holds more, and a value past 2^53 is no byte count.
            spool_max_bytes: { type: 'integer', minimum: 65536, maximum: 2 ** 40, default: 256 * 1024 * 1024 },
            // At most 256 MiB: a restart reads each segment whole (spool.ts recover), into memory,
            // and Node reads no file past 2 GiB at once (ERR_FS_FILE_TOO_LARGE): larger segments
            // made every restart fail.
            segment_bytes: { type: 'integer', minimum: 4096, maximum: 256 * 1024 * 1024, default: 4 * 1024 * 1024 },
            on_full: { enum: ['refuse', 'drop'], default: 'refuse' },
            batch_events: { type: 'integer', minimum: 1, maximum: 10000, default: 1000 },
            backoff_min_ms: ms(100),
            backoff_max_ms: ms(5000),
            close_timeout_ms: ms(2000, 0),
          },
        },
      },
    },
    log: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: {
        level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info' },
      },
    },
    broker,
  },
} as const
