// Keys for the local attestor: `latchkey up` makes one ES256 key per installation; the broker
// trusts its public half (a JWK set file), the sidecar signs single-use attestations with the
// private half. Kept in a 0700 directory; the private file is 0600.
import { randomUUID } from 'node:crypto'
import { chmodSync, existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { calculateJwkThumbprint, exportJWK, generateKeyPair, importJWK, SignJWT, type CryptoKey, type JWK } from 'jose'
import { readSettingText } from './bounded-read.js'


/** `iss` of local attestations; the broker's local verifier expects exactly this. */
export const LOCAL_ISSUER = 'latchkey-local'

export interface LocalAttestorKey {
  kid: string
  privateKey: CryptoKey
  /** The JWK set file the broker's `attestors.local.keys_file` points at. */
  jwksFile: string
}

/**
 * The private JWK in `file`, or an LK_STARTUP error that names the file and never quotes it: V8's
 * JSON.parse message for a stray character quotes the text around it (`..."d":xAbCdEfGh"...`),
 * which `latchkey up` printed, with a stack, to stderr.
 */
function readPrivateJwk(file: string): JWK {
  const text = readSettingText(file)
  try {
    return JSON.parse(text) as JWK
  } catch {
    throw Object.assign(new Error(`${file}: the local attestor's private key is not JSON (its text is not repeated: it holds the key); move it away and a new key is made`), { code: 'LK_STARTUP' })
  }
}

/** Loads the private key a sidecar signs with (the file `ensureLocalAttestorKey` wrote). */
export async function loadLocalAttestorKey(file: string): Promise<{ kid: string; privateKey: CryptoKey }> {
  const jwk = readPrivateJwk(file)
  if (!jwk.d || !jwk.kid) throw new Error(`${file}: not a private JWK with a kid`)
  return { kid: jwk.kid, privateKey: (await importJWK(jwk, 'ES256')) as CryptoKey }
}

export async function ensureLocalAttestorKey(dir: string): Promise<LocalAttestorKey> {
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  chmodSync(dir, 0o700)
  const privFile = join(dir, 'local-attestor.key.json')
  const jwksFile = join(dir, 'local-attestor.jwks.json')
  let jwk: JWK
  if (existsSync(privFile)) jwk = readPrivateJwk(privFile)
  else {
    const { privateKey } = await generateKeyPair('ES256', { extractable: true })
    jwk = await exportJWK(privateKey)
    jwk.kid = await calculateJwkThumbprint(jwk)
    writeFileSync(privFile, JSON.stringify(jwk), { mode: 0o600 })
  }
  const { d: _d, ...pub } = jwk
  writeFileSync(jwksFile, JSON.stringify({ keys: [{ ...pub, alg: 'ES256', use: 'sig' }] }))
  return { kid: jwk.kid!, privateKey: (await importJWK(jwk, 'ES256')) as CryptoKey, jwksFile }
}

/** One single-use attestation: sub = the instance, aud = the broker, 60 s of life. */
export function signLocalAttestation(key: { kid: string; privateKey: CryptoKey }, instanceId: string, brokerAudience: string, lifetimeS = 60): Promise<string> {
  return new SignJWT({})
    .setProtectedHeader({ alg: 'ES256', kid: key.kid, typ: 'JWT' })
    .setIssuer(LOCAL_ISSUER)
    .setSubject(instanceId)
    .setAudience(brokerAudience)
    .setIssuedAt()
    .setExpirationTime(`${lifetimeS}s`)
    .setJti(randomUUID())
    .sign(key.privateKey)
}
