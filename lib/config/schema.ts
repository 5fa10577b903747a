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
  source: 'static'
  secret: string
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
      connect_ms: number
      headers_ms: number
      body_ms: number
      client_headers_ms: number
      drain_ms: number
    }
    max_pools: number
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
  }
  routes: Record<string, string>
  credentials: CredentialBindingConfig[]
  secrets: { file?: string; env_prefix: string }
  audit: { jsonl: { path: string; flush_ms: number }; collector: AuditCollectorConfig | null }
  log: { level: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent' }
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

const inject = {
  type: 'object',
  required: ['type'],
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
            connect_ms: ms(5_000),
            headers_ms: ms(30_000),
            body_ms: ms(300_000),
            client_headers_ms: ms(30_000),
            drain_ms: ms(10_000, 0),
          },
        },
        max_pools: { type: 'integer', minimum: 1, maximum: 100_000, default: 256 },
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
        required: ['id', 'audience', 'source', 'secret', 'inject'],
        properties: {
          id: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' },
          audience: { type: 'string', pattern: '^https?://' },
          source: { enum: ['static'] },
          secret: { type: 'string', pattern: '^[A-Za-z0-9_.-]+$' },
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
            address: { type: 'string', pattern: '^[^\\s/]+:[0-9]{1,5}$' },
            sidecar_id: nonEmpty,
            token_secret: nonEmpty,
            tls: {
              type: ['object', 'null'],
              additionalProperties: false,
              default: null,
              required: ['ca_file', 'cert_file', 'key_file'],
              properties: { ca_file: nonEmpty, cert_file: nonEmpty, key_file: nonEmpty },
            },
            spool_dir: { ...nonEmpty, default: 'latchkey-spool' },
            spool_max_bytes: { type: 'integer', minimum: 65536, default: 256 * 1024 * 1024 },
            segment_bytes: { type: 'integer', minimum: 4096, default: 4 * 1024 * 1024 },
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
  },
} as const
