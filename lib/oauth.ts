// OAuth constants shared by the broker (which verifies) and the sidecar (which asks).
export const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange'

export const TOKEN_TYPES = {
  jwt: 'urn:ietf:params:oauth:token-type:jwt',
  accessToken: 'urn:ietf:params:oauth:token-type:access_token',
  kubernetes: 'urn:latchkey:token-type:kubernetes-service-account',
  spiffe: 'urn:latchkey:token-type:jwt-svid',
  local: 'urn:latchkey:token-type:local',
  /** A static secret the broker holds and lends to a sidecar for one task (never to the agent). */
  leasedSecret: 'urn:latchkey:token-type:leased-secret',
} as const
