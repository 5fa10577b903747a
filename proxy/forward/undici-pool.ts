// The forward stage needs only undici's Pool and its dispatch(). `import { Pool } from 'undici'`
// evaluates all of undici (fetch, WebSocket, EventSource, caches, the request API): about 10 MB
// more RSS in every sidecar for code the hot path never runs. This is the same class, from the
// module undici's own index exports (test/forward-pool.test.ts checks they stay identical).
import type { Pool as UndiciPool } from 'undici'
import PoolModule from 'undici/lib/dispatcher/pool.js'

export const Pool = PoolModule as unknown as typeof UndiciPool
export type Pool = UndiciPool
