// `latchkey revoke|unrevoke`: the operator's side of the broker's admin API. Exit 0 when the
// broker confirmed, 1 with the broker's reason otherwise; prints the time the broker took.
import type { RevocationKind } from '../broker/revocations/store.js'

export async function revokeCommand(
  op: 'revoke' | 'unrevoke',
  agent: string | undefined,
  opts: { task?: string; jti?: string; reason?: string; broker: string; tokenEnv: string },
  env: NodeJS.ProcessEnv = process.env,
): Promise<number> {
  const targets: [RevocationKind, string | undefined][] = [
    ['agent', agent],
    ['task', opts.task],
    ['jti', opts.jti],
  ]
  const given = targets.filter(([, v]) => v !== undefined) as [RevocationKind, string][]
  if (given.length !== 1) {
    console.error(`${op}: name exactly one of: an agent instance ID, --task <id>, --jti <id>`)
    return 2
  }
  const [kind, value] = given[0]!
  const token = env[opts.tokenEnv]
  if (!token) {
    console.error(`${op}: set ${opts.tokenEnv} to the broker's admin token`)
    return 2
  }
  const base = opts.broker.replace(/\/$/, '')
  const started = performance.now()
  let res: Response
  try {
    res =
      op === 'revoke'
        ? await fetch(`${base}/v1/revocations`, {
            method: 'POST',
            headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
            body: JSON.stringify({ kind, value, ...(opts.reason ? { reason: opts.reason } : {}) }),
          })
        : await fetch(`${base}/v1/revocations/${kind}/${encodeURIComponent(value)}`, { method: 'DELETE', headers: { authorization: `Bearer ${token}` } })
  } catch (err) {
    // fetch says only "fetch failed"; why (ECONNREFUSED, ENOTFOUND, …) is in its cause.
    const cause = (err as { cause?: { code?: unknown; message?: unknown } }).cause
    console.error(`${op}: cannot reach the broker at ${base}: ${String(cause?.code ?? cause?.message ?? (err as Error).message)}`)
    return 1
  }
  const body = (await res.json().catch(() => ({}))) as { error_description?: string; created?: unknown; removed?: unknown; revocation?: { kind?: unknown; value?: unknown } }
  const ms = (performance.now() - started).toFixed(1)
  // Success is the broker's own answer about this revocation, not any 2xx: another service at a
  // mistyped --broker (or a proxy's page) answering 200 had an operator believe the agent stopped.
  const notTheBroker = () => {
    console.error(`${op}: the answer from ${base} (HTTP ${res.status}) is not a Latchkey broker's: nothing is known to be ${op === 'revoke' ? 'revoked' : 'unrevoked'}; check --broker`)
    return 1
  }
  if (op === 'revoke' && (res.status === 201 || res.status === 200)) {
    if (typeof body.created !== 'boolean' || body.revocation?.kind !== kind || body.revocation.value !== value) return notTheBroker()
    console.log(`${kind} ${value} ${body.created ? 'revoked' : 'was already revoked'} (${ms} ms)`)
    return 0
  }
  if (op === 'unrevoke' && res.status === 200) {
    if (body.removed !== true) return notTheBroker()
    console.log(`${kind} ${value} unrevoked (${ms} ms)`)
    return 0
  }
  if (op === 'unrevoke' && res.status === 404 && body.removed === false) {
    console.error(`${kind} ${value} was not revoked`)
    return 1
  }
  console.error(`${op}: broker answered ${res.status}: ${body.error_description ?? 'no reason given'}`)
  return 1
}
