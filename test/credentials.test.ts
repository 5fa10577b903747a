import t from 'tap'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { compileBinding, credentialedQuery, CredentialBindings, stripQueryParams } from '../proxy/credentials/bindings.js'
import { StaticSecretSource } from '../proxy/credentials/static-source.js'
import { parseAbsoluteTarget } from '../proxy/listen/target.js'
import type { Credential } from '../proxy/context.js'

const cred: Credential = { value: 's3cr:et', id: 'static:X', expiresAt: null, scopes: [] }
const base = { id: 'b', audience: 'https://api.example.com', source: 'static' as const, secret: 'X' }

t.test('injectors write exactly their header or parameter', async (t) => {
  const target = parseAbsoluteTarget('https://api.example.com/x?a=1')
  const cases: [Parameters<typeof compileBinding>[0]['inject'], Record<string, string>, string][] = [
    [{ type: 'bearer' }, { authorization: 'Bearer s3cr:et' }, '?a=1'],
    [{ type: 'header', name: 'X-Api-Key' }, { 'x-api-key': 's3cr:et' }, '?a=1'],
    [{ type: 'header', name: 'X-Api-Key', format: 'Token {token}!' }, { 'x-api-key': 'Token s3cr:et!' }, '?a=1'],
    [{ type: 'basic', username: 'svc' }, { authorization: `Basic ${Buffer.from('svc:s3cr:et').toString('base64')}` }, '?a=1'],
    [{ type: 'query', name: 'api key' }, {}, '?a=1&api%20key=s3cr%3Aet'],
  ]
  for (const [inject, headers, search] of cases) {
    const b = compileBinding({ ...base, inject })
    const h: Record<string, string> = {}
    const tgt = { ...target }
    b.inject(h, tgt, cred)
    t.same(h, headers, inject.type)
    t.equal(tgt.search, search, `${inject.type}: query`)
  }
  const header = compileBinding({ ...base, inject: { type: 'header', name: 'X-Api-Key' }, strip: ['X-Session'] })
  t.ok(['authorization', 'cookie', 'x-api-key', 'x-session', 'proxy-authorization'].every((h) => header.strip.includes(h)), 'agent credentials and the strip list are removed')
})

t.test('bindings match the exact origin only', async (t) => {
  const b = new CredentialBindings([
    { ...base, audience: 'https://API.example.com:443', inject: { type: 'bearer' } },
    { ...base, id: 'c', audience: 'http://[::1]:8080', inject: { type: 'bearer' } },
  ])
  t.equal(b.match(parseAbsoluteTarget('https://api.example.com/x'))?.id, 'b')
  t.equal(b.match(parseAbsoluteTarget('https://api.example.com.:443/x'))?.id, 'b', 'trailing dot is the same host')
  t.equal(b.match(parseAbsoluteTarget('http://api.example.com/x')), null, 'other scheme')
  t.equal(b.match(parseAbsoluteTarget('https://api.example.com:8443/x')), null, 'other port')
  t.equal(b.match(parseAbsoluteTarget('https://api.example.com.evil.com/x')), null)
  t.equal(b.match(parseAbsoluteTarget('https://xapi.example.com/x')), null)
  t.equal(b.match(parseAbsoluteTarget('http://[0:0::1]:8080/x'))?.id, 'c', 'IPv6 spelled another way')
})

t.test("a credentialed origin's query loses the agent's own credential parameters, and the injector's", async (t) => {
  const bearer = compileBinding({ ...base, inject: { type: 'bearer' } })
  t.equal(
    credentialedQuery('?a=1&access_token=x&API.KEY=y&Private%5FToken=z&subscription-key=w&%FF=2&pageToken=p&key=k', bearer),
    '?a=1&%FF=2&pageToken=p&key=k',
    "RFC 6750's access_token and the usual key names go in every spelling; a page token, a key that is not the injector's, and a name no decoder reads stay",
  )
  t.equal(credentialedQuery('', bearer), '')
  const query = compileBinding({ ...base, inject: { type: 'query', name: 'key' } })
  t.equal(credentialedQuery('?key=a&%FF=2&api_key=z&b=1', query), '?b=1', "beside the injector's own name an undecodable one goes: it may be that name in disguise")
})

