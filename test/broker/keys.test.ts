// Key rotation on a fake clock: a new key signs after rotate_after_s, the old one stays in the
// JWKS until every token it signed has expired, then leaves; a reopened ring keeps them all.
import t from 'tap'
import { mkdtempSync, readdirSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createLocalJWKSet, jwtVerify } from 'jose'
import { KeyRing } from '../../broker/keys.js'

t.test('rotation keeps old keys exactly as long as their tokens live', async (t) => {
  const dir = join(mkdtempSync(join(tmpdir(), 'lk-keys-')), 'keys')
  let clock = 1_800_000_000_000
  const now = () => clock
  const open = () => KeyRing.open({ dir, alg: 'ES256', rotateAfterS: 3600, maxLifetimeS: () => 900, now })
  const ring = await open()
  t.equal(ring.jwks().keys.length, 1)
  t.equal((statSync(dir).mode & 0o777).toString(8), '700', 'key directory is private')
  for (const f of readdirSync(dir)) t.equal((statSync(join(dir, f)).mode & 0o777).toString(8), '600', `${f} is private`)
  t.notOk('d' in ring.jwks().keys[0]!, 'the JWKS publishes no private part')

  const first = ring.active.kid
  const nowS = Math.floor(clock / 1000)
  const old = await ring.sign({ sub: 's', iat: nowS, exp: nowS + 900 }, 'at+jwt')

  clock += 3599_000
  await ring.maintain()
  t.equal(ring.active.kid, first, 'no rotation before rotate_after_s')
  clock += 1_000
  await ring.maintain()
  t.not(ring.active.kid, first, 'rotated at rotate_after_s')
  t.same(ring.jwks().keys.map((k) => k.kid).sort(), [first, ring.active.kid].sort(), 'both keys published')
  await t.resolves(jwtVerify(old, ring.verifier, { currentDate: new Date(clock - 3000_000) }), 'a token of the old key still verifies')

  // The reopened ring (a broker restart) has both.
  const reopened = await open()
  t.equal(reopened.jwks().keys.length, 2, 'a restart keeps both keys')
  t.equal(reopened.active.kid, ring.active.kid, 'and the same active key')

  clock += (900 + 30) * 1000
  await ring.maintain()
  t.equal(ring.jwks().keys.length, 2, 'kept until max lifetime + skew has passed')
  clock += 1000
  await ring.maintain()
  t.same(ring.jwks().keys.map((k) => k.kid), [ring.active.kid], 'then dropped')
  t.equal(readdirSync(dir).length, 1, 'and its file deleted')
  await t.rejects(jwtVerify(old, createLocalJWKSet(ring.jwks())), 'the old key no longer verifies anything')
})
