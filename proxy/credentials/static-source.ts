// The first CredentialSource: secrets read at start-up from a YAML/JSON file of name → value, or
// from environment variables `<env_prefix><NAME>`. They live in memory only. The file is read
// again on reload() (secrets-reload.ts: a change seen by stat, or SIGHUP), swapped whole or not at all.
import { byteSize, FileTooLarge, readFailure, readFileBounded } from '../../lib/bounded-read.js'
import { firstNonUtf8Line } from '../../lib/config/load.js'
import { parseYamlDocument, yamlErrorMessage } from '../../lib/yaml-document.js'
import type { Config } from '../../lib/config/schema.js'
import type { Credential, CredentialBinding, CredentialSource } from '../context.js'
import { LatchkeyError } from '../errors.js'
import { NONE_HELD } from './held.js'

/** The most secrets.file may be: a mapping of names to secrets is some KiB; /dev/zero is refused at this, not read without end. */
export const MAX_SECRETS_FILE_BYTES = 1024 * 1024

/** A start-up failure the CLI prints as one line for people (code LK_STARTUP), without a stack. */
function startupError(message: string): Error {
  return Object.assign(new Error(message), { code: 'LK_STARTUP' })
}

/** One complete set of secrets: what a read of env and secrets.file gave, swapped whole. */
interface SecretSet {
  readonly credentials: Map<string, Credential>
  /** Each secret as held() answers it: one array per secret (its value, then up to PREVIOUS_HELD before it), made once. */
  readonly heldByName: Map<string, readonly Credential[]>
  /** Names found but empty, and where: said so by missing(), not "in neither place". */
  readonly emptyIn: Map<string, 'env' | 'file'>
}

/** Values a secret had before a reload, still scrubbed from responses (an upstream may echo the old key), never sent. */
export const PREVIOUS_HELD = 2

/** What a reload of secrets.file did: `changed` swapped the set; `rejected` kept it (reason: one line, no secret in it). */
export type SecretsReload = { outcome: 'changed'; changed: number } | { outcome: 'unchanged' } | { outcome: 'rejected'; reason: string }

export class StaticSecretSource implements CredentialSource {
  /** The set in force: replaced whole by a reload, so a lookup sees one set or the other, never a mix. */
  private set: SecretSet
  private readonly prefix: string
  private readonly names: readonly string[]

  constructor(
    private readonly secrets: Pick<Config['secrets'], 'file' | 'env_prefix'>,
    names: Iterable<string>,
    private readonly env: NodeJS.ProcessEnv = process.env,
  ) {
    this.prefix = secrets.env_prefix
    this.names = [...new Set(names)]
    this.set = this.read(null)
  }

  /**
   * Reads secrets.file again with start-up's checks and swaps the whole set, or keeps the one in
   * force: when the file is refused (its reason is start-up's, quoting nothing of the file), when a
   * secret this source was built for is now missing or empty (start-up would have refused it), or
   * when `check` (the sidecar's: a value a header cannot carry) says why the new set cannot be used.
   * The environment still wins over the file, as at start-up.
   */
  reload(check?: (candidate: Pick<StaticSecretSource, 'secret'>) => string | null): SecretsReload {
    let next: SecretSet
    try {
      next = this.read(this.set)
    } catch (err) {
      return { outcome: 'rejected', reason: (err as Error).message }
    }
    for (const name of this.names) {
      if (this.set.credentials.has(name) && !next.credentials.has(name)) return { outcome: 'rejected', reason: `${this.missingIn(next, name)} (a credential needs it)` }
    }
    const problem = check?.({ secret: (name) => next.credentials.get(name)?.value }) ?? null
    if (problem !== null) return { outcome: 'rejected', reason: problem }
    let changed = 0
    for (const name of this.names) if (this.set.credentials.get(name)?.value !== next.credentials.get(name)?.value) changed++
    if (changed === 0) return { outcome: 'unchanged' }
    this.set = next
    return { outcome: 'changed', changed }
  }

