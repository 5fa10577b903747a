// Whether a name reads as an agent instance ID (agent:<type>:<env>:<instance>). A user token's
// `sub` that does would pass, in the issued token and the trail, for an agent acting on its own
// behalf, so it is compared as a reader sees it, not code point by code point.

/**
 * Characters drawn like the letters of "agent" (either case) or like a colon that Unicode
 * normalisation leaves alone: from Unicode's confusables (UTS #39, confusables.txt: every source
 * whose skeleton is a, g, e, n, t, A, G, E, N, T or `:`, less those NFKC already folds), plus the
 * Latin small capitals (ᴀ ɢ ᴇ ɴ ᴛ), which it does not list but which read as the letters in
 * lower case. Looked up for each character as written and in its other case, so a script's
 * capital and small forms are both covered by one entry.
 */
const CONFUSABLES: Readonly<Record<string, string>> = Object.fromEntries(
  (
    [
      ['a', '\u237a\u0251\u03b1\u0430\u1d00\u0391\u0410\u13aa\u15c5\ua4ee\u{102a0}'],
      ['g', '\u0261\u1d83\u018d\u0581\u0262\u050c\u050d\u13c0\u13f3\ua4d6'],
      ['e', '\u212e\uab32\u0435\u04bd\u1d07\u22ff\u0395\u0415\u2d39\u13ac\ua4f0\u{118a6}\u{118ae}\u{10286}'],
      ['n', '\u03c0\u03d6\u1d28\u043f\u0578\u057c\u0274\u039d\u2c9a\ua4e0\u{10513}\u03b7\u019e'],
      ['t', '\u1d1b\u03c4\u0442\u22a4\u27d9\u{1f768}\u03a4\u2ca6\u0422\u13a2\ua4d4\u{118bc}\u{10297}\u{102b1}\u{10315}\u0167\u01ad'],
      [':', '\u0903\u0a83\u0589\u0703\u0704\u16ec\ufe30\u1803\u1804\u1809\u205a\u05c3\u02f8\ua789\u2236\u02d0\ua4fd\u1361\u1365\u2982\ua6f4'],
    ] as const
  ).flatMap(([to, from]) => [...from].map((c) => [c, to])),
)

/**
 * Letters in boxes that no normalisation unboxes (confusables.txt does not list them either):
 * negative circled (🅐), negative squared (🅰) and regional indicators (🇦, drawn as a boxed letter
 * when not part of a flag). Each range runs A to Z.
 */
const BOXED_LETTER_RANGES = [0x1f150, 0x1f170, 0x1f1e6]

function unconfuse(s: string): string {
  let out = ''
  for (const c of s) {
    const cp = c.codePointAt(0)!
    const box = BOXED_LETTER_RANGES.find((first) => cp >= first && cp < first + 26)
    out += box !== undefined ? String.fromCharCode(0x61 + cp - box) : (CONFUSABLES[c] ?? CONFUSABLES[c.toLowerCase()] ?? CONFUSABLES[c.toUpperCase()] ?? c)
  }
  return out
}

/**
 * "agent" and then a separator: `:` or anything else it could be taken for. Any character
 * outside ASCII that is not a letter or digit (punctuation, symbols, modifier letters such as ː)
 * counts, so a colon look-alike missing from the table above is refused too, and so does ASCII `;`;
 * `.`, `-`, `_`, `+` and `@` (agent.smith@example.com) do not read as a colon and pass.
 */
const SEPARATOR = String.raw`(?::|;|\p{Lm}|[^\p{ASCII}\p{L}\p{N}])`
const AGENT_PREFIX = new RegExp(`^agent${SEPARATOR}`, 'u')
const IS_SEPARATOR = new RegExp(`^${SEPARATOR}$`, 'u')
const NON_ASCII = /^\P{ASCII}$/u

/**
 * The table above can never hold every look-alike (ǥ U+01E5 and ᥒ U+1952 were missing), so this
 * fails closed on the shape instead: five characters, each the letter of "agent" at its place or
 * any non-ASCII character (a symbol drawn like a letter reads as one: age∩t, agen†), at least
 * three of them the ASCII letters, then a separator. A name in
 * another script (агент@…, 用户@…) has too few ASCII letters, or no separator, and passes.
 */
function shapedLikeAgent(seen: string): boolean {
  // Only the first six code points count (at most 12 UTF-16 units): a long sub is not spread whole.
  const chars = [...seen.slice(0, 12)]
  if (chars.length < 6 || !IS_SEPARATOR.test(chars[5]!)) return false
  let ascii = 0
  for (let i = 0; i < 5; i++) {
    if (chars[i] === 'agent'[i]) ascii++
    else if (!NON_ASCII.test(chars[i]!)) return false
  }
  return ascii >= 3
}

/**
 * Compared as a reader would see it: look-alikes of other scripts and small capitals read as the
 * Latin letters they resemble, accents dropped (NFKD, then nonspacing and enclosing marks
 * removed), compatibility forms folded (NFKC: fullwidth, mathematical, superscript letters), any
 * case, no whitespace, letters in boxes read as the letters. Non-ASCII names that read as nothing of the kind (josé@…, 用户@…) pass.
 */
export function namesAnAgent(sub: string): boolean {
  // Look-alikes are mapped before normalising too: NFKC turns some (︰) into something else (‥).
  const seen = unconfuse(unconfuse(sub).normalize('NFKD').replace(/[\p{Mn}\p{Me}]/gu, '').normalize('NFKC'))
    .toLowerCase()
    // Whitespace, and the Braille blank (U+2800), drawn as a space and neither \s nor ignorable.
    .replace(/[\s\u2800]/gu, '')
  return AGENT_PREFIX.test(seen) || shapedLikeAgent(seen)
}
