// The sidecar policy bundle the broker distributes: read from `broker.control.policy_file`,
// validated whole with the sidecar's own rules (proxy/policy/bundle.ts) before it is offered to any
// sidecar, and reloaded when the file changes, however it is replaced (proxy/policy/file.ts). A bad
// file is rejected and the bundle in force kept.
import { compileBundle, policyWidenings, BundleError, type CompiledBundle } from '../../proxy/policy/bundle.js'
import { readPolicyText, watchPolicyFile } from '../../proxy/policy/file.js'

export type BundleReload = { ok: true; bundle: CompiledBundle; document: string; widened: string[] } | { ok: false; reason: string }

export class PolicyBundleHolder {
  current: { bundle: CompiledBundle; document: string } | undefined
  private watcher: { close(): void } | undefined

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
    const read = readPolicyText(this.file, this.maxBytes)
    if (!read.ok) return { ok: false, reason: read.reason }
    const text = read.text
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
    this.watcher = watchPolicyFile(this.file, () => this.reload())
  }

  close(): void {
    this.watcher?.close()
  }
}
