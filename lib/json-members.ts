// JSON texts read strictly: a member named twice in one object is taken by JSON.parse as its last
// value, while another reader (Go's encoding/json takes the last too, others the first or refuse)
// may take another, so a text that could be read two ways is refused where it matters (signed
// tokens, the task API, the broker's revocations).
import { STRICT_UTF8 } from './strict-utf8.js'

/**
 * The first member name that appears twice in one object of a JSON text, compared unescaped
 * (`"sub"` and `"\u0073ub"` are one name). The text is valid JSON (parsed already): strings are
 * read whole, so braces inside them are not structure.
 */
export function memberNamedTwice(json: string): string | undefined {
  const objects: (Set<string> | undefined)[] = []
  const token = /"(?:[^"\\]|\\.)*"|[{}[\]]/g
  for (let m = token.exec(json); m !== null; m = token.exec(json)) {
    const t = m[0]
    if (t === '{') objects.push(new Set())
    else if (t === '[') objects.push(undefined)
    else if (t === '}' || t === ']') objects.pop()
    else {
      const names = objects[objects.length - 1]
      if (!names) continue
      let i = token.lastIndex
      while (json[i] === ' ' || json[i] === '\t' || json[i] === '\n' || json[i] === '\r') i++
      if (json[i] !== ':') continue
      const name = JSON.parse(t) as string
      if (names.has(name)) return name
      names.add(name)
    }
  }
  return undefined
}

/**
 * A member name as an error may show it, else 'a member' (not repeated: it may be a token): with
 * `known`, quoted only when it is one of them; without, when it reads as a claim name.
 */
export function shownMemberName(name: string, known?: ReadonlySet<string>): string {
  const shown = known ? known.has(name) : /^[A-Za-z0-9_.:-]{1,64}$/.test(name)
  return shown ? `"${name}"` : 'a member'
}

/**
 * A request body read as one JSON text, or what is wrong with it, said as a refusal says it: not
 * UTF-8 (RFC 8259 §8.1; a byte order mark is kept, and is not JSON), not JSON, or a member named
 * twice in one object, which JSON.parse takes the last of while the sender may have meant the
 * first (`fields`: the names such an error may quote).
 */
export function parseJsonBody(body: Uint8Array, fields: ReadonlySet<string>): { value: unknown } | { problem: string } {
  let text: string
  try {
    text = STRICT_UTF8.decode(body)
  } catch {
    return { problem: 'body is not valid UTF-8' }
  }
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch {
    return { problem: 'body is not JSON' }
  }
  const twice = memberNamedTwice(text)
  return twice === undefined ? { value } : { problem: `body names ${shownMemberName(twice, fields)} twice (which one counts is ambiguous)` }
}
