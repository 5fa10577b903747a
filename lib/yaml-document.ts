// YAML parsed with a duplicate-key check that is linear. yaml's own (`uniqueKeys`) compares each
// key of a mapping with every key before it: 20,000 keys took 2.3 s (40,000: 18 s), on the
// sidecar's event loop when a policy bundle arrives. The same DUPLICATE_KEY error, at the same place.
//
// Every file read with it (the config, a policy file or bundle, the secrets file, the agent
// registry, the collector's config) can hold secrets, and its errors go to terminals and logs: an
// error is said with yamlErrorMessage, which never quotes the document. yaml's own messages
// quote it in places: an unresolved alias by its name (`secret: *Hunter2` is an alias named
// `Hunter2`), a tag, a block scalar header, an escape sequence, an unexpected token.
import { LineCounter, parseDocument, visit, isAlias, isMap, isNode, isScalar, YAMLParseError, type Document, type YAMLError } from 'yaml'

/** The error an alias with no anchor before it gets: its name is not repeated, it may be a value that begins with `*`. */
export const UNRESOLVED_ALIAS = 'unresolved alias *… (an alias names an anchor (&name) set before it; quote a value that begins with *)'

/** The error a `%YAML 1.1` directive gets: under it `yes`, `017` and `1:30` are true, 15 and 90, and `<<` merges. */
export const YAML_1_1 = 'a %YAML 1.1 directive: this reader reads YAML 1.2, where yes, 017 and 1:30 are not the true, 15 and 90 that 1.1 makes them: remove the directive'

/** A warning kept as a warning (a style nit that reads one way); any other (a tag or directive not taken, an ambiguous alias) is an error. */
const HARMLESS_WARNINGS = new Set(['BAD_INDENT'])

/**
 * The document, with any error in `doc.errors` (not thrown by toJS later, as an unresolved alias
 * was) and every error and warning carrying its position (`linePos`).
 */
export function parseYamlDocument(text: string): Document.Parsed {
  const lineCounter = new LineCounter()
  // logLevel error: toJS would otherwise warn on stderr (a key that is a collection), quoting it.
  // resolveKnownTags false: !!omap, !!pairs and !!set became a Map, an array of Maps or a Set (a Map
  // or Set passes as an object with none of its keys: `sidecar: !!omap [...]` loaded the
  // defaults), !!binary bytes and !!timestamp a Date. Unresolved, they are refused below.
  const doc = parseDocument(text, { uniqueKeys: false, prettyErrors: false, lineCounter, logLevel: 'error', resolveKnownTags: false })
  // A tag yaml does not resolve (`secret: !env API_KEY`) was only a warning, and the value read as
  // the string after it (the secret was `API_KEY`); a directive it does not take (%YAML 1.3), too.
  for (const w of doc.warnings.filter((w) => !HARMLESS_WARNINGS.has(w.code))) doc.errors.push(new YAMLParseError(w.pos, w.code, w.message))
  doc.warnings = doc.warnings.filter((w) => HARMLESS_WARNINGS.has(w.code))
  // The same text is read otherwise under 1.1 (as yaml does when the file says so): one reading.
  if (doc.directives?.yaml.explicit && doc.directives.yaml.version !== '1.2') doc.errors.push(new YAMLParseError([0, 0], 'BAD_DIRECTIVE', YAML_1_1))
  // Where it is, in linePos (set below), not in the message.
  const fail = (code: 'DUPLICATE_KEY' | 'BAD_ALIAS', range: readonly number[] | null | undefined, message: string) => {
    const [start = 0, end = start] = range ?? []
    doc.errors.push(new YAMLParseError([start, end], code, message))
    return visit.BREAK
  }
  if (doc.errors.length === 0) {
    // An alias names the last anchor before it in document order, which is the order visit walks in.
    const anchors = new Set<string>()
    visit(doc, (_, node) => {
      if (isAlias(node)) {
        if (!anchors.has(node.source)) return fail('BAD_ALIAS', node.range, UNRESOLVED_ALIAS)
        return undefined
      }
      if (isNode(node) && node.anchor !== undefined) anchors.add(node.anchor)
      if (!isMap(node)) return undefined
      const seen = new Set<unknown>()
      for (const pair of node.items) {
        // Scalars as the key they become in the data (yaml's toJS: null is "", anything else
        // String()): `1` and `"1"` are one key there, and the second's value replaced the first's.
        // Anything else by node.
        const key = isScalar(pair.key) ? (pair.key.value === null ? '' : String(pair.key.value)) : pair.key
        if (!seen.has(key)) {
          seen.add(key)
          continue
        }
        return fail('DUPLICATE_KEY', (pair.key as { range?: number[] } | null)?.range, 'Map keys must be unique')
      }
      return undefined
    })
  }
  for (const e of [...doc.errors, ...doc.warnings]) e.linePos ??= [lineCounter.linePos(e.pos[0]), lineCounter.linePos(e.pos[1])]
  return doc
}

/**
 * yaml's messages that quote nothing of the document (only its own words, token types, an
 * indicator character), matched whole. Anything else is said by its code alone: a message that
 * a yaml upgrade adds is not repeated until it is seen to be safe.
 */
