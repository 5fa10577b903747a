// The sidecar policy bundle the broker distributes: read from `broker.control.policy_file`,
// validated whole with the sidecar's own rules (proxy/policy/bundle.ts) before it is offered to any
// sidecar, and reloaded when the file changes (atomic rename and ConfigMap symlink swaps: the
// directory is watched, not the inode). A bad file is rejected and the bundle in force kept.
import { readFileSync, watch, type FSWatcher } from 'node:fs'
import { basename, dirname } from 'node:path'
import { compileBundle, policyWidenings, BundleError, type CompiledBundle } from '../../proxy/policy/bundle.js'
import { firstNonUtf8Line } from '../../lib/config/load.js'

export type BundleReload = { ok: true; bundle: CompiledBundle; document: string; widened: string[] } | { ok: false; reason: string }

export class PolicyBundleHolder {
  current: { bundle: CompiledBundle; document: string } | undefined
  private watcher: FSWatcher | undefined
  private timer: NodeJS.Timeout | undefined

  constructor(
    readonly file: string,
    private readonly maxBytes: number,
    private readonly onReload: (r: BundleReload) => void,
  ) {
    const first = this.read()
    if (!first.ok) throw new BundleError(first.reason)
    this.current = { bundle: first.bundle, document: first.document }
  }

  private read(): BundleReload {
    let bytes: Buffer
    try {
      bytes = readFileSync(this.file)
    } catch (err) {
      return { ok: false, reason: `${this.file}: cannot read policy file: ${(err as NodeJS.ErrnoException).code ?? 'error'}` }
    }
    // Read leniently, a Latin-1 `/café/**` deny rule would reach every sidecar and never match.
    const bad = firstNonUtf8Line(bytes)
    if (bad !== null) return { ok: false, reason: `${this.file}: line ${bad}: not valid UTF-8 (save the file as UTF-8)` }
    const text = bytes.toString('utf8')
    try {
      const bundle = compileBundle(text, this.file, this.maxBytes)
      // Sidecars receive the validated policy as JSON (defaults applied), not the file's text.
      return { ok: true, bundle, document: JSON.stringify(bundle.policy), widened: this.current ? policyWidenings(this.current.bundle.policy, bundle.policy) : [] }
    } catch (err) {
      return { ok: false, reason: err instanceof BundleError ? err.message : `${this.file}: ${(err as Error).message}` }
    }
  }

  reload(): void {
    const r = this.read()
    if (r.ok) {
      if (this.current && r.bundle.version === this.current.bundle.version) return
      this.current = { bundle: r.bundle, document: r.document }
    }
    this.onReload(r)
  }

  watch(): void {
    const base = basename(this.file)
    this.watcher = watch(dirname(this.file), { persistent: false }, (_event, changed) => {
      if (changed !== null && changed !== base && !String(changed).startsWith('..')) return
      clearTimeout(this.timer)
      this.timer = setTimeout(() => this.reload(), 50)
    })
  }

  close(): void {
    clearTimeout(this.timer)
    this.watcher?.close()
  }
}
