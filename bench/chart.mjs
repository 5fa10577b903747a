// A dependency-free SVG chart of a bench run: one horizontal bar per contender in each panel
// (requests/s at 16 connections, added p50 at 1 connection, proxy CPU per request).
const COLORS = { direct: '#9e9e9e', latchkey: '#1565c0', 'undici-bare': '#6a1b9a', 'http-proxy': '#ef6c00', nginx: '#2e7d32', 'node-floor': '#bdbdbd' }
const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')

function panel(x, y0, width, title, rows, unit) {
  const max = Math.max(...rows.map((r) => Math.abs(r.value ?? 0)), 1)
  const barH = 22
  const labelW = 100
  const room = width - labelW - 110
  let svg = `<text x="${x}" y="${y0 + 16}" font-size="14" font-weight="bold">${esc(title)}</text>`
  rows.forEach((r, i) => {
    const y = y0 + 28 + i * (barH + 8)
    const v = r.value ?? 0
    const len = Math.max(1, (Math.max(0, v) / max) * room)
    svg += `<text x="${x}" y="${y + 16}" font-size="12">${esc(r.name)}</text>`
    svg += `<rect x="${x + labelW}" y="${y}" width="${len.toFixed(1)}" height="${barH}" fill="${COLORS[r.name] ?? '#555'}"/>`
    const label = r.value === null || r.value === undefined || Number.isNaN(r.value) ? '–' : `${Math.round(v).toLocaleString('en')} ${unit}`
    svg += `<text x="${x + labelW + len + 6}" y="${y + 16}" font-size="12">${esc(label)}</text>`
  })
  return { svg, height: 28 + rows.length * (barH + 8) + 16 }
}

export function renderChart(results, subtitle = '') {
  const proxies = results.filter((r) => r.name !== 'direct')
  const panels = [
    ['requests/s at 16 connections (higher is better)', results.map((r) => ({ name: r.name, value: r.rps16 })), 'req/s'],
    ['added p50 at 1 connection, split layout (lower is better)', proxies.map((r) => ({ name: r.name, value: r.addedP50 })), 'µs'],
    ['added p50 at 1 connection, same core (lower is better)', proxies.map((r) => ({ name: r.name, value: r.addedP50same })), 'µs'],
    ['proxy CPU per request at 16 connections (lower is better)', proxies.map((r) => ({ name: r.name, value: r.cpuUsPerReq })), 'µs'],
  ]
  const colW = 460
  let body = ''
  let colHeights = [40, 40]
  panels.forEach(([title, rows, unit], i) => {
    const col = i % 2
    const p = panel(10 + col * colW, colHeights[col], colW, title, rows, unit)
    body += p.svg
    colHeights[col] += p.height
  })
  const height = Math.max(...colHeights) + 10
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${colW * 2 + 20}" height="${height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="12" fill="#444">Latchkey bench · ${esc(subtitle)}</text>
${body}
</svg>
`
}
