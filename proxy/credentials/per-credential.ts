// Values derived from a credential (its header form, its URL-encoded form, its hash), computed
// once per credential object: a token serves many calls, and the cache entry goes with the token.
import type { Credential } from '../context.js'

export function perCredential<T>(derive: (c: Credential) => T): (c: Credential) => T {
  const cache = new WeakMap<Credential, T>()
  return (c) => {
    let v = cache.get(c)
    if (v === undefined) cache.set(c, (v = derive(c)))
    return v
  }
}
