// undici ships types for its index only; the internal modules the sidecar imports directly.
declare module 'undici/lib/dispatcher/pool.js' {
  const Pool: unknown
  export default Pool
}
declare module 'undici/lib/dispatcher/pool-base.js' {
  /** A pool's clients, one per socket it keeps (internal to undici: read and trimmed by PinnedPools.closeIdle). */
  export const kClients: unique symbol
}
declare module 'undici/lib/core/connect.js' {
  const buildConnector: unknown
  export default buildConnector
}
declare module 'undici/lib/core/symbols.js' {
  /** undici's internal symbols (CommonJS: read from the default export); kReset, set on a socket, closes it once its responses complete (see body-request-line.ts). */
  const symbols: { readonly kReset: symbol }
  export default symbols
}
