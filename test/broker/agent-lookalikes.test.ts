// A user's `sub` that reads as an agent instance ID is refused, however it is spelled: each
// letter of "agent" and the colon through every kind of look-alike, one at a time, and names that
// only look foreign (josé@…, 用户@…) still pass; then both ends through a real broker.
import t from 'tap'
import { namesAnAgent } from '../../broker/agent-name.js'
import { startTestBroker, delegatedRequest, why } from '../helpers/broker.js'

const REST = 'helper:prod:h-1'

/** For each letter of "agent" and the colon: spellings drawn like it, of different kinds. */
const LOOKALIKES: Record<string, [string, string][]> = {
  a: [['Cyrillic а', '\u0430'], ['Greek α', '\u03b1'], ['Latin ɑ', '\u0251'], ['small capital ᴀ', '\u1d00'], ['Cherokee Ꭺ', '\u13aa'], ['Cherokee small ꭺ', '\uab7a'], ['Lisu ꓮ', '\ua4ee'], ['fullwidth ａ', '\uff41'], ['mathematical 𝐚', '\u{1d41a}'], ['with a ring å', '\u00e5'], ['a + combining grave', 'a\u0300']],
  // Letters no table lists (ǥ, ᥒ) are caught by the shape: a non-ASCII letter where one of agent's goes.
  g: [['Latin ǥ, in no table', '\u01e5'], ['script ɡ', '\u0261'], ['Armenian ց', '\u0581'], ['small capital ɢ', '\u0262'], ['Cyrillic Ԍ', '\u050c'], ['Lisu ꓖ', '\ua4d6'], ['mathematical 𝓰', '\u{1d4f0}']],
  e: [['Cyrillic е', '\u0435'], ['Cyrillic ҽ', '\u04bd'], ['small capital ᴇ', '\u1d07'], ['Greek Ε', '\u0395'], ['estimated ℮', '\u212e'], ['Lisu ꓰ', '\ua4f0'], ['accented é', '\u00e9']],
  n: [['Tai Le ᥒ, in no table', '\u1952'], ['Armenian ո', '\u0578'], ['Cyrillic п', '\u043f'], ['small capital ɴ', '\u0274'], ['Greek Ν', '\u039d'], ['Greek η', '\u03b7'], ['Lisu ꓠ', '\ua4e0'], ['superscript ⁿ', '\u207f']],
  t: [['Cyrillic т', '\u0442'], ['Greek τ', '\u03c4'], ['small capital ᴛ', '\u1d1b'], ['Cherokee Ꭲ', '\u13a2'], ['Cyrillic Т', '\u0422'], ['Lisu ꓔ', '\ua4d4'], ['down tack ⊤', '\u22a4']],
  ':': [
    ['modifier letter triangular colon ː', '\u02d0'],
    ['modifier letter raised colon ˸', '\u02f8'],
    ['modifier letter colon ꞉', '\ua789'],
    ['ratio ∶', '\u2236'],
    ['Armenian full stop ։', '\u0589'],
    ['Hebrew sof pasuq ׃', '\u05c3'],
    ['runic multiple punctuation ᛬', '\u16ec'],
    ['Ethiopic colon ፥', '\u1365'],
    ['two dot punctuation ⁚', '\u205a'],
    ['Lisu tone ꓽ', '\ua4fd'],
    ['Devanagari visarga ः', '\u0903'],
    ['Mongolian colon ᠄', '\u1804'],
    ['vertical colon ︓', '\ufe13'],
    ['small colon ﹕', '\ufe55'],
    ['fullwidth colon ：', '\uff1a'],
    ['vertical two dot leader ︰', '\ufe30'],
    ['Z notation type colon ⦂', '\u2982'],
    // Not in any table: refused as non-ASCII punctuation where the colon goes.
    ['tricolon ⁝', '\u205d'],
    ['ASCII semicolon', ';'],
    ['a space first', ' :'],
  ],
}

