// undici ships types for its index only; the internal modules the sidecar imports directly.
declare module 'undici/lib/dispatcher/pool.js' {
  const Pool: unknown
  export default Pool
}
declare module 'undici/lib/core/connect.js' {
  const buildConnector: unknown
  export default buildConnector
}