t.test('stripQueryParams removes every spelling of the name', async (t) => {
  t.equal(stripQueryParams('?key=a&b=1&%6Bey=c&key&k%65y=d', ['key']), '?b=1')
  t.equal(stripQueryParams('?key=a', ['key']), '')
  t.equal(stripQueryParams('?KEY=a&Key=b&b=1', ['key']), '?b=1', 'any case: some frameworks match names case-insensitively')
  t.equal(stripQueryParams('?key[]=a&key[x]=b&key%5B%5D=c&b=1', ['key']), '?b=1', 'PHP-style array names')
  t.equal(stripQueryParams('?key%00x=a&b=1', ['key']), '?b=1', 'a name cut short at a NUL')
  t.equal(stripQueryParams('?a=1;key=x&b=2;c=3', ['key']), '?a=1&b=2;c=3', 'hidden after a ; separator: that part goes, the agent\'s a=1 stays')
  t.equal(stripQueryParams('?key=x;a=1;KEY=y&k%65y=z;b', ['key']), '?a=1&b', 'every part that names it, in any spelling, before or after the others')
  t.equal(stripQueryParams('?a=1;%ZZ=2', ['key']), '?a=1', 'an undecodable part goes, the rest stays')
  t.equal(stripQueryParams('?keys=a&akey=b&monkey=c', ['key']), '?keys=a&akey=b&monkey=c', 'other names are kept')
  t.equal(stripQueryParams('?a=%ZZ&%ZZ=1&b=2', ['key']), '?a=%ZZ&b=2', 'an undecodable name might be ours: dropped')
  t.equal(stripQueryParams('?key%00%ff=a&k%65y%00%=b&b=1', ['key'], 'keep'), '?b=1', 'read as PHP reads it, even where UTF-8 decoding fails, and kept undecodable names do not hide it')
  t.equal(stripQueryParams('?100%=a&%ZZ=b', ['key'], 'keep'), '?100%=a&%ZZ=b', "'keep' keeps undecodable names that are not ours")
  t.equal(stripQueryParams('', ['key']), '')
})

t.test('static secrets come from the environment first, then the file', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  writeFileSync(file, 'A: from-file\nB: also-file\n')
  const src = new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A', 'B', 'C'], { LK_T_A: 'from-env' })
  const binding = (secret: string) => compileBinding({ ...base, secret, inject: { type: 'bearer' } })
  t.equal(src.get(binding('A')).value, 'from-env')
  t.equal(src.get(binding('B')).value, 'also-file')
  t.equal(src.get(binding('B')).id, 'static:B', 'the audit id names the secret, never its value')
  t.throws(() => src.get(binding('C')), { code: 'LK_CREDENTIAL_UNAVAILABLE' })
  writeFileSync(file, 'A: [unclosed\n')
  t.throws(() => new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A'], {}), /not YAML this sidecar reads \(\w+ at line \d+;/)
  try {
    new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A'], {})
  } catch (err) {
    t.notMatch((err as Error).message, /unclosed/, 'a parse error never echoes the file')
  }
})

