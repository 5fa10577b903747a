// Shared by the start-up error tests (test/startup-errors/*.test.ts): start-up failures of the
// real processes (`latchkey broker|sidecar|collector`) are one line per problem, naming the
// setting and the file, never a stack trace; and `check-config` says the same of the same config:
// a file whose content is wrong makes it invalid (exit 1), a file missing on this machine is a
// warning naming the setting (a mounted secret may be there where it runs). check-config is
// judged in-process, by the function the command prints the result of (cli/check-config.ts): a
// CLI start is ~0.3 s of CPU and these files checked 23 configs; config.test, and one case each
// in sidecar.test and collector.test, run the command itself. In three files, not
// one: each is a run of CLI starts one after another, and one file of them all ran last and alone
// in the suite for 20-30 s.
import type { Test } from 'tap'
import { spawnSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI } from '../helpers/cli.js'
import { checkConfig } from '../../cli/check-config.js'

export const dir = mkdtempSync(join(tmpdir(), 'lk-startup-'))
export const latchkey = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  // SIGKILL at the timeout: a process that started (when it should not have) may not stop on SIGTERM.
  spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL', env: { ...process.env, ...env } })
/** What a person reads: the process's own JSON log lines left out. */
export const said = (stderr: string) =>
  stderr
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('{'))
    .join('\n')

/** Exits 1 with `lines` (each a RegExp matched whole, in order), no stack trace. */
export function refuses(t: Test, r: ReturnType<typeof latchkey>, lines: RegExp[], what: string): void {
  t.equal(r.status, 1, `${what}: exits 1`)
  const text = said(r.stderr)
  t.notMatch(text, /^\s+at /m, `${what}: no stack trace`)
  const got = text.split('\n')
  t.equal(got.length, lines.length, `${what}: ${lines.length} line(s): ${JSON.stringify(text)}`)
  lines.forEach((re, i) => t.match(got[i] ?? '', re, `${what}: line ${i + 1} names the setting and the file`))
}

/** check-config: invalid, with `problem` among the problems. */
export async function checkRefuses(t: Test, file: string, problem: RegExp, env: NodeJS.ProcessEnv = {}): Promise<void> {
  const r = await checkConfig(file, { ...process.env, ...env })
  t.equal(r.code, 1, `check-config ${file}: invalid`)
  t.match(r.stderr, /invalid configuration:\n/, 'said as a configuration problem')
  t.match(r.stderr, problem, 'the problem named')
  t.notMatch(r.stderr, /^\s+at /m, 'no stack trace')
}

/** check-config: valid, with a warning naming the setting. */
export async function checkWarns(t: Test, file: string, warning: RegExp, env: NodeJS.ProcessEnv = {}): Promise<void> {
  const r = await checkConfig(file, { ...process.env, ...env })
  t.equal(r.code, 0, `check-config ${file}: valid on this machine's terms`)
  t.match(r.stderr, warning, 'with a warning naming the setting and the file')
}

/** `s` exactly, as a whole line. */
export const re = (s: string) => new RegExp(`^${s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`, 'm')
