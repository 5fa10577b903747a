// The spellings a sloppy server echoes a secret it was sent in (an authorization server's or a
// broker's error_description, a scope it grants): each turns the secret into text that need not
// hold it plainly. Tests echo each back and look for that exact text in everything the sidecar
// wrote, so a spelling the sidecar fails to recognise shows up as quoted.

const pct = (s: string) => [...Buffer.from(s)].map((b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join('')

/** name → how the secret is spelled (the text the server puts in its answer, as parsed JSON). */
export const SPELLINGS: Record<string, (secret: string) => string> = {
  plain: (s) => s,
  'form-encoded': (s) => new URLSearchParams({ x: s }).toString().slice(2),
  'percent-encoded': pct,
  'percent-encoded twice': (s) => pct(pct(s)),
  'percent-encoded three times': (s) => pct(pct(pct(s))),
  'JSON \\u escapes': (s) => [...s].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join(''),
  'HTML references': (s) => [...s].map((c) => `&#x${c.codePointAt(0)!.toString(16)};`).join(''),
  'HTML decimal, escaped once more': (s) => [...s].map((c, i) => (i % 3 === 0 ? `&amp;#${c.codePointAt(0)};` : c)).join(''),
  base64: (s) => Buffer.from(s).toString('base64'),
  'base64url inside other text': (s) => Buffer.from(`token=${s}`).toString('base64url'),
  hex: (s) => Buffer.from(s).toString('hex'),
}

/** Whether `output` (a body, a log line, the audit file) holds `quoted`: as is, or JSON-escaped once or twice on its way in. */
export function holds(output: string, quoted: string): boolean {
  const once = JSON.stringify(quoted).slice(1, -1)
  return output.includes(quoted) || output.includes(once) || output.includes(JSON.stringify(once).slice(1, -1))
}
