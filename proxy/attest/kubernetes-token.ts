// The projected service-account token file. The kubelet rotates it (an atomic symlink swap of
// the ..data directory), so it is re-read whenever its mtime or inode changes; the file is the
// truth, never a copy kept past its replacement.
import { readFile, stat } from 'node:fs/promises'
import { TOKEN_TYPES } from '../../lib/oauth.js'
import { EvidenceUnavailable, type WorkloadEvidence } from './evidence.js'

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
    const token = (await readFile(this.file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw new EvidenceUnavailable(`service-account token file ${this.file}: ${err.code ?? 'unreadable'}`)
    })).trim()
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(token)) throw new EvidenceUnavailable(`service-account token file ${this.file} does not hold a JWT`)
    this.cached = { token, mtimeMs: st.mtimeMs, ino: st.ino }
    return token
  }

  close(): void {}
}
