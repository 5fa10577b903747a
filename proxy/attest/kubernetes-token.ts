// The projected service-account token file. The kubelet rotates it (an atomic symlink swap of
// the ..data directory), so it is re-read whenever its mtime or inode changes; the file is the
// truth, never a copy kept past its replacement.
import { readFile, stat } from 'node:fs/promises'
import { decodeJwt } from 'jose'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'

/** A service-account token is a JWT of a few KiB; a file much larger is not one (or never ends: /dev/zero). */
const MAX_TOKEN_FILE_BYTES = 64 * 1024

export class KubernetesTokenFile implements WorkloadEvidence {
  readonly kind = 'kubernetes'
  readonly tokenType = TOKEN_TYPES.kubernetes
  private cached: { token: string; mtimeMs: number; ino: number; expMs: number | null } | undefined
  private readonly now: () => number

  constructor(
    private readonly file: string,
    opts: { now?: () => number } = {},
  ) {
    this.now = opts.now ?? Date.now
  }

  async get(): Promise<string> {
    let st
    try {
      st = await stat(this.file)
    } catch (err) {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: ${(err as NodeJS.ErrnoException).code ?? 'unreadable'}`)
    }
    if (this.cached && this.cached.mtimeMs === st.mtimeMs && this.cached.ino === st.ino) return this.unexpired(this.cached)
    // Read whole, and on a call's path: a device or FIFO would never end, a huge file would stall it.
    if (!st.isFile()) throw new EvidenceUnavailable(`service-account token file ${this.file}: not a regular file`)
    if (st.size > MAX_TOKEN_FILE_BYTES) throw new EvidenceUnavailable(`service-account token file ${this.file}: ${st.size} bytes, more than a token (${MAX_TOKEN_FILE_BYTES})`)
    const token = (await readFile(this.file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: ${err.code ?? 'unreadable'}`)
    })).trim()
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(token)) throw new EvidenceUnavailable(`service-account token file ${this.file} does not hold a JWT`)
    // exp read, not verified (the broker verifies): only so an expired token is not presented.
    let exp: unknown
    try {
      exp = decodeJwt(token).exp
    } catch {
      throw new EvidenceUnavailable(`service-account token file ${this.file} does not hold a JWT`)
    }
    this.cached = { token, mtimeMs: st.mtimeMs, ino: st.ino, expMs: typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : null }
    return this.unexpired(this.cached)
  }

  /**
   * The token, unless its exp has passed on this clock: a kubelet that stopped replacing the file
   * (the pod's projection gone, the node's kubelet down) left it to the broker to refuse, a 400
   * the agent read as a refusal of its task (403, not retryable) naming no file.
   */
  private unexpired(c: { token: string; expMs: number | null }): string {
    const now = this.now()
    if (c.expMs !== null && c.expMs <= now) {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: the token in it expired ${Math.ceil((now - c.expMs) / 1000)} s ago and has not been replaced (the kubelet rotates it; is the projected volume mounted?)`)
    }
    return c.token
  }

  close(): void {}
}
