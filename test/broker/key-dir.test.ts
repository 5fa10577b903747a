// A file in broker.keys.dir that is not a key this broker wrote stops the start in one line
// naming the setting, the file and what is wrong with it (code LK_STARTUP: the CLI prints it
// without a stack), not a TypeError from deep inside jose; and one it cannot write to refuses
// to sign rather than hand out a token whose key a restart could drop.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { exportJWK, generateKeyPair } from 'jose'
import { KeyRing } from '../../broker/keys.js'
import { startTestBroker, delegatedRequest } from '../helpers/broker.js'

/** A directory holding one good key, as a broker left it. */
async function keyDir(): Promise<{ dir: string; good: Record<string, unknown>; goodName: string }> {
  const dir = join(mkdtempSync(join(tmpdir(), 'lk-keydir-')), 'keys')
  await KeyRing.open({ dir, alg: 'ES256', rotateAfterS: 3600 })
  const goodName = readdirSync(dir)[0]!
  return { dir, good: JSON.parse(readFileSync(join(dir, goodName), 'utf8')) as Record<string, unknown>, goodName }
}

const { publicKey } = await generateKeyPair('ES256', { extractable: true })
const publicJwk = await exportJWK(publicKey)

const cases: { name: string; file: (good: Record<string, unknown>, goodName: string) => [string, string]; says: RegExp }[] = [
  { name: 'truncated JSON', file: (_, n) => [n, '{"kid":"abc","alg":"ES2'], says: /: not JSON \(/ },
  { name: 'empty', file: () => ['empty.json', ''], says: /: not JSON \(/ },
  // A byte astray where a value begins: V8's message quotes the text around it, here the private key.
  { name: 'a stray byte before the private key', file: (g, n) => [n, JSON.stringify(g).replace('"d":"', '"d":x"')], says: /: not JSON \(a character where none may stand; the text is not repeated: it holds a private key\)/ },
  { name: 'a JWK set (another tool\'s file)', file: () => ['jwks.json', JSON.stringify({ keys: [publicJwk] })], says: /: no "kid"/ },
  { name: 'an array', file: () => ['list.json', '[]'], says: /: not a JSON object/ },
  { name: 'no jwk', file: (g, n) => [n, JSON.stringify({ ...g, jwk: undefined })], says: /: "jwk" is not a private JWK/ },
  { name: 'jwk a string', file: (g, n) => [n, JSON.stringify({ ...g, jwk: 'x' })], says: /: "jwk" is not a private JWK/ },
  { name: 'a public key only', file: (g, n) => [n, JSON.stringify({ ...g, jwk: publicJwk })], says: /: "jwk" is not a private JWK/ },
  { name: 'a broken private key', file: (g, n) => [n, JSON.stringify({ ...g, jwk: { ...(g.jwk as object), x: 'AAAA' } })], says: /: "jwk" is not a usable ES256 private key \(/ },
  { name: 'an unknown alg', file: (g, n) => [n, JSON.stringify({ ...g, alg: 'HS256' })], says: /: "alg" must be one of ES256, EdDSA/ },
  { name: 'created_at missing', file: (g, n) => [n, JSON.stringify({ ...g, created_at: undefined })], says: /: "created_at" must be a whole number of seconds/ },
  { name: 'signed_until a string', file: (g, n) => [n, JSON.stringify({ ...g, signed_until: 'later' })], says: /: "signed_until" must be a whole number of seconds/ },
  { name: 'a kid that is not the file name', file: (g) => ['other.json', JSON.stringify(g)], says: /: its "kid" "[^"]+" does not match the file name/ },
  { name: 'a kid that is not its key\'s thumbprint', file: (g) => ['forged.json', JSON.stringify({ ...g, kid: 'forged' })], says: /: its "kid" is not the thumbprint of its "jwk"/ },
]

t.test('each kind of bad key file is named, with what is wrong', async (t) => {
  for (const c of cases) {
    const { dir, good, goodName } = await keyDir()
    const [name, body] = c.file(good, goodName)
    writeFileSync(join(dir, name), body, { mode: 0o600 })
    const err = await KeyRing.open({ dir, alg: 'ES256', rotateAfterS: 3600 }).then(
      () => null,
      (e: unknown) => e as Error & { code?: string },
    )
    t.equal(err?.code, 'LK_STARTUP', `${c.name}: a start-up error for people`)
    t.ok(err?.message.startsWith(`broker.keys.dir: ${join(dir, name)} is not a signing key this broker wrote: `), `${c.name}: names the setting and the file`)
    t.match(err?.message, c.says, `${c.name}: says what is wrong`)
    t.notOk(err?.message.includes(String((good.jwk as { d: string }).d).slice(0, 4)), `${c.name}: quotes none of the private key`)
    t.match(err?.message, /Move it out of the directory \(tokens signed with it, if any, will no longer verify\) and start again\.$/, `${c.name}: says what to do`)
  }
})

t.test('a FIFO named like a key is refused, not read for ever', async (t) => {
  const { dir } = await keyDir()
  execFileSync('mkfifo', [join(dir, 'zz.json')])
  const err = await KeyRing.open({ dir, alg: 'ES256', rotateAfterS: 3600 }).then(
    () => null,
    (e: unknown) => e as Error & { code?: string },
  )
  t.equal(err?.code, 'LK_STARTUP')
  t.match(err?.message, /zz\.json is not a signing key this broker wrote: not a regular file\./)
})

t.test('a directory that cannot be used is named too', async (t) => {
  const parent = mkdtempSync(join(tmpdir(), 'lk-keydir-'))
  writeFileSync(join(parent, 'file'), '')
  await t.rejects(KeyRing.open({ dir: join(parent, 'file', 'keys'), alg: 'ES256', rotateAfterS: 3600 }), {
    code: 'LK_STARTUP',
    message: `broker.keys.dir: cannot use ${join(parent, 'file', 'keys')} (ENOTDIR)`,
  })
})

t.test('the broker does not start on a foreign file in its key directory, and says so in one line', async (t) => {
  const dir = join(mkdtempSync(join(tmpdir(), 'lk-keydir-')), 'keys')
  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, 'jwks.json'), JSON.stringify({ keys: [publicJwk] }))
  const err = await startTestBroker({ broker: { keys: { dir } } }).then(
    async (b) => {
      await b.close()
      return null
    },
    (e: unknown) => e as Error & { code?: string },
  )
  t.equal(err?.code, 'LK_STARTUP')
  t.equal(err?.message, `broker.keys.dir: ${join(dir, 'jwks.json')} is not a signing key this broker wrote: no "kid". Move it out of the directory (tokens signed with it, if any, will no longer verify) and start again.`)
})

// The bound on a key's tokens is written before a token leaves; when it cannot be, no token leaves.
t.test('a key directory that cannot record a key\'s bound: 503, retryable, and no token', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  // The key file is rewritten through <kid>.json.tmp: a directory there makes the write fail.
  mkdirSync(join(b.dir, 'keys', `${b.broker.keys.active.kid}.json.tmp`))
  const res = await b.exchange(delegatedRequest(await b.userToken('u', 'read'), await b.attest('agent:summarizer:prod:k')))
  t.equal(res.status, 503)
  t.equal(res.body.error, 'temporarily_unavailable')
  t.notOk('access_token' in res.body, 'no token')
  const event = [...b.events].reverse().find((e) => e.type === 'token.exchange')
  t.match(event, { outcome: 'refused', reason: /^signing failed: .*EISDIR/ }, 'the event says why')
})
