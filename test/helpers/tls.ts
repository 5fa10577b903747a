// A throw-away CA and a leaf for localhost/127.0.0.1, made with the real openssl, so upstream
// TLS is verified for real in tests (no rejectUnauthorized:false anywhere).
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export interface TestPki {
  dir: string
  caFile: string
  ca: string
  key: string
  cert: string
  /** Another leaf for localhost signed by this CA, with these openssl x509v3 extension lines (no SAN unless they give one). */
  leaf(extensions: string): { key: string; cert: string }
}

const cache = new Map<string, TestPki>()
let leaves = 0

/** The test PKI; `name` gives another, independent CA (and its own leaf). */
export function testPki(name = 'latchkey test CA'): TestPki {
  const cached = cache.get(name)
  if (cached) return cached
  const dir = mkdtempSync(join(tmpdir(), 'lk-pki-'))
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', `/CN=${name}`)
  const leaf = (base: string, extensions: string) => {
    run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${base}.key`, '-out', `${base}.csr`, '-subj', '/CN=localhost')
    writeFileSync(join(dir, `${base}.ext`), extensions)
    run('x509', '-req', '-in', `${base}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${base}.pem`, '-days', '2', '-extfile', `${base}.ext`)
    return { key: readFileSync(join(dir, `${base}.key`), 'utf8'), cert: readFileSync(join(dir, `${base}.pem`), 'utf8') }
  }
  const main = leaf('leaf', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n')
  const pki: TestPki = {
    dir,
    caFile: join(dir, 'ca.pem'),
    ca: readFileSync(join(dir, 'ca.pem'), 'utf8'),
    ...main,
    leaf: (extensions) => leaf(`leaf${++leaves}`, extensions),
  }
  cache.set(name, pki)
  return pki
}
