// The sidecar imports undici's Pool module directly (proxy/forward/undici-pool.ts) to avoid
// loading all of undici. If an undici upgrade moves or replaces that module, fail here, loudly.
import t from 'tap'
import { Pool as UndiciPool } from 'undici'
import { Pool } from '../proxy/forward/undici-pool.js'

t.test('the directly imported Pool is the class undici exports', async (t) => {
  t.equal(Pool, UndiciPool)
  const pool = new Pool('http://127.0.0.1:9')
  t.type(pool.dispatch, 'function')
  await pool.close()
})