const QUOTES_NOTHING: readonly RegExp[] = [
  /^An alias node must not specify any properties$/,
  /^(Alias|Anchor) (cannot be an empty string|ending in : is ambiguous)$/,
  /^A (block sequence may not be used as an implicit map key|node can have at most one (anchor|tag))$/,
  /^All sequence items must start at the same column$/,
  /^Anchors and tags must be after the [?:-] indicator$/,
  /^Block (scalars?|collection) [a-z -]+$/,
  /^Comments must be separated from other tokens by white space characters$/,
  /^Excessive alias count indicates a resource exhaustion attack$/,
  /^Expected a flow scalar value, but found: [a-z-]+$/,
  /^Flow (map|sequence|end indicator) [a-z ]+(a [\]}])?$/,
  /^Implicit (map keys|keys)[a-z ]+$/,
  /^Map keys must be unique$/,
  /^Maximum call stack size exceeded$/,
  /^Missing [a-z ,:'"/-]+$/,
  /^Nested mappings are not allowed in compact mappings$/,
  /^Plain value cannot start with (block scalar indicator|reserved character|directive indicator character) [^\sA-Za-z0-9]$/,
  /^Sequence item without - indicator$/,
  /^Source contains multiple documents; please use YAML\.parseAllDocuments\(\)$/,
  /^Tabs are not allowed as indentation$/,
  /^Tags and anchors must be separated from the next token by white space$/,
  /^The : indicator must be at most 1024 chars after the start of an implicit (block mapping|flow sequence) key$/,
  /^Unexpected [a-z-]+ (token( in YAML (stream|document))?|at node end)$/,
  /^Unexpected [^\sA-Za-z0-9] in [a-z ]+$/,
  /^Unexpected (empty item in [a-z ]+|doc-end without preceding document|block-seq-ind on same line with key|token in block scalar header: [a-z-]+)$/,
  /^Unsupported token( \(type: [a-z-]+\)| [a-z-]+)$/,
  /^Verbatim tags must end with a >$/,
  /^(%TAG directive should contain exactly two parts|%YAML directive should contain exactly one part)$/,
  /^With stringKeys, all keys must be strings$/,
  ...[UNRESOLVED_ALIAS, YAML_1_1].map((m) => new RegExp('^' + m.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '$')),
]

/** What yaml says in words of its own for the codes whose messages quote the document. */
const REWORDED: Partial<Record<string, (message: string) => string>> = {
  TAG_RESOLVE_FAILED: () => 'a tagged value (!…) this reader does not take: quote a value that begins with !',
  BAD_DQ_ESCAPE: () => 'an escape sequence a double-quoted string does not have: write \\\\ for a backslash, or single-quote the value',
  BAD_DIRECTIVE: () => 'a directive (a line beginning with %) this reader does not take: quote a value that begins with %',
  UNEXPECTED_TOKEN: (m) =>
    m.startsWith('Block scalar header includes extra characters')
      ? 'a block scalar header (| or >) followed by other characters: quote a value that begins with | or >'
      : 'an unexpected token',
}

/**
 * What a yaml error or warning says, its first line without the position (`linePos` has it), in
 * words that quote nothing of the document.
 */
export function yamlErrorMessage(e: Pick<YAMLError, 'code' | 'message'>): string {
  // The position yaml appends (prettyErrors), and the token it quotes after an error token's message.
  const message = (e.message.split('\n')[0] ?? '').replace(/ at line \d+, column \d+:?$/, '').replace(/: ".*"$/, '')
  if (QUOTES_NOTHING.some((safe) => safe.test(message))) return message
  return REWORDED[e.code]?.(message) ?? `not YAML this reader takes (${e.code})`
}

/**
 * A yaml error as its line and words that quote none of the document's values: a duplicated key
 * is named (what the reported line holds before its colon: a key, never a value), a second
 * document pointed at; the rest as yamlErrorMessage says them. One wording for every file read.
 */
export function describeYamlProblem(e: YAMLError, text: string): { line: number | null; message: string } {
  const line = e.linePos ? e.linePos[0].line : null
  switch (e.code) {
    case 'DUPLICATE_KEY': {
      const held = line === null ? '' : (text.split('\n')[line - 1] ?? '')
      const key = held.slice((e.linePos?.[0].col ?? 1) - 1).split(':')[0]!.trim()
      return { line, message: key ? `duplicate key ${JSON.stringify(key.slice(0, 64))}` : 'duplicate key' }
    }
    case 'MULTIPLE_DOCS':
      return { line, message: 'a config file holds one YAML document; remove the second (after ---)' }
    default:
      return { line, message: yamlErrorMessage(e) }
  }
}

/** `doc` as data; what toJS throws (an alias bomb) as an Error whose message quotes nothing of the document. */
export function yamlData(doc: Document.Parsed, maxAliasCount = 100): unknown {
  try {
    return doc.toJS({ maxAliasCount })
  } catch (err) {
    const message = err instanceof Error ? err.message : ''
    if (/^Excessive alias count/.test(message)) throw new Error(`cannot expand YAML aliases: ${message}`)
    throw new Error(err instanceof RangeError ? 'the YAML nests too deeply' : 'cannot be read as data')
  }
}
