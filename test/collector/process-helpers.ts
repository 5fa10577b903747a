// Collector and sidecar as real child processes (`latchkey collector|sidecar`), to SIGKILL them.
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { stringify } from 'yaml'
import { CLI } from '../helpers/cli.js'

export interface Child {
  proc: ChildProcess
  output: () => string
  kill(signal?: NodeJS.Signals): Promise<void>
}

/** Starts `latchkey <args>` and resolves once `ready` appears in its output. */
export async function startChild(args: string[], ready: RegExp, env: NodeJS.ProcessEnv = {}, timeoutMs = 20_000): Promise<Child> {
  const proc = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()))
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()))
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${args[0]} did not start in ${timeoutMs} ms:\n${out.slice(-2000)}`)), timeoutMs)
    const check = () => {
      if (ready.test(out)) {
        clearTimeout(timer)
        proc.stdout!.off('data', check)
        resolve()
      }
    }
    proc.stdout!.on('data', check)
    proc.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`${args[0]} exited with ${code} before it was ready:\n${out.slice(-2000)}`))
    })
  })
  return {
    proc,
    output: () => out,
    kill: async (signal = 'SIGKILL') => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal)
      await exited
    },
  }
}

export function writeYaml(path: string, value: unknown): string {
  writeFileSync(path, stringify(value))
  return path
}

/**
 * Calls through the proxy with `concurrency` workers until stop() is called; records each 200's
 * path. Flat out, unless pace(ms) has each worker wait that long between its calls (pace(0) ends it).
 */
export function loadGenerator(proxyUrl: () => string, origin: string, prefix: string, concurrency = 6) {
  const ok: string[] = []
  const attempted: string[] = []
  let n = 0
  let running = true
  let pauseMs = 0
  const worker = async () => {
    const { request, ProxyAgent } = await import('undici')
    let agent = new ProxyAgent({ uri: proxyUrl(), proxyTunnel: false })
    while (running) {
      const path = `${prefix}/${n++}`
      attempted.push(path)
      try {
        const r = await request(origin + path, { dispatcher: agent, headersTimeout: 5000, bodyTimeout: 5000 })
        const body = await r.body.text()
        if (r.statusCode === 200 && body === 'ok') ok.push(path)
        if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs))
      } catch {
        // The sidecar was killed mid-call, or is not up yet: the call did not complete.
        await agent.close().catch(() => {})
        agent = new ProxyAgent({ uri: proxyUrl(), proxyTunnel: false })
        await new Promise((r) => setTimeout(r, 20))
      }
    }
    await agent.close().catch(() => {})
  }
  const workers = Array.from({ length: concurrency }, worker)
  return {
    ok,
    attempted,
    pace: (ms: number) => void (pauseMs = ms),
    stop: async () => {
      running = false
      await Promise.all(workers)
    },
  }
}
