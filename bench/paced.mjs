// Open-loop paced load generator: a fixed request rate, whatever the responses do (wrk is
// closed-loop: its Lua delay() waits after each response, so it cannot hold a true rate).
// Runs in its own process, pinned by the caller. Protocol on stdout, one line each:
//   START            the measured window begins (after the warm-up)
//   STOP             the measured window's last request was sent
//   RESULT {json}    achieved rate, errors and latency of the measured window
// usage: node paced.mjs <proxy origin> <request path or absolute URL> <rate> <seconds> [warmup s]
import { Pool } from 'undici'

const [origin, path, rateArg, secondsArg, warmupArg = '1'] = process.argv.slice(2)
const rate = Number(rateArg)
const seconds = Number(secondsArg)
const warmup = Number(warmupArg)
const pool = new Pool(origin, { connections: 64, pipelining: 1 })

let inFlight = 0
const stats = { completed: 0, errors: 0, non2xx: 0, latUs: [] }

function fire(record) {
  inFlight++
  const t0 = process.hrtime.bigint()
  pool.request({ path, method: 'GET' }).then(
    async (r) => {
      await r.body.dump()
      inFlight--
      if (!record) return
      stats.completed++
      if (r.statusCode !== 200) stats.non2xx++
      stats.latUs.push(Number(process.hrtime.bigint() - t0) / 1000)
    },
    () => {
      inFlight--
      if (record) stats.errors++
    },
  )
}

/** Sends at `rate` for `secs`: every ~1 ms tick sends however many requests are due by now. */
function phase(secs, record) {
  return new Promise((resolve) => {
    const start = performance.now()
    const total = Math.round(rate * secs)
    let sent = 0
    const tick = () => {
      const elapsed = performance.now() - start
      const due = Math.min(total, Math.floor((elapsed * rate) / 1000))
      while (sent < due) {
        fire(record)
        sent++
      }
      if (sent >= total) {
        clearInterval(timer)
        resolve({ sent, ms: performance.now() - start })
      }
    }
    const timer = setInterval(tick, 1)
  })
}

const pct = (sorted, p) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null)

if (warmup > 0) await phase(warmup, false)
while (inFlight > 0) await new Promise((r) => setTimeout(r, 5))
process.stdout.write('START\n')
const { sent, ms } = await phase(seconds, true)
process.stdout.write('STOP\n')
const deadline = Date.now() + 5000
while (inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
const sorted = stats.latUs.sort((a, b) => a - b)
process.stdout.write(
  'RESULT ' +
    JSON.stringify({
      sent,
      windowMs: ms,
      completed: stats.completed,
      errors: stats.errors,
      non2xx: stats.non2xx,
      lost: sent - stats.completed - stats.errors,
      achievedRate: stats.completed / (ms / 1000),
      p50: pct(sorted, 50),
      p99: pct(sorted, 99),
    }) +
    '\n',
)
await pool.destroy()
process.exit(0)
