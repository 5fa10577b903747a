// The certificates the sidecar trusts for its own TLS clients (upstreams, the broker, an OAuth
// token_url, the audit collector), read and checked at start-up. A CA file that names nothing
// usable is refused there, naming the file: Node takes a `ca` it cannot parse without a word, and
// every call would then fail 502 with the cause hidden.
import { readFailure, readSettingText } from '../lib/bounded-read.js'
import { X509Certificate } from 'node:crypto'
import * as tls from 'node:tls'

export class CaFileProblem extends Error {
  constructor(
    message: string,
    /** The file is missing or unreadable here (not wrong): check-config only warns. */
    readonly unreadable: boolean,
  ) {
    super(message)
  }
}

const CERT_LABELS = new Set(['CERTIFICATE', 'TRUSTED CERTIFICATE'])
const PEM_BLOCK = /-----BEGIN ([^-\r\n]+)-----\r?\n([\s\S]*?)-----END ([^-\r\n]+)-----/g

/** Each PEM block in `text`: its label and the whole block. Text between blocks (a bundle's comments) is ignored. */
function pemBlocks(text: string): { label: string; endLabel: string; pem: string }[] {
  return [...text.matchAll(PEM_BLOCK)].map((m) => ({ label: m[1]!.trim(), endLabel: m[3]!.trim(), pem: m[0] }))
}

/**
 * The certificates of a PEM CA file, each parsed (node:crypto's X509Certificate), as PEM strings.
 * Throws CaFileProblem naming the file: unreadable, no certificate in it, a block that is not a
 * certificate (a private key), or a certificate that does not parse.
 */
export function readCaFile(path: string): string[] {
  let text: string
  try {
    text = readSettingText(path, 'latin1')
  } catch (err) {
    throw new CaFileProblem(`${path}: cannot read (${readFailure(err)})`, true)
  }
  const blocks = pemBlocks(text)
  const begun = text.split('-----BEGIN ').length - 1
  if (blocks.length === 0) throw new CaFileProblem(`${path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)`, false)
  if (begun !== blocks.length) throw new CaFileProblem(`${path}: holds a PEM block that does not end`, false)
  const certs: string[] = []
  blocks.forEach((b, i) => {
    // OpenSSL's TRUSTED CERTIFICATE (a certificate with trust settings) is taken by Node's `ca` too.
    if (!CERT_LABELS.has(b.label) || b.endLabel !== b.label) {
      // The label alone is named: it says what was put there (a key) without repeating any of it.
      throw new CaFileProblem(`${path}: block ${i + 1} is a ${/^[A-Z0-9 ]{1,40}$/.test(b.label) ? b.label : 'PEM block'}, not a CERTIFICATE (a CA file holds certificates only)`, false)
    }
    try {
      new X509Certificate(b.pem)
    } catch {
      throw new CaFileProblem(`${path}: certificate ${i + 1} cannot be parsed`, false)
    }
    certs.push(b.pem)
  })
  return certs
}

type GetCACertificates = (type?: 'default' | 'bundled' | 'system' | 'extra') => string[]

/**
 * What Node trusts when given no `ca`: its bundled roots and NODE_EXTRA_CA_CERTS (and the system
 * store under --use-system-ca). A `ca` option replaces that store, so a list that adds a CA file
 * must start from this. Node >= 22.15 / 23.5 says it (tls.getCACertificates('default')); on older
 * Node the extra file is read here as Node read it at start, which skips what it cannot load.
 */
export function defaultCaCertificates(env: NodeJS.ProcessEnv = process.env): string[] {
  const get = (tls as unknown as { getCACertificates?: GetCACertificates }).getCACertificates
  if (typeof get === 'function') return get('default')
  const extra: string[] = []
  const file = env.NODE_EXTRA_CA_CERTS
  if (file) {
    try {
      for (const b of pemBlocks(readSettingText(file, 'latin1'))) {
        if (b.label !== 'CERTIFICATE') continue
        try {
          new X509Certificate(b.pem)
          extra.push(b.pem)
        } catch {
          // Node skipped it too (and warned at start).
        }
      }
    } catch {
      // Node warned at start that it could not read the file, and went on without it.
    }
  }
  return [...tls.rootCertificates, ...extra]
}

/** Node's default trust plus the CA file's certificates: system roots stay. Throws CaFileProblem. */
export function trustWith(caFile: string): string[] {
  return [...defaultCaCertificates(), ...readCaFile(caFile)]
}
