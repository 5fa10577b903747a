// A store that does not answer when the collector starts (PostgreSQL not up yet, a wrong host) is
// said in the log at once, not first when someone asks /readyz: the collector starts without it,
// and every batch is refused until it answers. Asked again until it does, and said once when it does.
import type { Logger } from '../lib/log.js'
import type { AuditStore } from './store/types.js'

/** How often a store that did not answer at start is asked again. */
export const STORE_RETRY_MS = 5_000

/** Starts watching; the returned function stops it (at close). */
export function watchStoreAtStart(store: Pick<AuditStore, 'ping' | 'kind'>, log: Logger, retryMs = STORE_RETRY_MS): () => void {
  let timer: NodeJS.Timeout | null = null
  let stopped = false
  let failed = false
  const ask = (): void => {
    store.ping().then(
      () => {
        if (failed && !stopped) log.info({ store: store.kind }, 'the store answers: audit batches are stored again')
      },
      (err: unknown) => {
        if (stopped) return
        // The reason names an address or a role, never a password (the stores leave it out).
        if (!failed) log.error({ store: store.kind, reason: (err as Error)?.message, retry_ms: retryMs }, 'the store does not answer: audit batches are refused (sidecars keep them spooled) and /readyz is 503 until it does')
        failed = true
        timer = setTimeout(ask, retryMs)
        timer.unref()
      },
    )
  }
  ask()
  return () => {
    stopped = true
    if (timer) clearTimeout(timer)
  }
}
