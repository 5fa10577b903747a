// A listener's TLS files (a certificate, its key, and the CA that signs clients' certificates),
// read and checked at start-up: a missing file, one that is not PEM, or a key that is not the
// certificate's is said in one line naming the setting and the path (code LK_STARTUP), not as an
// OpenSSL error code (`error:0480006C:PEM routines::no start line`) with a stack trace. The same
// checks serve `check-config`, which reads the files without listening.
import { MAX_SETTING_FILE_BYTES, readFailure, readFileBounded } from './bounded-read.js'
import { createSecureContext } from 'node:tls'
import { readCaFile, CaFileProblem } from '../proxy/tls-trust.js'

export interface TlsFileSettings {
  cert_file: string
  key_file: string
  client_ca_file?: string | undefined
}

export interface TlsFileProblem {
  /** The setting, e.g. `broker.listen.tls.cert_file`. */
  path: string
  /** `<file>: <problem>`. */
  message: string
  /** Missing or unreadable here, rather than wrong (check-config only warns). */
  unreadable: boolean
}

export interface ServerTls {
  cert: Buffer
  key: Buffer
  clientCa: Buffer | null
}

/** OpenSSL's reason without its code: `error:0480006C:PEM routines::no start line` → `no start line`. */
function reason(err: unknown): string {
  const message = (err as Error).message ?? String(err)
  return (message.split('::').pop() ?? message).split('\n')[0]!.trim()
}

/** The files read and checked: the buffers, or every problem found, each naming its setting. */
export function checkServerTls(prefix: string, t: TlsFileSettings): { tls: ServerTls } | { problems: TlsFileProblem[] } {
  const problems: TlsFileProblem[] = []
  const read = (key: string, path: string): Buffer | null => {
    try {
      return readFileBounded(path, MAX_SETTING_FILE_BYTES)
    } catch (err) {
      problems.push({ path: `${prefix}.${key}`, message: `${path}: cannot read (${readFailure(err)})`, unreadable: true })
      return null
    }
  }
  const cert = read('cert_file', t.cert_file)
  const key = read('key_file', t.key_file)
  let clientCa: Buffer | null = null
  if (t.client_ca_file !== undefined) {
    try {
      clientCa = Buffer.from(readCaFile(t.client_ca_file).join('\n'))
    } catch (err) {
      if (!(err instanceof CaFileProblem)) throw err
      problems.push({ path: `${prefix}.client_ca_file`, message: err.message, unreadable: err.unreadable })
    }
  }
  let certOk = false
  let keyOk = false
  if (cert) {
    try {
      createSecureContext({ cert })
      certOk = true
    } catch (err) {
      problems.push({ path: `${prefix}.cert_file`, message: `${t.cert_file}: not a usable PEM certificate (${reason(err)})`, unreadable: false })
    }
  }
  if (key) {
    try {
      createSecureContext({ key })
      keyOk = true
    } catch (err) {
      problems.push({ path: `${prefix}.key_file`, message: `${t.key_file}: not a usable PEM private key (${reason(err)})`, unreadable: false })
    }
  }
  if (cert && key && certOk && keyOk) {
    try {
      createSecureContext({ cert, key })
    } catch (err) {
      problems.push({ path: prefix, message: `${t.key_file} is not the key of ${t.cert_file} (${reason(err)})`, unreadable: false })
    }
  }
  if (problems.length > 0 || !cert || !key) return { problems }
  return { tls: { cert, key, clientCa } }
}

/** The files read and checked, or an LK_STARTUP error naming the setting, the file and the problem. */
export function readServerTls(prefix: string, t: TlsFileSettings): ServerTls {
  const r = checkServerTls(prefix, t)
  if ('tls' in r) return r.tls
  throw Object.assign(new Error(r.problems.map((p) => `${p.path} ${p.message}`).join('\n')), { code: 'LK_STARTUP' })
}
