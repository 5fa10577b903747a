// Whether text an agent writes to be shown (a task's purpose: logged, listed by GET /v1/tasks,
// answered back) holds something shaped as a credential the sidecar cannot know: a JWT, an API
// key, a signature. The sidecar's own secrets are found by value (forward/scrub.ts revealsSecret);
// these by shape, as a person would say "that is a key": a JWT's header, or a long run of
// base64 characters with upper and lower case mixed as random text mixes them. Hex (commit
// hashes, digests) and UUIDs (task IDs) are one case and pass; so do identifiers written in camel
// case, whose letters stay in one case for a word at a time.

/** A JWS or JWE: its header is base64url of `{"`, followed by a dot. */
const JWT_HEADER = /(?:^|[^A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.(?:[A-Za-z0-9_-]|$)/
/** A run of base64 / base64url characters long enough to hold 96 random bits. */
const RUN = /[A-Za-z0-9_+/=-]{20,}/g
/**
 * Camel-case words keep most of their letters in runs of one case, three or more long (0.7 to 0.85
 * of them); random base64 about a third. At 0.65 an ES256 signature (86 characters) is missed
 * about once in 10,000, 22 characters (128 bits) about twice in 100; no identifier tried was taken.
 */
const MAX_IN_RUNS = 0.65

function kind(code: number): number {
  if (code >= 48 && code <= 57) return 1
  if (code >= 65 && code <= 90) return 2
  if (code >= 97 && code <= 122) return 3
  return 0
}

/** Upper and lower case mixed, and few runs of one case: how random text reads, and words do not. */
function randomLooking(run: string): boolean {
  let seen = 0
  let chars = 0
  let inRuns = 0
  let runKind = 0
  let runLength = 0
  for (let i = 0; i <= run.length; i++) {
    const k = i < run.length ? kind(run.charCodeAt(i)) : 0
    if (k !== runKind || k === 0) {
      if (runKind !== 0 && runLength >= 3) inRuns += runLength
      runKind = k
      runLength = 0
    }
    if (k === 0) continue
    seen |= 1 << k
    chars++
    runLength++
  }
  return (seen & 0b1100) === 0b1100 && chars >= 16 && inRuns / chars < MAX_IN_RUNS
}

/** Whether `text`, as written or percent-decoded once, holds a JWT or a run of characters shaped as a random key. */
export function holdsTokenShaped(text: string): boolean {
  if (shaped(text)) return true
  if (!text.includes('%')) return false
  try {
    return shaped(decodeURIComponent(text))
  } catch {
    return false
  }
}

function shaped(text: string): boolean {
  if (JWT_HEADER.test(text)) return true
  for (const m of text.matchAll(RUN)) if (randomLooking(m[0])) return true
  return false
}
