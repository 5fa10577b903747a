// A dependency-free SVG chart of a bench run: requests/s at 16 connections and added p50
// latency at 1 connection, one bar per contender.
const COLORS = { direct: '#9e9e9e', 'node-floor': '#bdbdbd', latchkey: '#1565c0', 'undici-bare': '#6a1b9a', 'http-proxy': '#ef6c00', nginx: '#2e7d32' }

function panel(x, title, rows, unit) {
  const max = Math.max(...rows.map((r) => r.value), 1)
  const w = 420
  const barH = 26
  let svg = `<text x="${x}" y="24" font-size="15" font-weight="bold">${title}</text>`
  rows.forEach((r, i) => {
    const y = 40 + i * (barH + 10)
    const len = Math.max(1, (r.value / max) * (w - 170))
    svg += `<text x="${x}" y="${y + 18}" font-size="13">${r.name}</text>`
    svg += `<rect x="${x + 95}" y="${y}" width="${len.toFixed(1)}" height="${barH}" fill="${COLORS[r.name] ?? '#555'}"/>`
    svg += `<text x="${x + 100 + len}" y="${y + 18}" font-size="12">${Math.round(r.value).toLocaleString('en')} ${unit}</text>`
  })
  return svg
}

export function renderChart(results) {
  const height = 60 + results.length * 36
  const rps = results.map((r) => ({ name: r.name, value: r.rps16 ?? 0 }))
  const added = results.filter((r) => r.addedP50 !== null).map((r) => ({ name: r.name, value: Math.max(0, r.addedP50) }))
  return `<svg xmlns="http://www.w3.org/2000/svg" width="900" height="${height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
${panel(10, 'req/s at 16 connections (higher is better)', rps, 'req/s')}
${panel(470, 'added p50 at 1 connection (lower is better)', added, 'µs')}
</svg>
`
}
