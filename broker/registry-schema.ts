// The broker's agent registry's JSON Schema: compiled ahead of time into
// broker/registry-validate.generated.ts (scripts/config-validator.mjs; CI checks it is current),
// read by broker/registry.ts.

const scopeToken = { type: 'string', pattern: '^[\\x21\\x23-\\x5B\\x5D-\\x7E]+$' }
/** No token this broker issues lives longer, whatever the registry says (its own maximum). */
export const MAX_LIFETIME_S = 86_400
/** An agent type's or env's name: a DNS label, so an instance ID has a known maximum length. */
export const MAX_NAME = 63
const name = { type: 'string', pattern: '^[a-z0-9][a-z0-9-]*$', maxLength: MAX_NAME }

export const registrySchema = {
  type: 'object',
  additionalProperties: false,
  required: ['version', 'agents'],
  properties: {
    version: { const: 1 },
    agents: {
      type: 'object',
      propertyNames: name,
      additionalProperties: {
        type: 'object',
        additionalProperties: false,
        required: ['env', 'match', 'audiences', 'max_lifetime_s'],
        properties: {
          env: name,
          match: {
            type: 'object',
            additionalProperties: false,
            minProperties: 1,
            properties: {
              kubernetes: {
                type: 'object',
                additionalProperties: false,
                required: ['namespace', 'service_account'],
                properties: { namespace: { type: 'string', minLength: 1 }, service_account: { type: 'string', minLength: 1 } },
              },
              spiffe: {
                type: 'object',
                additionalProperties: false,
                required: ['path_prefix'],
                properties: { path_prefix: { type: 'string', pattern: '^/[^\\s]*$' } },
              },
              local: { type: 'boolean' },
            },
          },
          audiences: { type: 'object', minProperties: 1, additionalProperties: { type: 'array', items: scopeToken, uniqueItems: true } },
          max_lifetime_s: { type: 'integer', minimum: 1, maximum: MAX_LIFETIME_S },
          users: { enum: ['required', 'optional', 'none'], default: 'optional' },
          may_task: { type: 'array', items: name, uniqueItems: true, default: [] },
        },
      },
    },
  },
} as const
