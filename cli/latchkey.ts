#!/usr/bin/env node
// The one CLI: `latchkey sidecar|broker|collector|up|check-config|revoke|audit`. Each command
// validates its config before doing anything and exits non-zero with the problem named. Each
// loads only its own process's modules (dynamic imports): a sidecar never carries the broker's
// or the collector's code, which is memory the sidecar's RSS budget cannot spare, and an
// operator's `latchkey audit` or `revoke` starts without the config loader, the logger or the
// servers (0.2 s of CPU, not 0.6).
import { readFileSync } from 'node:fs'
import { Command } from 'commander'
import type { Config } from '../lib/config/schema.js'
import type { ConfigProblem } from '../lib/config/load.js'
import { exitNow } from '../lib/stuck-io.js'
import { describeFailure } from './describe-failure.js'

// SIGHUP: a sidecar reloads its policy and reopens its audit file (its own listener). A broker,
// a collector or `up` has nothing it reloads, and the default action ended it at once (exit
// 129), undrained, for the signal operators are taught to send a sidecar. Installed before any
// command starts, and never removed: a SIGHUP while a sidecar started, or in the moments after
// its own listener went at the end of its drain, ended it so too, its calls unrecorded.
process.on('SIGHUP', () => {
  if (process.listenerCount('SIGHUP') === 1) console.error('SIGHUP ignored: this process reloads nothing on it now (SIGTERM stops it)')
})

// grpc-js writes its own line to stderr before our error (`E No address added out of total 1
// resolved` above "collector.grpc: cannot listen on …: the address is already in use"); every
// failure it sees reaches us as an error we say in our words. GRPC_VERBOSITY set by the operator
// (ERROR, DEBUG) brings its lines back. Read when grpc-js loads, so set before any command does.
process.env.GRPC_VERBOSITY ??= 'NONE'

const program = new Command()
program
  .name('latchkey')
  .description('Short-lived, task-scoped credentials for AI agents, injected by a localhost sidecar.')
  .version(packageVersion(), '-V, --version')

/** package.json is one level above cli/ (run from source) or two above dist/cli/ (built, and in the image). */
function packageVersion(): string {
  for (const where of ['../package.json', '../../package.json']) {
    try {
      return (JSON.parse(readFileSync(new URL(where, import.meta.url), 'utf8')) as { version: string }).version
    } catch {
      // not here: the other place
    }
  }
  return 'unknown'
}

async function loadConfigFile(file: string): Promise<Config> {
  return (await import('../lib/config/load.js')).loadConfigFile(file)
}

async function configError(source: string, problems: ConfigProblem[]): Promise<Error> {
  return new (await import('../lib/config/load.js')).ConfigError(source, problems)
}

function fail(err: unknown): never {
  // ConfigError (LK_CONFIG_INVALID), StartupError (LK_STARTUP) and the registry's errors carry
  // messages meant for people; a system error left unwrapped is still one line.
  console.error(describeFailure(err))
  process.exit(1)
}

/**
 * SIGTERM/SIGINT: stop accepting, drain, flush, exit. A second signal ends the drain at once:
 * what is still open is cut and recorded, the audit flushed, then exit (1); a third, or 5 s
 * more, exits there and then. While an append to a hung disk is stuck in the thread pool, the
 * process ends by the signal instead of exit(1) (see lib/stuck-io.ts).
 */
export function onShutdown(close: (urgent?: boolean) => Promise<void>): void {
  let signals = 0
  // exitNow, not process.exit: with a thread of the pool stuck in a hung disk's write, exit would
  // wait for it for ever (lib/stuck-io.ts); the process then ends by the signal it was sent.
  const handler = (signal: NodeJS.Signals) => {
    if (++signals === 3) return exitNow(1, signal)
    if (signals === 2) {
      setTimeout(() => exitNow(1, signal), 5_000).unref()
      void close(true).then(
        () => exitNow(1, signal),
        () => exitNow(1, signal),
      )
      return
    }
    close().then(
      // The drain a second signal cut short ends here too, on the same close: not clean.
      () => exitNow(signals > 1 ? 1 : 0, signal),
      (err) => {
        console.error(`shutdown after ${signal} failed: ${describeFailure(err)}`)
        exitNow(1, signal)
      },
    )
  }
  process.on('SIGTERM', () => handler('SIGTERM'))
  process.on('SIGINT', () => handler('SIGINT'))
}

