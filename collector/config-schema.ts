// The collector's config file's JSON Schema: compiled ahead of time into
// collector/config-validate.generated.ts (scripts/config-validator.mjs; CI checks it is current),
// read by collector/config.ts.

const hostPort = (port: number) => ({
  type: 'object',
  additionalProperties: false,
  default: {},
  properties: { host: { type: 'string', minLength: 1, default: '127.0.0.1' }, port: { type: 'integer', minimum: 0, maximum: 65535, default: port } },
})

export const collectorConfigSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['version', 'collector'],
  properties: {
    version: { const: 1 },
    collector: {
      type: 'object',
      additionalProperties: false,
      required: ['sidecars'],
      properties: {
        grpc: {
          ...hostPort(15100),
          properties: {
            ...hostPort(15100).properties,
            // At least twice the largest event the collector takes (MAX_EVENT_BYTES, 256 KiB): a sidecar
            // sends smaller batches to a collector that refuses one as too large, but never less than
            // one event, and one event past the limit was refused at every resend. At most 64 MiB:
            // a sidecar sends 2 MiB messages at most (its grpc.max_send_message_length), and grpc-js
            // holds a message whole before the batch is judged, so more only lets one stream make
            // the collector hold more (unbounded, any size a typo made, up to gRPC's 4 GiB prefix).
            max_batch_bytes: { type: 'integer', minimum: 512 * 1024, maximum: 64 * 1024 * 1024, default: 8 * 1024 * 1024 },
            max_clock_skew_ms: { type: 'integer', minimum: 0, maximum: 86_400_000, default: 300_000 },
            tls: {
              type: ['object', 'null'],
              default: null,
              additionalProperties: false,
              required: ['cert_file', 'key_file', 'client_ca_file'],
              properties: { cert_file: { type: 'string', minLength: 1 }, key_file: { type: 'string', minLength: 1 }, client_ca_file: { type: 'string', minLength: 1 } },
            },
            insecure_plaintext: { type: 'boolean', default: false },
          },
        },
        http: {
          ...hostPort(15101),
          type: ['object', 'null'],
          properties: { ...hostPort(15101).properties, reader_tokens_sha256: { type: 'array', items: { type: 'string', pattern: '^[0-9a-f]{64}$' } } },
        },
        // The discriminator makes ajv judge only the branch `kind` names (as the sidecar's `inject`):
        // without it, `pool_size` under a sqlite store was five lines, one per branch's complaint.
        store: {
          type: 'object',
          default: { kind: 'sqlite' },
          required: ['kind'],
          properties: { kind: { enum: ['sqlite', 'postgres'] } },
          discriminator: { propertyName: 'kind' },
          oneOf: [
            {
              additionalProperties: false,
              properties: { kind: { const: 'sqlite' }, path: { type: 'string', minLength: 1, default: 'latchkey-audit.db' } },
            },
            {
              additionalProperties: false,
              required: ['url'],
              properties: {
                kind: { const: 'postgres' },
                url: { type: 'string', pattern: '^postgres(ql)?://' },
                schema: { type: 'string', pattern: '^[a-z_][a-z0-9_]{0,62}$', default: 'latchkey' },
                // Connections to PostgreSQL, whose max_connections is 100 by default (and shared with
                // every other client): a pool past it is never filled, and the collector runs two
                // reads at once and one write per batch.
                pool_size: { type: 'integer', minimum: 1, maximum: 100, default: 4 },
                writer_role: { type: 'string', pattern: '^[a-z_][a-z0-9_]{0,62}$' },
                migrate: { type: 'boolean', default: true },
              },
            },
          ],
        },
        sidecars: {
          type: 'array',
          items: {
            type: 'object',
            additionalProperties: false,
            required: ['id'],
            properties: {
              id: { type: 'string', minLength: 1 },
              token_sha256: { type: 'string', pattern: '^[0-9a-f]{64}$' },
              agents: { type: 'array', minItems: 1, items: { type: 'string', pattern: '^agent:[^*]*\\*?$' } },
            },
          },
        },
        nats: {
          type: ['object', 'null'],
          default: null,
          additionalProperties: false,
          required: ['servers'],
          properties: {
            servers: { type: 'array', minItems: 1, items: { type: 'string', minLength: 1 } },
            stream: { type: 'string', pattern: '^[A-Za-z0-9_-]+$', default: 'LATCHKEY_AUDIT' },
            subject_prefix: { type: 'string', pattern: '^[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*$', default: 'latchkey.audit' },
          },
        },
      },
    },
    log: {
      type: 'object',
      additionalProperties: false,
      default: {},
      properties: { level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info' } },
    },
  },
} as const
