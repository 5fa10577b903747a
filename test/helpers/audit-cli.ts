// `latchkey audit …` in-process: the collector's operator commands (collector/cli.ts) registered
// on a commander program of their own, parsing the same argv, printing into strings, their exit
// code kept. A CLI start is ~0.25 s of CPU; files that ask the same commands many times run most
// of them so, and a few through the CLI itself (helpers/cli.ts), which proves the wiring.
import { Command, CommanderError } from 'commander'
import { failureLine, registerCollectorCommands } from '../../collector/cli.js'

export interface CliRun {
  code: number
  stdout: string
  stderr: string
}

/** `args` as after `latchkey`, e.g. ['audit', 'verify', '-c', file]. */
export async function auditInProcess(args: string[]): Promise<CliRun> {
  let stdout = ''
  let stderr = ''
  let code = 0
  let failed = false
  const program = new Command().name('latchkey').exitOverride()
  program.configureOutput({ writeOut: (s) => void (stdout += s), writeErr: (s) => void (stderr += s) })
  registerCollectorCommands(program, () => {}, {
    out: (line) => void (stdout += `${line}\n`),
    err: (line) => void (stderr += `${line}\n`),
    exitCode: (c) => void (code = c),
    fail: (err) => {
      // The process would exit here: nothing after it is printed.
      if (failed) return
      failed = true
      stderr += `${failureLine(err)}\n`
      code = 1
    },
  })
  try {
    await program.parseAsync(args, { from: 'user' })
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err
    code = err.exitCode
  }
  return { code, stdout, stderr }
}