  /** A set from env and secrets.file; `prior`'s values stay held (not sent) behind a changed one, and an unchanged secret keeps its objects. */
  private read(prior: SecretSet | null): SecretSet {
    const secrets = this.secrets
    const env = this.env
    const set: SecretSet = { credentials: new Map(), heldByName: new Map(), emptyIn: new Map() }
    // Own keys only (a null-prototype object): a secret named `constructor` or `toString` is not
    // found on Object.prototype.
    let fromFile: Record<string, unknown> = Object.create(null) as Record<string, unknown>
    if (secrets.file) {
      let parsed: unknown
      // Never echo the file's content: it is full of secrets. yaml's parse() writes each warning
      // (an unknown tag, a directive) to stderr with the line it is about, a secret in it: the
      // document is parsed without that, and any error or warning refused by its code and line.
      let bytes: Buffer
      try {
        bytes = readFileBounded(secrets.file, MAX_SECRETS_FILE_BYTES)
      } catch (err) {
        if (err instanceof FileTooLarge) throw startupError(`secrets.file ${secrets.file}: larger than ${byteSize(MAX_SECRETS_FILE_BYTES)}, the most a secrets file may be`)
        throw startupError(`secrets.file ${secrets.file}: cannot read (${readFailure(err)})`)
      }
      // Not UTF-8 is refused by line, as the config is: read leniently, a Latin-1 secret would be
      // sent with U+FFFD in place of its bytes, and refused upstream as a wrong credential.
      const bad = firstNonUtf8Line(bytes)
      if (bad !== null) throw startupError(`secrets.file ${secrets.file}: line ${bad}: not valid UTF-8 (save the file as UTF-8; the line is not quoted: it may hold a secret)`)
      const text = bytes.toString('utf8')
      const doc = parseYamlDocument(text)
      const problem = doc.errors[0] ?? doc.warnings[0]
      if (problem) {
        const line = text.slice(0, problem.pos[0]).split('\n').length
        // What is wrong in yaml's words where they quote nothing of the file (yamlErrorMessage).
        throw startupError(`secrets.file ${secrets.file}: not YAML this sidecar reads (${problem.code} at line ${line}; the line is not quoted: it may hold a secret): ${yamlErrorMessage(problem)}`)
      }
      try {
        parsed = doc.toJS()
      } catch (err) {
        throw startupError(`secrets.file ${secrets.file}: cannot be read as data (${(err as { code?: string }).code ?? 'invalid YAML'})`)
      }
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw startupError(`secrets.file ${secrets.file}: must be a mapping of name to secret`)
      fromFile = Object.assign(fromFile, parsed)
    }
    for (const name of this.names) {
      // An empty variable is set, and read first: it is not passed over for the file's value (an
      // operator who emptied it meant something), and the refusal says it is empty, not absent.
      const fromEnv = Object.hasOwn(env, secrets.env_prefix + name) ? env[secrets.env_prefix + name] : undefined
      const value = fromEnv ?? fromFile[name]
      if (fromEnv === undefined && value === null) {
        // `NAME:` with nothing after it: present, and empty.
        set.emptyIn.set(name, 'file')
        continue
      }
      // Present but unusable says so, and never what it held: YAML reads 12345 as a number.
      if (value !== undefined && typeof value !== 'string') {
        throw startupError(`secrets.file ${secrets.file}: ${secretNamed(name)} is not a string (quote it)`)
      }
      if (value === '') set.emptyIn.set(name, fromEnv === undefined ? 'file' : 'env')
      if (typeof value === 'string' && value.length > 0) {
        const was = prior?.heldByName.get(name)
        if (was !== undefined && was[0]!.value === value) {
          // Unchanged: the same objects, so a scrubber's needles cached by the array stay good.
          set.credentials.set(name, was[0]!)
          set.heldByName.set(name, was)
          continue
        }
        const c: Credential = { value, id: `static:${name}`, expiresAt: null, scopes: [] }
        set.credentials.set(name, c)
        // The values before it stay held, the last PREVIOUS_HELD of them, none twice: still scrubbed.
        const previous = (was ?? []).filter((p) => p.value !== value).slice(0, PREVIOUS_HELD)
        set.heldByName.set(name, Object.freeze([c, ...previous]))
      }
    }
    return set
  }

  /** A named secret's value, for providers that hold one (a client secret). */
  secret(name: string): string | undefined {
    return this.set.credentials.get(name)?.value
  }

  has(name: string): boolean {
    return this.set.credentials.has(name)
  }

  /** Why a secret this source was asked for is not held: empty where it was found, or in neither place. */
  missing(name: string): string {
    return this.missingIn(this.set, name)
  }

  private missingIn(set: SecretSet, name: string): string {
    const where = set.emptyIn.get(name)
    const shown = nameShown(name)
    const env = `${this.prefix}${shown ?? '<name>'}`
    const unnamed = shown === null ? ` ${NOT_REPEATED}` : ''
    if (where === 'env') return `${secretNamed(name)}: env ${env} is set but empty (it is read before secrets.file: unset it, or set it to the secret)${unnamed}`
    if (where === 'file') return `${secretNamed(name)} is empty in secrets.file${unnamed}`
    return missingSecret(name, this.prefix)
  }

  get(binding: CredentialBinding): Credential {
    const c = this.set.credentials.get(binding.secret)
    // Fail closed: an audience with a binding but no secret gets no request at all.
    if (!c) throw new LatchkeyError('LK_CREDENTIAL_UNAVAILABLE', `no secret "${binding.secret}" is configured for credential ${binding.id}`)
    return c
  }

  /** The binding's one secret: nothing else is ever sent where it goes. */
  held(binding: CredentialBinding): readonly Credential[] {
    return this.set.heldByName.get(binding.secret) ?? NONE_HELD
  }
}

/**
 * Why a secret a setting names was not found, naming it only when it is written as a name is
 * (`GITHUB_TOKEN`, `github_token`): anything else (mixed case, `-`, `.`, long) may be the secret
 * itself, pasted where its name belongs, and a start-up error goes to the logs.
 */
function missingSecret(name: string, prefix: string): string {
  if (nameShown(name) !== null) return `secret ${name} is neither in env ${prefix}${name} nor in secrets.file`
  return `the secret it names is neither in env ${prefix}<name> nor in secrets.file ${NOT_REPEATED}`
}

const NOT_REPEATED = '(the name is not repeated: it is not written as a name is, and may be a secret pasted in its place)'

/** `name` when it is written as a name is, else null: it may be the secret itself. */
function nameShown(name: string): string | null {
  return /^(?:[A-Z][A-Z0-9_]{0,39}|[a-z][a-z0-9_]{0,39})$/.test(name) ? name : null
}

/** "secret NAME", or "the secret it names" when the name may be a secret (see missingSecret). */
function secretNamed(name: string): string {
  const shown = nameShown(name)
  return shown === null ? 'the secret it names' : `secret ${shown}`
}
