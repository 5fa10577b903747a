// application/x-www-form-urlencoded request bodies for the OAuth endpoints: size-capped while
// reading, every parameter at most once (RFC 6749 §3.2), so a second `scope` or `subject_token`
// cannot change what was checked.
import type { IncomingMessage } from 'node:http'
import { OAuthError } from '../oauth-error.js'

/** Parameters that RFC 8693 allows to repeat. */
const MULTI = new Set(['audience', 'resource'])
/** The parameters of the token (RFC 8693, ours) and introspection (RFC 7662) endpoints: the names a refusal may quote. */
const KNOWN = new Set(['grant_type', 'subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'scope', 'task_id', 'task_duration', 'token', 'token_type_hint', 'client_id', 'client_secret'])

export interface Form {
  one(name: string): string | undefined
  all(name: string): string[]
}

export class BodyTooLarge extends Error {}

export function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declared = req.headers['content-length']
    if (declared !== undefined && Number(declared) > limit) {
      req.resume()
      reject(new BodyTooLarge())
      return
    }
    const chunks: Buffer[] = []
    let size = 0
    req.on('data', (chunk: Buffer) => {
      size += chunk.length
      if (size > limit) {
        req.removeAllListeners('data')
        req.resume()
        reject(new BodyTooLarge())
        return
      }
      chunks.push(chunk)
    })
    req.on('end', () => resolve(Buffer.concat(chunks, size)))
    req.on('error', reject)
  })
}

export function parseForm(req: IncomingMessage, body: Buffer): Form {
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase()
  if (type !== 'application/x-www-form-urlencoded') {
    throw new OAuthError('invalid_request', 'the request body must be application/x-www-form-urlencoded')
  }
  // RFC 6749 §3.2: the parameters are the body's. One sent in the query was never read: a `scope`
  // there, meant to narrow the token, was dropped and a broader one issued. Not quoted: it may be a token.
  const query = (req.url ?? '').indexOf('?')
  if (query !== -1 && query < (req.url ?? '').length - 1) {
    throw new OAuthError('invalid_request', 'parameters go in the request body (application/x-www-form-urlencoded), not in the URL query, which is not read')
  }
  const text = body.toString('utf8')
  if (text.includes('\uFFFD')) throw new OAuthError('invalid_request', 'the request body is not valid UTF-8')
  const seen = new Map<string, string[]>()
  for (const pair of text.split('&')) {
    if (pair === '') continue
    // Parsed as URLSearchParams does, but strictly: it keeps a malformed escape (`%zz`) as text and
    // reads percent-encoded bytes that are not UTF-8 (`%FF`, overlong `%C0%AF`, a lone surrogate's
    // `%ED%A0%80`) as U+FFFD, so a value nobody sent was checked and refused for the wrong reason.
    const eq = pair.indexOf('=')
    const key = decodeFormPart(eq === -1 ? pair : pair.slice(0, eq))
    const value = decodeFormPart(eq === -1 ? '' : pair.slice(eq + 1))
    if (key === undefined) throw new OAuthError('invalid_request', 'a parameter name is not valid percent-encoded UTF-8 (not repeated: it may be a token)')
    if (value === undefined) {
      throw new OAuthError('invalid_request', KNOWN.has(key) || MULTI.has(key) ? `parameter "${key}" is not valid percent-encoded UTF-8` : 'a parameter is not valid percent-encoded UTF-8 (its name is not repeated: it may be a token)')
    }
    const list = seen.get(key)
    if (list) {
      if (!MULTI.has(key)) {
        // Named only when it is a parameter these endpoints read: a name is whatever precedes "=",
        // and a client that posted a bare token twice (`curl -d "$TOKEN" -d "$TOKEN"`) sent it as one.
        throw new OAuthError('invalid_request', KNOWN.has(key) ? `parameter "${key}" is repeated` : 'a parameter is repeated (its name is not repeated: it may be a token)')
      }
      list.push(value)
    } else seen.set(key, [value])
  }
  return {
    one: (name) => seen.get(name)?.[0],
    all: (name) => seen.get(name) ?? [],
  }
}

/** One name or value of a form body, `+` a space, percent-decoded; undefined when an escape is malformed or the bytes are not UTF-8. */
function decodeFormPart(raw: string): string | undefined {
  try {
    return decodeURIComponent(raw.replace(/\+/g, ' '))
  } catch {
    return undefined
  }
}
