// Key rotation on a fake clock: the next key is in the JWKS a whole max-age before it signs, an
// old one stays until the last token it signed has expired (whatever the registry says now),
// then leaves; a reopened ring (a restart) keeps what its tokens need.
import t from 'tap'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createLocalJWKSet, decodeProtectedHeader, jwtVerify } from 'jose'
import { KeyRing, JWKS_MAX_AGE_S } from '../../broker/keys.js'

const START = 1_800_000_000_000

function ringAt(dir: string, clock: { ms: number }, rotateAfterS = 3600) {
  return KeyRing.open({ dir, alg: 'ES256', rotateAfterS, now: () => clock.ms })
}

function tmpKeys(): string {
  return join(mkdtempSync(join(tmpdir(), 'lk-keys-')), 'keys')
}

t.test('the key directory and its files are private; the JWKS has no private part', async (t) => {
  const dir = tmpKeys()
  const ring = await ringAt(dir, { ms: START })
  t.equal(ring.jwks().keys.length, 1)
  t.equal((statSync(dir).mode & 0o777).toString(8), '700', 'key directory is private')
  for (const f of readdirSync(dir)) t.equal((statSync(join(dir, f)).mode & 0o777).toString(8), '600', `${f} is private`)
  t.notOk('d' in ring.jwks().keys[0]!, 'the JWKS publishes no private part')
})

// A resource server that fetched the JWKS at any moment may use it for max-age seconds: every
// token signed in that time must be signed by a key in what it fetched.
t.test('a JWKS fetched at any time holds every key that signs during its max-age', async (t) => {
  const dir = tmpKeys()
  const clock = { ms: START }
  const ring = await ringAt(dir, clock)
  const fetched: Set<string>[] = []
  const signer: string[] = []
  // Two rotations, a tick phase that does not line up with them (every 60 s from +17 s).
  for (let s = 0; s <= 2 * 3600 + 300; s++) {
    clock.ms = START + s * 1000
    if (s % 60 === 17) await ring.maintain()
    fetched.push(new Set(ring.jwks().keys.map((k) => k.kid!)))
    if (s % 5 === 0 || (s % 3600 > 3300 && s % 3600 < 3700) || s % 3600 < 100) {
      const nowS = Math.floor(clock.ms / 1000)
      signer[s] = decodeProtectedHeader(await ring.sign({ sub: 's', iat: nowS, exp: nowS + 60 }, 'at+jwt')).kid!
    }
  }
  const kids = new Set(signer.filter(Boolean))
  t.equal(kids.size, 3, 'two rotations happened: three keys signed')
  let misses = 0
  for (let s = 0; s < fetched.length; s++) {
    for (let u = s; u <= s + JWKS_MAX_AGE_S && u < signer.length; u++) if (signer[u] !== undefined && !fetched[s]!.has(signer[u]!)) misses++
  }
  t.equal(misses, 0, 'no token was signed by a key missing from a JWKS fetched up to max-age before')
  const first = signer[0]!
  const second = signer.find((k) => k !== undefined && k !== first)!
  t.equal(signer[3599], first, 'the first key signs until rotate_after_s')
  t.equal(signer[3600], second, 'and its successor from then on')
})

t.test('a superseded key stays until the last token it signed has expired, not what the registry says now', async (t) => {
  const dir = tmpKeys()
  const clock = { ms: START }
  const ring = await ringAt(dir, clock)
  const first = ring.active.kid
  const nowS = () => Math.floor(clock.ms / 1000)
  clock.ms = START + 3500_000
  await ring.maintain() // the minute's tick that publishes the next key
  // Signed with 600 s of life just before rotation; the registry may have been lowered since.
  clock.ms = START + 3599_000
  const iat = nowS()
  const old = await ring.sign({ sub: 's', iat, exp: iat + 600 }, 'at+jwt')
  clock.ms = START + 3600_000
  await ring.maintain()
  t.not(ring.active.kid, first, 'rotated')
  t.ok(ring.jwks().keys.some((k) => k.kid === first), 'the old key is still published')

  // A restart in between must not forget how long the old key's tokens live.
  const reopened = await ringAt(dir, clock)
  t.equal(reopened.active.kid, ring.active.kid, 'a restart keeps the active key')

  for (const r of [ring, reopened]) {
    clock.ms = (iat + 600 + 30) * 1000
    await r.maintain()
    t.ok(r.jwks().keys.some((k) => k.kid === first), `${r === ring ? '' : 'reopened: '}kept until that token's exp + 30 s skew`)
    await t.resolves(jwtVerify(old, r.verifier, { currentDate: new Date((iat + 599) * 1000) }), 'and its token verifies')
  }
  clock.ms = (iat + 600 + 31) * 1000
  await ring.maintain()
  t.same(ring.jwks().keys.map((k) => k.kid), [ring.active.kid], 'then dropped, to the second')
  t.equal(readdirSync(dir).length, 1, 'and its file deleted')
  await t.rejects(jwtVerify(old, createLocalJWKSet(ring.jwks())), 'the old key no longer verifies anything')
})

