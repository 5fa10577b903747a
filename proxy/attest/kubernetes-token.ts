// The projected service-account token file. The kubelet rotates it (an atomic symlink swap of
// the ..data directory), so it is re-read whenever its mtime or inode changes; the file is the
// truth, never a copy kept past its replacement.
import { readFile, stat } from 'node:fs/promises'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'

/** A service-account token is a JWT of a few KiB; a file much larger is not one (or never ends: /dev/zero). */
const MAX_TOKEN_FILE_BYTES = 64 * 1024

export class KubernetesTokenFile implements WorkloadEvidence {
  readonly kind = 'kubernetes'
  readonly tokenType = TOKEN_TYPES.kubernetes
  private cached: { token: string; mtimeMs: number; ino: number } | undefined

  constructor(private readonly file: string) {}

  async get(): Promise<string> {
    let st
    try {
      st = await stat(this.file)
    } catch (err) {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: ${(err as NodeJS.ErrnoException).code ?? 'unreadable'}`)
    }
    if (this.cached && this.cached.mtimeMs === st.mtimeMs && this.cached.ino === st.ino) return this.cached.token
    // Read whole, and on a call's path: a device or FIFO would never end, a huge file would stall it.
    if (!st.isFile()) throw new EvidenceUnavailable(`service-account token file ${this.file}: not a regular file`)
    if (st.size > MAX_TOKEN_FILE_BYTES) throw new EvidenceUnavailable(`service-account token file ${this.file}: ${st.size} bytes, more than a token (${MAX_TOKEN_FILE_BYTES})`)
    const token = (await readFile(this.file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: ${err.code ?? 'unreadable'}`)
    })).trim()
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(token)) throw new EvidenceUnavailable(`service-account token file ${this.file} does not hold a JWT`)
    this.cached = { token, mtimeMs: st.mtimeMs, ino: st.ino }
    return token
  }

  close(): void {}
}
