// undici ships types for its index only; the one internal module the sidecar imports directly.
declare module 'undici/lib/dispatcher/pool.js' {
  const Pool: unknown
  export default Pool
}
