// The broker's signing keys. One key signs at a time. Its successor is published in the JWKS at
// least the JWKS's max-age before it signs, so a resource server honouring the cache already
// holds it when the first token it signed arrives. A key that no longer signs stays published
// until the latest exp of any token it signed (+ skew), a bound recorded in its own file before
// such a token is handed out, so neither a registry that lowers max_lifetime_s nor a restart can
// drop a key a live token needs. Keys live in a 0700 directory, one 0600 file each.
import { chmodSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync, renameSync } from 'node:fs'
import { join } from 'node:path'
import { calculateJwkThumbprint, createLocalJWKSet, type JWTVerifyGetKey, exportJWK, generateKeyPair, importJWK, SignJWT, type CryptoKey, type JWK, type JWTPayload } from 'jose'
import { MAX_SKEW_S } from './jwt.js'
import { MAX_LIFETIME_S } from './registry.js'
import { readFailure, readSettingText } from '../lib/bounded-read.js'

export type SigningAlg = 'ES256' | 'EdDSA'
const ALGS: readonly string[] = ['ES256', 'EdDSA']

/** The JWKS's Cache-Control max-age: how long a resource server may go on using a set it fetched. */
export const JWKS_MAX_AGE_S = 60
/** How often maintain() runs. The next key is made this much earlier still, so a tick that comes late does not delay rotation. */
export const MAINTAIN_EVERY_S = 60
/**
 * The recorded bound on a key's tokens is raised in steps this long past the exp that needed it:
 * one small file write per key every few minutes, not one per token.
 */
export const SIGNED_UNTIL_STEP_S = 300

interface StoredKey {
  kid: string
  alg: SigningAlg
  /** When it was made and published. */
  created_at: number
  /** When it starts signing (absent in files written before keys were published ahead: created_at). */
  active_from?: number
  /** No token it signed expires later; written before such a token is returned. */
  signed_until?: number
  /** Written by versions before signed_until; read only to bound such a key's tokens. */
  superseded_at?: number
  jwk: JWK
}

interface LoadedKey {
  kid: string
  alg: SigningAlg
  created_at: number
  active_from: number
  /** As recorded in the key's file. */
  signed_until: number | undefined
  /** The latest exp it may have signed: the recorded bound at start, then each exp signed here, exactly. */
  latest_exp: number | undefined
  jwk: JWK
  privateKey: CryptoKey
  publicJwk: JWK
}

/** A key file the broker cannot use. Code LK_STARTUP: the CLI prints the message, not a stack. */
export class KeyDirError extends Error {
  readonly code = 'LK_STARTUP'
}

export class KeyRing {
  private keys: LoadedKey[] = []
  private timer: NodeJS.Timeout | undefined
  private localSet: JWTVerifyGetKey | undefined

  private constructor(
    private readonly dir: string,
    private readonly alg: SigningAlg,
    private readonly rotateAfterS: number,
    private readonly now: () => number,
  ) {}

