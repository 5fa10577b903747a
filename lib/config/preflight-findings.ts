// What a preflight (proxy/preflight.ts, broker/preflight.ts, collector/config.ts) finds in the
// files a config points at, sorted as check-config reports it: `errors`, a file's content is wrong
// (the config is invalid); `onThisMachine`, a file is missing or unreadable here, which the machine
// the config is meant for may have (a mounted secret): said, not held against the config.
import type { ConfigProblem } from './load.js'
import { readFailure } from '../bounded-read.js'

export class PreflightFindings {
  readonly errors: ConfigProblem[] = []
  readonly onThisMachine: ConfigProblem[] = []
  /** Policy rules in force at start when a file other than the config holds them (sidecar.policy_file). */
  rules: number | undefined = undefined

  /** A problem with the file `path` (a setting) names: missing or unreadable here when `unreadable`, else wrong. */
  add(path: string, message: string, unreadable: boolean): void {
    ;(unreadable ? this.onThisMachine : this.errors).push({ path, message })
  }

  /** `file`, which the setting `path` names, could not be read here. */
  cannotRead(path: string, file: string, err: unknown): void {
    this.onThisMachine.push({ path, message: `${file}: cannot read (${readFailure(err)})` })
  }
}
