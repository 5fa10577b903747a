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

// forward/pools.ts counts upstream sockets from the one undici's connector returns (its type says
// void) until that socket's 'close': an undici that stopped returning it would leave them uncounted.
t.test("undici's connector returns the socket it dials", async (t) => {
  const { default: buildConnectorModule } = await import('undici/lib/core/connect.js')
  const buildConnector = buildConnectorModule as (o: object) => unknown
  const { createServer, Socket } = await import('node:net')
  const server = createServer((s) => s.end()).listen(0, '127.0.0.1')
  await new Promise((r) => server.once('listening', r))
  const port = (server.address() as import('node:net').AddressInfo).port
  const connector = buildConnector({ timeout: 2_000 }) as unknown as (o: object, cb: (err: Error | null, s: unknown) => void) => unknown
  let connected: unknown
  const returned = await new Promise<unknown>((resolve) => {
    const r = connector({ hostname: '127.0.0.1', host: `127.0.0.1:${port}`, protocol: 'http:', port: String(port) }, (_err, s) => {
      connected = s
      resolve(r)
    })
  })
  t.ok(returned instanceof Socket, 'a socket is returned')
  t.equal(returned, connected, 'the one the callback is given')
  ;(returned as InstanceType<typeof Socket>).destroy()
  server.close()
})
