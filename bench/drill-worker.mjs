// One sidecar host of the fire drill (bench/drill.mjs): starts its share of sidecars in this
// process (each its own agent, its own ports, its own control stream to the broker), drives
// steady traffic through each, and, for the agent about to be revoked, probes back to back so the
// moment its sidecar starts refusing is seen to within a request.
import { Pool } from 'undici'
import { join } from 'node:path'

const { root, work, agents, issuer, controlUrl, upstreamOrigin, intervalMs } = JSON.parse(process.argv[2])
const { validateConfig } = await import(join(root, 'dist/lib/config/load.js'))
const { startSidecar } = await import(join(root, 'dist/proxy/sidecar.js'))
const now = () => performance.timeOrigin + performance.now()
const upstream = new URL(upstreamOrigin)

const running = []
for (const agent of agents) {
  const name = agent.split(':').at(-1)
  const config = validateConfig({
    version: 1,
    log: { level: 'error' },
    sidecar: {
      agent_id: agent,
      listen: { port: 0 },
      admin: { port: 0 },
      broker: { url: issuer },
      attestation: { local: { key_file: join(work, 'local', 'local-attestor.key.json') } },
      control: { url: controlUrl, token_secret: 'CONTROL', stale_after_ms: 30_000 },
    },
    tasks: { default: { enabled: true, duration_s: 600 } },
    policy: { default: 'deny', rules: [{ id: 'allow-upstream', action: 'allow', hosts: ['127.0.0.1'], ports: [Number(upstream.port)] }] },
    network: { allow: [{ cidr: '127.0.0.1/32', ports: [Number(upstream.port)] }] },
    credentials: [{ id: 'up', audience: upstreamOrigin, source: 'broker', inject: { type: 'bearer' } }],
    audit: { jsonl: { path: join(work, `audit-${name}.jsonl`) } },
  })
  const sidecar = await startSidecar(config, { env: { LATCHKEY_SECRET_CONTROL: process.env.DRILL_CONTROL_TOKEN } })
  running.push({ agent, sidecar, pool: new Pool(sidecar.proxyUrl, { connections: 1, pipelining: 1 }), revoked: false, probing: null, wake: null, ok: 0, failed: 0, failures: [] })
}

async function once(r) {
  const res = await r.pool.request({ method: 'GET', path: `${upstreamOrigin}/work`, headers: { host: upstream.host } })
  const text = await res.body.text()
  return { status: res.statusCode, code: res.headers['x-latchkey-error'], text }
}

// Warm: every sidecar connected to the control stream and holding a token.
for (const r of running) {
  for (let i = 0; i < 200 && !r.sidecar.control.connected; i++) await new Promise((ok) => setTimeout(ok, 20))
  const first = await once(r)
  if (first.status !== 200) throw new Error(`${r.agent}: warm-up request got ${first.status} ${first.code ?? ''}`)
}

let stopping = false
async function steady(r) {
  // Spread the agents' requests over the interval.
  await new Promise((ok) => setTimeout(ok, Math.random() * intervalMs))
  while (!stopping && !r.revoked) {
    if (r.probing) {
      const res = await once(r).catch((e) => ({ status: 0, code: e.code }))
      const t = now()
      const p = r.probing
      if (res.status === 403 && res.code === 'LK_REVOKED' && p.refusedAt === null) p.refusedAt = t
      if (p.tokensGoneAt === null && r.sidecar.brokerTokens.size === 0) p.tokensGoneAt = now()
      if (p.refusedAt !== null && p.tokensGoneAt !== null) {
        r.revoked = true
        process.send({ type: 'result', agent: r.agent, refusedAt: p.refusedAt, tokensGoneAt: p.tokensGoneAt, probes: p.probes })
        return
      }
      p.probes++
      if (res.status !== 200 && res.status !== 403) r.failures.push(`${res.status} ${res.code ?? ''}`)
      continue
    }
    const res = await once(r).catch((e) => ({ status: 0, code: e.code }))
    if (r.probing) continue
    if (res.status === 200) r.ok++
    else {
      r.failed++
      if (r.failures.length < 5) r.failures.push(`${res.status} ${res.code ?? ''}`)
    }
    // Interruptible: arming the agent wakes it so probing starts at once.
    await new Promise((ok) => {
      const timer = setTimeout(ok, intervalMs)
      r.wake = () => {
        clearTimeout(timer)
        ok()
      }
    })
    r.wake = null
  }
}
const loops = running.map((r) => steady(r))

process.on('message', async (m) => {
  if (m.type === 'arm') {
    const r = running.find((x) => x.agent === m.agent)
    r.probing = { refusedAt: null, tokensGoneAt: null, probes: 0 }
    r.wake?.()
    process.send({ type: 'armed', agent: m.agent })
  } else if (m.type === 'stop') {
    stopping = true
    await Promise.all(loops)
    const stats = running.map((r) => ({ agent: r.agent, ok: r.ok, failed: r.failed, failures: r.failures, revoked: r.revoked }))
    for (const r of running) {
      await r.pool.close()
      await r.sidecar.close()
    }
    process.send({ type: 'stats', stats })
    process.disconnect()
  }
})
process.send({ type: 'ready', agents })
