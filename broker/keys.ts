// The broker's signing keys. One active key signs; keys it replaced stay published in the JWKS
// until every token they signed has expired (superseded_at + the longest lifetime any agent may
// get + skew), then are dropped. Keys live in a 0700 directory, one 0600 file each, so a restart
// keeps verifying what was issued before it.
import { chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync, renameSync } from 'node:fs'
import { join } from 'node:path'
import { calculateJwkThumbprint, createLocalJWKSet, type JWTVerifyGetKey, exportJWK, generateKeyPair, importJWK, SignJWT, type CryptoKey, type JWK, type JWTPayload } from 'jose'
import { MAX_SKEW_S } from './jwt.js'

export type SigningAlg = 'ES256' | 'EdDSA'

interface StoredKey {
  kid: string
  alg: SigningAlg
  created_at: number
  superseded_at?: number
  jwk: JWK
}

interface LoadedKey extends StoredKey {
  privateKey: CryptoKey
  publicJwk: JWK
}

export class KeyRing {
  private keys: LoadedKey[] = []
  private timer: NodeJS.Timeout | undefined
  private localSet: JWTVerifyGetKey | undefined

  private constructor(
    private readonly dir: string,
    private readonly alg: SigningAlg,
    private readonly rotateAfterS: number,
    /** The longest lifetime any token may have: how long a superseded key stays published. */
    private readonly maxLifetimeS: () => number,
    private readonly now: () => number,
  ) {}

  static async open(opts: { dir: string; alg: SigningAlg; rotateAfterS: number; maxLifetimeS: () => number; now?: () => number }): Promise<KeyRing> {
    const ring = new KeyRing(opts.dir, opts.alg, opts.rotateAfterS, opts.maxLifetimeS, opts.now ?? Date.now)
    mkdirSync(opts.dir, { recursive: true, mode: 0o700 })
    chmodSync(opts.dir, 0o700)
    for (const name of readdirSync(opts.dir)) {
      if (!name.endsWith('.json')) continue
      const stored = JSON.parse(readFileSync(join(opts.dir, name), 'utf8')) as StoredKey
      ring.keys.push(await load(stored))
    }
    ring.keys.sort((a, b) => a.created_at - b.created_at)
    await ring.maintain()
    return ring
  }

  private nowS(): number {
    return Math.floor(this.now() / 1000)
  }

  get active(): LoadedKey {
    return this.keys[this.keys.length - 1]!
  }

  /** Rotates when the active key is older than rotate_after_s; drops keys nobody can need. */
  async maintain(): Promise<void> {
    const now = this.nowS()
    if (this.keys.length === 0 || now - this.active.created_at >= this.rotateAfterS) await this.rotate()
    const keepFor = this.maxLifetimeS() + MAX_SKEW_S
    for (const k of this.keys.slice(0, -1)) {
      if (k.superseded_at !== undefined && now > k.superseded_at + keepFor) {
        rmSync(join(this.dir, `${k.kid}.json`), { force: true })
        this.keys = this.keys.filter((x) => x !== k)
        this.localSet = undefined
      }
    }
  }

  async rotate(): Promise<string> {
    const now = this.nowS()
    const { privateKey } = await generateKeyPair(this.alg, { extractable: true })
    const jwk = await exportJWK(privateKey)
    const kid = await calculateJwkThumbprint(jwk)
    const previous = this.keys.length > 0 ? this.active : undefined
    const stored: StoredKey = { kid, alg: this.alg, created_at: now, jwk }
    this.write(stored)
    if (previous) {
      previous.superseded_at = now
      this.write(previous)
    }
    this.keys.push(await load(stored))
    this.localSet = undefined
    return kid
  }

  private write(k: StoredKey): void {
    const file = join(this.dir, `${k.kid}.json`)
    const tmp = `${file}.tmp`
    const body: StoredKey = { kid: k.kid, alg: k.alg, created_at: k.created_at, jwk: k.jwk }
    if (k.superseded_at !== undefined) body.superseded_at = k.superseded_at
    writeFileSync(tmp, JSON.stringify(body), { mode: 0o600 })
    renameSync(tmp, file)
  }

  /** Checks rotation once a minute, off the request path. */
  start(): void {
    this.timer = setInterval(() => void this.maintain().catch(() => {}), 60_000)
    this.timer.unref()
  }

  stop(): void {
    clearInterval(this.timer)
  }

  jwks(): { keys: JWK[] } {
    return { keys: this.keys.map((k) => k.publicJwk) }
  }

  /** Verifies tokens this broker signed (introspection, delegated subject tokens). */
  get verifier(): JWTVerifyGetKey {
    if (!this.localSet) this.localSet = createLocalJWKSet(this.jwks())
    return this.localSet
  }

  async sign(claims: JWTPayload, typ: string): Promise<string> {
    const k = this.active
    return new SignJWT(claims).setProtectedHeader({ alg: k.alg, kid: k.kid, typ }).sign(k.privateKey)
  }
}

async function load(stored: StoredKey): Promise<LoadedKey> {
  const privateKey = (await importJWK(stored.jwk, stored.alg)) as CryptoKey
  const { d: _d, ...pub } = stored.jwk
  return { ...stored, privateKey, publicJwk: { ...pub, kid: stored.kid, alg: stored.alg, use: 'sig' } }
}