t.test('every kind of look-alike of each letter and of the colon is read as agent:', async (t) => {
  const word = ['a', 'g', 'e', 'n', 't']
  let checked = 0
  for (const [letter, spellings] of Object.entries(LOOKALIKES)) {
    for (const [what, c] of spellings) {
      const sub = letter === ':' ? `agent${c}${REST}` : `${word.map((l) => (l === letter ? c : l)).join('')}:${REST}`
      t.ok(namesAnAgent(sub), `${letter} spelled as ${what}: ${JSON.stringify(sub)}`)
      checked++
    }
  }
  t.ok(namesAnAgent(`\u1d00\u0262\u1d07\u0274\u1d1b:beta:dev:x`), 'all small capitals: ᴀɢᴇɴᴛ:beta:dev:x')
  t.ok(namesAnAgent(`\u13aa\u13c0\u13ac\ua4e0\u13a2\u02f8beta:dev:x`), 'every letter and the colon of other scripts at once')
  t.ok(namesAnAgent('AGENT:' + REST), 'upper case')
  // Letters in boxes no normalisation unboxes, and a blank that is neither whitespace nor ignorable.
  t.ok(namesAnAgent('\u{1f170}\u{1f176}\u{1f174}\u{1f17d}\u{1f183}:' + REST), 'negative squared: 🅰🅶🅴🅽🆃')
  t.ok(namesAnAgent('\u{1f150}\u{1f156}\u{1f154}\u{1f15d}\u{1f163}:' + REST), 'negative circled: 🅐🅖🅔🅝🅣')
  t.ok(namesAnAgent('\u{1f1e6}\u{1f1ec}\u{1f1ea}\u{1f1f3}\u{1f1f9}:' + REST), 'regional indicators: 🇦🇬🇪🇳🇹')
  t.ok(namesAnAgent('\u2800agent:' + REST), 'a Braille blank before it')
  t.ok(namesAnAgent('age\u2800nt:' + REST), 'and inside it')
  // The shape rule: each of the five a letter of "agent" at its place or any non-ASCII character, at least three of them ASCII.
  t.ok(namesAnAgent('a\u01e5e\u1952t:summarizer:prod:a1'), 'two letters no table lists: aǥeᥒt:')
  t.ok(namesAnAgent('\u10d0g\u0561nt\u2236summarizer:prod:a1'), 'Georgian ა and Armenian ա, then a ratio sign for the colon')
  // Symbols in a letter's place count as well as letters: drawn like one, they read as it.
  for (const sub of ['age\u2229t', 'ag\u2208nt', 'agen\u2020', 'ag\u20acnt', '\u20b3gent', 'agen\u271d', 'agen\u2534']) t.ok(namesAnAgent(`${sub}:summarizer:prod:w1`), `${sub}: a symbol in a letter's place`)
  t.ok(checked > 50)
})

t.test('names that only look foreign, or merely start with "agent", are users', async (t) => {
  for (const sub of [
    'jos\u00e9@example.com',
    '\u7528\u6237@example.com',
    'm\u00fcller@example.de',
    '\u0430\u0433\u0435\u043d\u0442@example.ru', // агент: Russian for "agent", not the Latin word
    '\u0627\u0644\u0639\u0645\u064a\u0644@example.com',
    'agent.smith@example.com',
    '\u0430\u0431\u0432\u0433\u0434:x', // абвгд: only one of the five reads as its Latin letter
    'a\u01e5e\u1952t@example.com', // the shape, but no separator after it
    'a\u01e5e\u1952ts:x',
    '\u01e5\u1952:summarizer:prod:a1', // too short to be the shape
    'agent-007',
    'agents:team-a',
    'reagent:helper:prod:h-1',
    'agentur@example.de',
    'user:agent:helper:prod:h-1',
    '00u1a2b3c4d5e6f7g8h9',
  ]) {
    t.notOk(namesAnAgent(sub), JSON.stringify(sub))
  }
})

t.test('through the broker: look-alikes refused, non-ASCII users served', async (t) => {
  const b = await startTestBroker()
  t.teardown(b.close)
  for (const sub of ['\u1d00\u0262\u1d07\u0274\u1d1b:helper:prod:h-1', 'agent\u02f8helper:prod:h-1', 'agent\u205d' + REST, 'a\u01e5ent:summarizer:prod:a1', 'age\u1952t:summarizer:prod:a1']) {
    const res = await b.exchange(delegatedRequest(await b.userToken(sub, 'read'), await b.attest('agent:summarizer:prod:s')))
    t.equal(res.status, 400, `${JSON.stringify(sub)} refused`)
    t.match(String(res.body.error_description), /its sub is an agent instance ID/)
  }
  for (const sub of ['jos\u00e9@example.com', '\u7528\u6237@example.com']) {
    const res = await b.exchange(delegatedRequest(await b.userToken(sub, 'read'), await b.attest('agent:summarizer:prod:s')))
    t.equal(res.status, 200, `${JSON.stringify(sub)} is served (${why(res)})`)
  }
})
