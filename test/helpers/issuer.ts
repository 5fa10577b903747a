// A token issuer for tests: a real key pair, its JWK set (as a file and over HTTP), and signed
// tokens with any claims, plus the classic forgeries (alg none, HS256 keyed with the public key,
// a foreign key under a known kid) built by hand as an attacker would.
import { createHmac, KeyObject, randomUUID, sign as signBytes } from 'node:crypto'
import { createServer, type Server } from 'node:http'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { calculateJwkThumbprint, exportJWK, generateKeyPair, SignJWT, type CryptoKey, type JWK, type JWTPayload } from 'jose'

export class TestIssuer {
  private constructor(
    readonly issuer: string,
    readonly kid: string,
    readonly alg: string,
    private readonly privateKey: CryptoKey,
    readonly publicJwk: JWK,
    readonly jwksFile: string,
  ) {}

  static async create(issuer: string, alg: 'ES256' | 'RS256' | 'EdDSA' = 'ES256'): Promise<TestIssuer> {
    const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true })
    const pub = await exportJWK(publicKey)
    const kid = await calculateJwkThumbprint(pub)
    const jwk = { ...pub, kid, alg, use: 'sig' }
    const dir = mkdtempSync(join(tmpdir(), 'lk-issuer-'))
    const jwksFile = join(dir, 'jwks.json')
    writeFileSync(jwksFile, JSON.stringify({ keys: [jwk] }))
    return new TestIssuer(issuer, kid, alg, privateKey, jwk, jwksFile)
  }

  get jwks(): { keys: JWK[] } {
    return { keys: [this.publicJwk] }
  }

  /** Signs claims; `iss`, `iat`, `exp` (+300 s) and `jti` are filled unless given (null removes). */
  sign(claims: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
    const now = Math.floor(Date.now() / 1000)
    const body: Record<string, unknown> = { iss: this.issuer, iat: now, exp: now + 300, jti: randomUUID(), ...claims }
    for (const [k, v] of Object.entries(body)) if (v === null) delete body[k]
    return new SignJWT(body as JWTPayload).setProtectedHeader({ alg: this.alg, kid: this.kid, typ: 'JWT', ...header }).sign(this.privateKey)
  }

  /** Genuinely signed, from header and claims as JSON text (a member named twice, a byte order mark: what SignJWT cannot write). */
  signRaw(header: string, claims: string): string {
    return signRawJws(header, claims, this.privateKey, this.alg)
  }

  /** The usual claims (iss, iat, exp +300 s, jti) and these, as JSON text to splice into. */
  claimsText(claims: Record<string, unknown>): string {
    const now = Math.floor(Date.now() / 1000)
    return JSON.stringify({ iss: this.issuer, iat: now, exp: now + 300, jti: randomUUID(), ...claims })
  }

  /** The usual header, as JSON text. */
  get headerText(): string {
    return JSON.stringify({ alg: this.alg, kid: this.kid, typ: 'JWT' })
  }

  /** An unsigned token, `alg: none`. */
  unsigned(claims: Record<string, unknown>): string {
    const now = Math.floor(Date.now() / 1000)
    return `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ iss: this.issuer, iat: now, exp: now + 300, jti: randomUUID(), ...claims })}.`
  }

  /** Algorithm confusion: HS256 with the issuer's public key (JWK JSON, as a naive verifier would use) as the HMAC secret. */
  hs256WithPublicKey(claims: Record<string, unknown>): string {
    const now = Math.floor(Date.now() / 1000)
    const input = `${b64({ alg: 'HS256', kid: this.kid, typ: 'JWT' })}.${b64({ iss: this.issuer, iat: now, exp: now + 300, jti: randomUUID(), ...claims })}`
    const sig = createHmac('sha256', JSON.stringify(this.publicJwk)).update(input).digest('base64url')
    return `${input}.${sig}`
  }

  /** Serves the JWK set over HTTP, as a cluster or IdP would. */
  async serve(): Promise<{ url: string; server: Server; hits: () => number }> {
    let hits = 0
    const server = createServer((_req, res) => {
      hits++
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify(this.jwks))
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks`, server, hits: () => hits }
  }
}

/** A compact JWS over header and claims exactly as given (JSON text, any bytes), signed with an ES256, RS256 or EdDSA key. */
export function signRawJws(header: string, claims: string, privateKey: CryptoKey, alg: string): string {
  const input = `${Buffer.from(header).toString('base64url')}.${Buffer.from(claims).toString('base64url')}`
  const key = KeyObject.from(privateKey)
  const sig = alg === 'ES256' ? signBytes('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' }) : signBytes(alg === 'RS256' ? 'sha256' : null, Buffer.from(input), key)
  return `${input}.${sig.toString('base64url')}`
}

function b64(o: unknown): string {
  return Buffer.from(JSON.stringify(o)).toString('base64url')
}
