// A file a setting names (a certificate, a key), read at start-up: a missing or unreadable one is
// said in one line naming the setting, the path and why, not an ENOENT stack trace.
import { MAX_SETTING_FILE_BYTES, readFailure, readFileBounded } from './bounded-read.js'

export function readSettingFile(setting: string, path: string): Buffer {
  try {
    return readFileBounded(path, MAX_SETTING_FILE_BYTES)
  } catch (err) {
    throw Object.assign(new Error(`${setting}: cannot read ${path} (${readFailure(err)})`), { code: 'LK_STARTUP' })
  }
}