t.test('a secret set but empty is said to be empty, where: an empty variable is not passed over for the file', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  writeFileSync(file, 'UPTOKEN: canaryFILESECRET0014\nBLANK: ""\nNOTHING:\nMixed-Name.x: ""\n')
  const src = new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['UPTOKEN', 'BLANK', 'NOTHING', 'ABSENT', 'Mixed-Name.x'], { LK_T_UPTOKEN: '' })
  t.notOk(src.has('UPTOKEN'), "an empty variable is read first, as a set one is: the file's value is not used in its place")
  t.equal(src.missing('UPTOKEN'), 'secret UPTOKEN: env LK_T_UPTOKEN is set but empty (it is read before secrets.file: unset it, or set it to the secret)')
  t.equal(src.missing('BLANK'), 'secret BLANK is empty in secrets.file')
  t.equal(src.missing('NOTHING'), 'secret NOTHING is empty in secrets.file', '`NAME:` with nothing after it is empty, not "not a string"')
  t.equal(src.missing('ABSENT'), 'secret ABSENT is neither in env LK_T_ABSENT nor in secrets.file')
  t.equal(src.missing('Mixed-Name.x'), 'the secret it names is empty in secrets.file (the name is not repeated: it is not written as a name is, and may be a secret pasted in its place)')
  const unset = new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['UPTOKEN'], {})
  t.equal(unset.secret('UPTOKEN'), 'canaryFILESECRET0014', 'unset, the file has it')
  const noFile = new StaticSecretSource({ env_prefix: 'LK_T_' }, ['Hunter2-pasted'], { 'LK_T_Hunter2-pasted': '' })
  t.equal(noFile.missing('Hunter2-pasted'), 'the secret it names: env LK_T_<name> is set but empty (it is read before secrets.file: unset it, or set it to the secret) (the name is not repeated: it is not written as a name is, and may be a secret pasted in its place)')
})

t.test('a secrets file that is not UTF-8 is refused naming the line, never quoting it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  writeFileSync(file, Buffer.concat([Buffer.from('A: ok-secret-value\nB: '), Buffer.from('caf\u00e9-CANARY-secret', 'latin1'), Buffer.from('\n')]))
  let message = ''
  try {
    new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A', 'B'], {})
  } catch (err) {
    message = (err as Error).message
  }
  t.equal(message, `secrets.file ${file}: line 2: not valid UTF-8 (save the file as UTF-8; the line is not quoted: it may hold a secret)`)
  writeFileSync(file, 'A: ok-secret-value\nB: caf\u00e9-secret\n')
  t.equal(new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['B'], {}).secret('B'), 'caf\u00e9-secret', 'the same as UTF-8 is read')
})

t.test('a secrets file yaml would only warn about (an unknown tag, a directive) is refused, and nothing of it printed', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  const warnings: string[] = []
  const onWarning = (w: Error) => warnings.push(`${w.name} ${w.message}`)
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  for (const [content, code, line] of [
    ['A: ok\nGH: !secret SECRET-CANARY-7q\n', 'TAG_RESOLVE_FAILED', 2],
    ['%FOO SECRET-CANARY-7q\n---\nA: ok\n', 'BAD_DIRECTIVE', 1],
    ['A: ok\n---\nB: SECRET-CANARY-7q\n', 'MULTIPLE_DOCS', 2],
  ] as const) {
    writeFileSync(file, content)
    let message = ''
    try {
      new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A', 'GH', 'B'], {})
    } catch (err) {
      message = (err as Error).message
    }
    t.match(message, `not YAML this sidecar reads (${code} at line ${line};`, code)
    t.notMatch(message, /SECRET-CANARY/, `${code}: the refusal quotes nothing of the file`)
  }
  await new Promise((r) => setImmediate(r))
  t.same(warnings, [], 'and nothing went to process warnings (stderr)')
})

t.test('a static secret short enough to be ordinary text is warned of at start-up, by name and length, never value', async (t) => {
  const { startTestSidecar } = await import('./helpers/harness.js')
  const s = await startTestSidecar(
    {
      credentials: [
        { id: 'short', audience: 'http://127.0.0.1:9', source: 'static', secret: 'SHORT', inject: { type: 'bearer' } },
        { id: 'long', audience: 'http://127.0.0.1:10', source: 'static', secret: 'LONG', inject: { type: 'bearer' } },
      ],
    },
    { LATCHKEY_SECRET_SHORT: 'abc', LATCHKEY_SECRET_LONG: 'x'.repeat(40) },
  )
  t.teardown(() => s.close())
  const warned = s.logs.filter((l) => l.includes('responses from its origin have those characters masked'))
  t.equal(warned.length, 1, 'one warning, for the short one')
  t.match(JSON.parse(warned[0]!), { level: 40, credential: 'short', secret_name: 'SHORT', length: 3 })
  t.notOk(warned[0]!.includes('"abc"'), 'the value itself is not logged')
})

