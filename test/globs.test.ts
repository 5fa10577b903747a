// Path globs matched by automaton (proxy/policy/paths.ts): the same matches as the regular
// expression a glob has always been, in time linear in the path.
import t from 'tap'
import { compileGlob, globAsAutomaton, globAsRegExp } from '../proxy/policy/paths.js'

/** A small seeded PRNG (mulberry32), so a failure can be replayed. */
function random(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0
    let x = Math.imul(seed ^ (seed >>> 15), 1 | seed)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

// Characters whose case a case-blind RegExp (no u flag) folds in ways easy to get wrong: ß and ẞ,
// dotless ı and dotted İ, the Kelvin and Ångström signs, long ſ, micro µ and Greek μ/Μ, titlecase
// ǅ, final ς; and an astral character, a lone surrogate, a line separator (which `.` does not match).
const TRICKY = ['ß', 'ẞ', 'ı', 'İ', 'i', 'I', '\u212a', 'k', 'K', '\u212b', 'å', 'Å', 'ſ', 's', 'S', 'µ', 'μ', 'Μ', 'ǅ', 'ǆ', 'Ǆ', 'ς', 'σ', 'Σ', 'é', 'É', '😀', '\ud800', '\u2028']
const GLOB_PIECES = ['/', '/', 'a', 'B', '.', '-', '*', '*', '**', '/**', '?', '?', '%2F', '%2f', '%41', '%7e', '%C3%A9', ' ', '{', ';', ...TRICKY]
const PATH_PIECES = ['/', '/', '//', 'a', 'A', 'b', 'B', '.', '..', '-', '%2F', '%2f', '%41', '%7E', '%C3%A9', '%c3%a9', '%C3%89', '%E2%82%AC', '%F0%9F%98%80', '%20', ' ', '{', '%7B', ';x', '.json', '%', '%4', '\n', ...TRICKY]

/** A path the glob might match: each piece spelled as a reading might spell it, wildcards filled at random. */
function instance(glob: string, rnd: () => number): string {
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rnd() * xs.length)]!
  const filler = (n: number, slashes: boolean) => Array.from({ length: Math.floor(rnd() * n) }, () => pick(PATH_PIECES.filter((p) => slashes || !p.includes('/')))).join('')
  let out = ''
  const chars = [...glob]
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i]!
    if (c === '*' && chars[i + 1] === '*') {
      out += filler(4, true)
      i++
    } else if (c === '*') out += filler(3, false)
    else if (c === '?') out += pick(['a', '%C3%A9', '%E2%82%AC', '%F0%9F%98%80', 'é', '%', '.'])
    else {
      const spellings = [c, c.toUpperCase(), c.toLowerCase()]
      try {
        spellings.push(encodeURIComponent(c))
      } catch {
        // a lone surrogate
      }
      out += pick(spellings)
    }
  }
  return out + pick(['', '', '/', '.json', '/x', '.x/'])
}

t.test('a glob automaton matches exactly what the glob as a regular expression matches', async (t) => {
  const rnd = random(20250101)
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rnd() * xs.length)]!
  const differences: string[] = []
  let compared = 0
  let matched = 0
  for (let g = 0; g < 1500; g++) {
    const glob = '/' + Array.from({ length: Math.floor(rnd() * 7) }, () => pick(GLOB_PIECES)).join('')
    for (const deny of [false, true]) {
      const regex = globAsRegExp(glob, deny)
      const automaton = globAsAutomaton(glob, deny)
      const compiled = compileGlob(glob, deny)
      for (let k = 0; k < 12; k++) {
        const path = k < 6 ? instance(glob, rnd) : '/' + Array.from({ length: Math.floor(rnd() * 8) }, () => pick(PATH_PIECES)).join('')
        const want = regex.test(path)
        compared++
        if (want) matched++
        if (automaton.test(path) !== want || compiled.test(path) !== want) differences.push(`${deny ? 'deny' : 'allow'} ${JSON.stringify(glob)} ${JSON.stringify(path)}: the regex says ${want}`)
      }
    }
  }
  t.same(differences.slice(0, 20), [], `${compared} paths compared, ${differences.length} judged differently`)
  t.ok(matched > compared / 10, `enough matches to mean something: ${matched} of ${compared}`)
})

t.test('a case-blind automaton folds every code unit as a case-blind RegExp does', async (t) => {
  const differences: string[] = []
  for (const c of ['a', 'K', 'ß', 'ı', 'İ', '\u212a', 'ſ', 'µ', 'ǅ', 'Σ']) {
    const regex = globAsRegExp(`/x${c}`, true)
    const automaton = globAsAutomaton(`/x${c}`, true)
    for (let u = 0; u < 0x10000; u++) {
      const path = `/x${String.fromCharCode(u)}`
      if (regex.test(path) !== automaton.test(path)) differences.push(`${c} U+${u.toString(16)}`)
    }
  }
  t.same(differences.slice(0, 20), [], `${differences.length} code units folded differently`)
})

t.test('globs without wildcards that could share a path stay regular expressions; the rest are automata', async (t) => {
  for (const glob of ['/admin', '/admin/**', '/repos/*/*/pulls/**', '/users/*/delete', '/v1/*/items/', '/a%2Fb/**', '/%73ecret']) {
    for (const deny of [false, true]) t.ok(compileGlob(glob, deny) instanceof RegExp, `${deny ? 'deny' : 'allow'} ${glob}: a RegExp`)
  }
  for (const glob of ['/files/*.*.*', '/**/admin', '/api/*', '/v1/*/**', '/f?o', '/café/**', '/a**', '/**/**', '/a/**/**/', '/a/**/b/**']) {
    for (const deny of [false, true]) t.notOk(compileGlob(glob, deny) instanceof RegExp, `${deny ? 'deny' : 'allow'} ${glob}: an automaton`)
  }
  // A deny ignores a trailing slash: `/users/*/` is `/users/*` then, whose `*` nothing follows.
  t.notOk(compileGlob('/users/*/', true) instanceof RegExp, 'deny /users/*/: an automaton')
  t.ok(compileGlob('/users/*/', false) instanceof RegExp, 'allow /users/*/: a RegExp')
})

t.test('an automaton keeps a bounded number of states, and matches the same past them', async (t) => {
  // The classic: "the eleventh character from the end is an a" has 2^11 DFA states, and a path
  // of random a's and b's meets them all. Past the states kept, the path is followed on the NFA.
  const glob = '/**a' + '?'.repeat(10)
  const automaton = globAsAutomaton(glob, false)
  const regex = globAsRegExp(glob, false)
  const rnd = random(7)
  const path = () => '/' + Array.from({ length: 16 + Math.floor(rnd() * 200) }, () => (rnd() < 0.5 ? 'a' : 'b')).join('')
  let differences = 0
  for (let k = 0; k < 300; k++) {
    const p = path()
    if (automaton.test(p) !== regex.test(p)) differences++
  }
  t.equal(differences, 0, 'the same matches as the regex')
  t.ok(automaton.test('/xyz/ba' + 'b'.repeat(10)), 'and after them, as before')
  t.notOk(automaton.test('/xyz/ab' + 'b'.repeat(10)))
  const long = '/' + Array.from({ length: 16_000 }, () => (rnd() < 0.5 ? 'a' : 'b')).join('')
  const started = performance.now()
  t.equal(automaton.test(long), long.at(-11) === 'a', 'a 16 KB path of them')
  t.ok(performance.now() - started < 1000, `in well under a second: ${(performance.now() - started).toFixed(1)} ms`)
})
