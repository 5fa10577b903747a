// A body through a fresh BodyScrubber, pushed in parts as reads would bring it: what the agent
// gets, and how many copies were counted. For the tables that cut bodies every way.
import { BodyScrubber, type BodyNeedles } from '../../proxy/forward/body-scrub.js'

export function scrubParts(needles: BodyNeedles, parts: readonly string[]): { out: string; found: number } {
  const s = new BodyScrubber(needles)
  const out: Buffer[] = []
  for (const p of parts) {
    if (p.length === 0) continue
    const o = s.push(Buffer.from(p))
    if (o) out.push(o)
  }
  const rest = s.end()
  if (rest) out.push(rest)
  return { out: Buffer.concat(out).toString(), found: s.found }
}