t.test('a secret named as an Object.prototype member is found only when the file has it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  writeFileSync(file, 'toString: own-value-of-toString\n')
  const src = new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['constructor', 'toString', '__proto__', 'hasOwnProperty'], {})
  t.notOk(src.has('constructor'), 'constructor is not Object.prototype.constructor')
  t.notOk(src.has('hasOwnProperty'))
  t.notOk(src.has('__proto__'))
  t.equal(src.secret('toString'), 'own-value-of-toString', 'an own key is found')
  t.match(src.missing('constructor'), /neither in env LK_T_constructor nor in secrets.file/, 'missing, as any other absent secret')
  const envOnly = new StaticSecretSource({ env_prefix: 'LK_T_' }, ['constructor'], process.env)
  t.notOk(envOnly.has('constructor'), 'nor on the environment object\'s prototype')
})

t.test('reload swaps the whole set, keeps the last two previous values held (never sent), and refuses a bad file keeping the set', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-secrets-'))
  const file = join(dir, 'secrets.yaml')
  writeFileSync(file, 'A: value-one-aaaaaaaa\nB: bee-stays-bbbbbbbb\n')
  const src = new StaticSecretSource({ file, env_prefix: 'LK_T_' }, ['A', 'B', 'E'], { LK_T_E: 'from-env-eeeeeeee' })
  const binding = (secret: string) => compileBinding({ ...base, secret, inject: { type: 'bearer' } })
  const values = (name: string) => src.held(binding(name)).map((c) => c.value)
  t.same(src.reload(), { outcome: 'unchanged' }, 'the same file: unchanged')
  const heldB = src.held(binding('B'))
  writeFileSync(file, 'A: value-two-aaaaaaaa\nB: bee-stays-bbbbbbbb\nE: file-loses-to-env\n')
  t.same(src.reload(), { outcome: 'changed', changed: 1 })
  t.equal(src.get(binding('A')).value, 'value-two-aaaaaaaa', 'the new value is sent')
  t.same(values('A'), ['value-two-aaaaaaaa', 'value-one-aaaaaaaa'], 'the old one still held for the scrub')
  t.equal(src.held(binding('B')), heldB, 'an unchanged secret keeps the same held array (scrubbers cache by it)')
  t.equal(src.secret('E'), 'from-env-eeeeeeee', 'the environment still wins over the file')
  for (const v of ['three', 'four']) {
    writeFileSync(file, `A: value-${v}-aaaaaaaa\nB: bee-stays-bbbbbbbb\n`)
    t.equal(src.reload().outcome, 'changed')
  }
  t.same(values('A'), ['value-four-aaaaaaaa', 'value-three-aaaaaaaa', 'value-two-aaaaaaaa'], 'the current one, and the last two before it')
  const before = src.held(binding('A'))
  const bad: [string, RegExp][] = [
    ['A: [unclosed\n', /not YAML this sidecar reads/],
    ['- a list\n', /must be a mapping of name to secret/],
    ['A: 12345\nB: bee-stays-bbbbbbbb\n', /secret A is not a string \(quote it\)/],
    ['B: bee-stays-bbbbbbbb\n', /secret A is neither in env LK_T_A nor in secrets.file \(a credential needs it\)/],
    ['A: ""\nB: bee-stays-bbbbbbbb\n', /secret A is empty in secrets.file/],
  ]
  for (const [text, why] of bad) {
    writeFileSync(file, text)
    const r = src.reload()
    t.match(r, { outcome: 'rejected', reason: why }, `refused: ${why.source}`)
    t.notMatch(JSON.stringify(r), /aaaaaaaa|bbbbbbbb|unclosed|12345/, 'the reason quotes no secret and nothing of the file')
    t.equal(src.held(binding('A')), before, 'the set in force is kept')
  }
  writeFileSync(file, 'A: value-five-aaaaaaaa\nB: bee-stays-bbbbbbbb\n')
  t.match(src.reload(() => 'not sendable'), { outcome: 'rejected', reason: 'not sendable' }, 'the sidecar\'s check can refuse a set')
  t.equal(src.secret('A'), 'value-four-aaaaaaaa')
  t.equal(src.reload().outcome, 'changed', 'and a good file after all that is taken')
})
