// The answer of a server a CLI command was pointed at (`latchkey revoke --broker`, `latchkey audit
// --url`), read as JSON with a cap: at a mistyped address another service can send without end
// (1.4 GB in 30 s, 2.5 GB in 20 s), or a page that is no JSON object at all.

/**
 * The body as a JSON object, reading at most `max` bytes: 'too large' past it (leaving the loop
 * cancels the rest, for node streams and web streams alike), undefined when it is not a JSON
 * object. A read that fails (the connection cut, a timeout) throws.
 */
export async function readJsonObject(body: AsyncIterable<Uint8Array>, max: number): Promise<Record<string, unknown> | undefined | 'too large'> {
  const chunks: Uint8Array[] = []
  let total = 0
  for await (const chunk of body) {
    total += chunk.length
    if (total > max) return 'too large'
    chunks.push(chunk)
  }
  try {
    const v: unknown = JSON.parse(Buffer.concat(chunks, total).toString('utf8'))
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined
  } catch {
    return undefined
  }
}