  static async open(opts: { dir: string; alg: SigningAlg; rotateAfterS: number; now?: () => number }): Promise<KeyRing> {
    const ring = new KeyRing(opts.dir, opts.alg, opts.rotateAfterS, opts.now ?? Date.now)
    let names: string[]
    try {
      mkdirSync(opts.dir, { recursive: true, mode: 0o700 })
      chmodSync(opts.dir, 0o700)
      names = readdirSync(opts.dir)
    } catch (err) {
      throw new KeyDirError(`broker.keys.dir: cannot use ${opts.dir} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
    }
    const nowS = ring.nowS()
    for (const name of names) {
      if (!name.endsWith('.json')) continue
      const key = await readKey(join(opts.dir, name), name)
      ring.keys.push(key)
      // A file from before signed_until was recorded: its tokens live at most MAX_LIFETIME_S past
      // the moment it stopped signing (or now, for the key that still signs). Recorded once.
      if (key.legacy) {
        key.signed_until = key.latest_exp = Math.max(key.signed_until ?? 0, (key.superseded ?? nowS) + MAX_LIFETIME_S)
        ring.write(key)
      }
    }
    ring.keys.sort((a, b) => a.active_from - b.active_from || a.created_at - b.created_at)
    await ring.maintain()
    return ring
  }

  private nowS(): number {
    return Math.floor(this.now() / 1000)
  }

  /** The key that signs now: the latest whose active_from has come. */
  get active(): LoadedKey {
    const now = this.nowS()
    let k = this.keys[0]!
    for (const x of this.keys) if (x.active_from <= now) k = x
    return k
  }

  /** Publishes the next key ahead of rotation; drops keys no live token can need. */
  async maintain(): Promise<void> {
    const now = this.nowS()
    // The very first key signs at once: no resource server can hold a set of this broker's yet.
    if (this.keys.length === 0) await this.add(now, true)
    const newest = this.keys[this.keys.length - 1]!
    const rotateAt = newest.active_from + this.rotateAfterS
    if (newest.active_from <= now && now >= rotateAt - JWKS_MAX_AGE_S - MAINTAIN_EVERY_S) {
      // Late (the broker was down at rotation time): the active key signs on until the new one has
      // been published for a whole max-age.
      await this.add(now, false, rotateAt)
    }
    const active = this.active
    for (const k of [...this.keys]) {
      if (k === active || k.active_from > now) continue
      if (k.latest_exp !== undefined && now <= k.latest_exp + MAX_SKEW_S) continue
      rmSync(join(this.dir, `${k.kid}.json`), { force: true })
      this.keys = this.keys.filter((x) => x !== k)
      this.localSet = undefined
    }
  }

  /**
   * Makes and publishes a key. The first signs at once; a successor from `rotateAt`, and never
   * sooner than a whole max-age after it is published, counted from after it is made and in whole
   * seconds up (a second's fraction and the key's generation ate into the minute).
   */
  private async add(now: number, first: boolean, rotateAt = now): Promise<void> {
    const { privateKey } = await generateKeyPair(this.alg, { extractable: true })
    const jwk = await exportJWK(privateKey)
    const kid = await calculateJwkThumbprint(jwk)
    const activeFrom = first ? now : Math.max(rotateAt, Math.ceil(this.now() / 1000) + JWKS_MAX_AGE_S)
    const key = loaded({ kid, alg: this.alg, created_at: now, active_from: activeFrom, jwk }, privateKey)
    this.write(key)
    this.keys.push(key)
    this.localSet = undefined
  }

  private write(k: LoadedKey, signedUntil = k.signed_until): void {
    const file = join(this.dir, `${k.kid}.json`)
    const tmp = `${file}.tmp`
    const body: StoredKey = { kid: k.kid, alg: k.alg, created_at: k.created_at, active_from: k.active_from, jwk: k.jwk }
    if (signedUntil !== undefined) body.signed_until = signedUntil
    writeFileSync(tmp, JSON.stringify(body), { mode: 0o600 })
    renameSync(tmp, file)
  }

  /** Checks rotation once a minute, off the request path; a failure (the directory unwritable) is reported each time, not swallowed. */
  start(onError: (err: unknown) => void): void {
    this.timer = setInterval(() => void this.maintain().catch(onError), MAINTAIN_EVERY_S * 1000)
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
    // The key is kept for as long as its tokens live: it must know how long that is.
    if (typeof claims.exp !== 'number' || !Number.isFinite(claims.exp)) throw new Error('a token without a numeric exp is never signed')
    const k = this.active
    // Before the first await: maintain() must not drop k between here and the token's return.
    if (k.latest_exp === undefined || claims.exp > k.latest_exp) k.latest_exp = claims.exp
    if (k.signed_until === undefined || claims.exp > k.signed_until) {
      // Recorded before the token leaves: a restart must not forget a key a live token needs. The
      // bound moves only once it is on disk: a write that fails refuses this token and the next.
      const bound = claims.exp + SIGNED_UNTIL_STEP_S
      this.write(k, bound)
      k.signed_until = bound
    }
    return new SignJWT(claims).setProtectedHeader({ alg: k.alg, kid: k.kid, typ }).sign(k.privateKey)
  }
}

function loaded(s: { kid: string; alg: SigningAlg; created_at: number; active_from: number; signed_until?: number; jwk: JWK }, privateKey: CryptoKey): LoadedKey {
  const { d: _d, ...pub } = s.jwk
  return {
    kid: s.kid,
    alg: s.alg,
    created_at: s.created_at,
    active_from: s.active_from,
    signed_until: s.signed_until,
    latest_exp: s.signed_until,
    jwk: s.jwk,
    privateKey,
    publicJwk: { ...pub, kid: s.kid, alg: s.alg, use: 'sig' },
  }
}

/**
 * One key file, checked whole: a file that is not a key this broker wrote (corrupt, truncated,
 * another tool's JWK set) stops the start in one line naming it and the setting, not a stack.
 */
async function readKey(file: string, name: string): Promise<LoadedKey & { legacy: boolean; superseded: number | undefined }> {
  const refuse = (what: string) =>
    new KeyDirError(`broker.keys.dir: ${file} is not a signing key this broker wrote: ${what}. Move it out of the directory (tokens signed with it, if any, will no longer verify) and start again.`)
  let text: string
  let regular: boolean
  try {
    regular = statSync(file).isFile()
  } catch (err) {
    throw refuse(`cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
  }
  // A FIFO or a device named *.json would block or never end the read: regular files only.
  if (!regular) throw refuse('not a regular file')
  try {
    text = readSettingText(file)
  } catch (err) {
    throw refuse(`cannot read it (${readFailure(err)})`)
  }
  let s: unknown
  try {
    s = JSON.parse(text)
  } catch (err) {
    // V8's message quotes the text around an unexpected character (`Unexpected token 'x', "…"d":x"AbCdEfGh"… is
    // not valid JSON`): in a key file, ten characters of the private key, to stderr and the log.
    const said = (err as Error).message
    throw refuse(`not JSON (${/["']/.test(said) ? 'a character where none may stand; the text is not repeated: it holds a private key' : said})`)
  }
  if (typeof s !== 'object' || s === null || Array.isArray(s)) throw refuse('not a JSON object')
  const o = s as Record<string, unknown>
  if (typeof o.kid !== 'string' || o.kid === '') throw refuse('no "kid"')
  // The file is removed by this name when the key is dropped.
  if (name !== `${o.kid}.json`) throw refuse(`its "kid" ${JSON.stringify(o.kid).slice(0, 80)} does not match the file name`)
  if (typeof o.alg !== 'string' || !ALGS.includes(o.alg)) throw refuse(`"alg" must be one of ${ALGS.join(', ')}`)
  for (const f of ['created_at', 'active_from', 'signed_until', 'superseded_at'] as const) {
    if ((f === 'created_at' || o[f] !== undefined) && !Number.isSafeInteger(o[f])) throw refuse(`"${f}" must be a whole number of seconds`)
  }
  const jwk = o.jwk
  if (typeof jwk !== 'object' || jwk === null || Array.isArray(jwk) || typeof (jwk as JWK).d !== 'string') throw refuse('"jwk" is not a private JWK')
  let privateKey: CryptoKey
  try {
    privateKey = (await importJWK(jwk as JWK, o.alg)) as CryptoKey
  } catch (err) {
    throw refuse(`"jwk" is not a usable ${o.alg} private key (${(err as Error).message})`)
  }
  // The kid is the key's thumbprint: a file that names another key's kid is not that key.
  if ((await calculateJwkThumbprint(jwk as JWK).catch(() => '')) !== o.kid) throw refuse('its "kid" is not the thumbprint of its "jwk"')
  const created = o.created_at as number
  const key = loaded(
    { kid: o.kid, alg: o.alg as SigningAlg, created_at: created, active_from: (o.active_from as number | undefined) ?? created, ...(o.signed_until !== undefined ? { signed_until: o.signed_until as number } : {}), jwk: jwk as JWK },
    privateKey,
  )
  return Object.assign(key, { legacy: o.active_from === undefined, superseded: o.superseded_at as number | undefined })
}
