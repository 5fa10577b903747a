// A file a setting names (a certificate, a key), read at start-up: a missing or unreadable one is
// said in one line naming the setting, the path and why, not an ENOENT stack trace.
import { readFileSync } from 'node:fs'

export function readSettingFile(setting: string, path: string): Buffer {
  try {
    return readFileSync(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error'
    throw Object.assign(new Error(`${setting}: cannot read ${path} (${code})`), { code: 'LK_STARTUP' })
  }
}