program
  .command('sidecar')
  .description('run the egress sidecar for one agent instance')
  .requiredOption('-c, --config <file>', 'config file (YAML, version: 1)')
  .action(async (opts: { config: string }) => {
    try {
      const config = await loadConfigFile(opts.config)
      const { startSidecar } = await import('../proxy/sidecar.js')
      const sidecar = await startSidecar(config, { reloadOnSighup: true })
      onShutdown(sidecar.close)
    } catch (err) {
      fail(err)
    }
  })

program
  .command('broker')
  .description('run the broker: workload attestation, RFC 8693 token exchange, JWKS, revocations')
  .requiredOption('-c, --config <file>', 'config file (YAML, version: 1) with a broker section')
  .action(async (opts: { config: string }) => {
    try {
      const config = await loadConfigFile(opts.config)
      if (!config.broker) throw await configError(opts.config, [{ path: 'broker', message: 'required by `latchkey broker`' }])
      const [{ startBroker }, { createLogger }] = await Promise.all([import('../broker/broker.js'), import('../lib/log.js')])
      const broker = await startBroker(config.broker, { logger: createLogger(config.log.level, 'latchkey-broker') })
      onShutdown(broker.close)
    } catch (err) {
      fail(err)
    }
  })

for (const [name, op] of [['revoke', 'revoke'], ['unrevoke', 'unrevoke']] as const) {
  // unrevoke takes no --reason: the broker's DELETE records none, and an option silently dropped would mislead.
  const command = program
    .command(name)
    .description(op === 'revoke' ? 'revoke an agent instance, a task or a token (jti) at the broker' : 'lift a revocation')
    .argument('[agent]', 'agent instance ID, agent:<type>:<env>:<instance>, or a pattern with * for whole segments (agent:<type>:*:*)')
    .option('--task <id>', 'a task ID instead of an agent')
    .option('--jti <id>', 'a token ID instead of an agent')
  if (op === 'revoke') command.option('--reason <text>', 'why (recorded in the audit trail)')
  command
    // Not the environment's value as commander's default: --help prints a default, and a URL can carry a password.
    .option('--broker <url>', 'broker base URL (default: $LATCHKEY_BROKER_URL, else http://127.0.0.1:15003)')
    .option('--token-env <name>', 'environment variable holding the admin token', 'LATCHKEY_BROKER_ADMIN_TOKEN')
    .action(async (agent: string | undefined, opts: { task?: string; jti?: string; reason?: string; broker?: string; tokenEnv: string }) => {
      const { revokeCommand } = await import('./revoke.js')
      process.exitCode = await revokeCommand(op, agent, opts)
    })
}

program
  .command('check-config')
  .description("validate a config file (sidecar, broker or collector) or the broker's agent registry and exit: 0 when valid, 1 with each problem named")
  .argument('<file>', 'config file or agent registry (agents.yaml)')
  .action(async (file: string) => {
    // The work is cli/check-config.ts's; this prints its result and exits with its code.
    const { checkConfig } = await import('./check-config.js')
    const { code, stdout, stderr } = await checkConfig(file, process.env)
    if (stderr) process.stderr.write(stderr)
    if (stdout) process.stdout.write(stdout)
    if (code !== 0) process.exit(code)
  })

program
  .command('up')
  .description('start the local system: broker, collector, a sidecar with the example policy and a demo upstream')
  .option('-c, --config <file>', 'config file (the demo upstream listens where its routes.demo points)', '')
  .action(async (opts: { config: string }) => {
    try {
      const { runUp } = await import('./up.js')
      const running = await runUp(opts)
      onShutdown(running.close)
    } catch (err) {
      fail(err)
    }
  })

// The collector's commands (collector, audit) bring its stores and gRPC server; a process started
// for another command does not load them.
const OWN_COMMANDS = new Set(['sidecar', 'broker', 'up', 'check-config', 'revoke', 'unrevoke'])
if (!OWN_COMMANDS.has(process.argv[2] ?? '')) (await import('../collector/cli.js')).registerCollectorCommands(program, onShutdown)

await program.parseAsync(process.argv)