t.test('a key that signed nothing leaves as soon as it is superseded', async (t) => {
  const dir = tmpKeys()
  const clock = { ms: START }
  const ring = await ringAt(dir, clock)
  const first = ring.active.kid
  clock.ms = START + 3500_000
  await ring.maintain()
  clock.ms = START + 3600_000
  await ring.maintain()
  t.not(ring.active.kid, first)
  t.notOk(ring.jwks().keys.some((k) => k.kid === first), 'no token can need it')
})

t.test('a broker down at rotation time publishes the next key a max-age before it signs', async (t) => {
  const dir = tmpKeys()
  const clock = { ms: START }
  const first = (await ringAt(dir, clock)).active.kid
  clock.ms = START + 5 * 3600_000
  const ring = await ringAt(dir, clock)
  t.equal(ring.jwks().keys.length, 2, 'the next key is published at start')
  t.equal(ring.active.kid, first, 'the old one signs on meanwhile')
  clock.ms += (JWKS_MAX_AGE_S - 1) * 1000
  t.equal(ring.active.kid, first, `for ${JWKS_MAX_AGE_S} s`)
  clock.ms += 1000
  t.not(ring.active.kid, first, 'then the new one signs')
})

t.test('a token without exp is not signed: its key could not be kept for it', async (t) => {
  const ring = await ringAt(tmpKeys(), { ms: START })
  await t.rejects(ring.sign({ sub: 's' }, 'at+jwt'), /without a numeric exp/)
})

t.test('a bound that cannot be written refuses every token that needs it, until it can; then the file has it', async (t) => {
  const dir = tmpKeys()
  const clock = { ms: START }
  const ring = await ringAt(dir, clock)
  const kid = ring.jwks().keys[0]!.kid!
  const exp = START / 1000 + 600
  // The write goes through <kid>.json.tmp: a directory there makes it fail (EISDIR), as a full or read-only disk would.
  mkdirSync(join(dir, `${kid}.json.tmp`))
  await t.rejects(ring.sign({ sub: 'a', exp }, 'JWT'), { code: 'EISDIR' }, 'the first token is refused')
  await t.rejects(ring.sign({ sub: 'b', exp }, 'JWT'), { code: 'EISDIR' }, 'and the next: the bound was not taken as written')
  t.equal(JSON.parse(readFileSync(join(dir, `${kid}.json`), 'utf8')).signed_until, undefined, 'nothing recorded')
  rmdirSync(join(dir, `${kid}.json.tmp`))
  const token = await ring.sign({ sub: 'c', exp }, 'JWT')
  t.equal(decodeProtectedHeader(token).kid, kid)
  t.ok(JSON.parse(readFileSync(join(dir, `${kid}.json`), 'utf8')).signed_until >= exp, 'once it can be written, the bound is on disk before the token is out')
})

t.test('a successor is published a whole max-age before it signs, counted from when it is made, in whole seconds up', async (t) => {
  const dir = tmpKeys()
  // Half a second into a second, with rotation due at once (rotate_after_s 60 = the max-age): the
  // successor made at start-up may sign only a whole minute after the next whole second.
  const clock = { ms: START + 500 }
  await ringAt(dir, clock, 60)
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as { active_from: number })
  t.same(files.map((f) => f.active_from).sort(), [START / 1000, START / 1000 + 1 + JWKS_MAX_AGE_S], 'the first signs at once; its successor 61 s on, not 60 (the published key was half a second short of its minute)')
})
