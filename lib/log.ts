// pino, with every header and field that could carry a secret censored by path. The canonical
// call line is built from the audit event, which never holds a credential; the redaction list
// is the second line of defence for anything logged by mistake.
import { pino, type Logger, type DestinationStream } from 'pino'

export const REDACT_PATHS = [
  'headers.authorization',
  'headers["proxy-authorization"]',
  'headers.cookie',
  'headers["set-cookie"]',
  'headers["x-api-key"]',
  'req.headers.authorization',
  'req.headers["proxy-authorization"]',
  'req.headers.cookie',
  '*.authorization',
  '*.token',
  '*.secret',
  '*.password',
  'token',
  'secret',
  'password',
  'credential.value',
]

/**
 * What stdout may hold unwritten while nothing reads it (a stalled log pipe): past it, lines are
 * dropped, not heaped up in memory (pino's own default keeps them all, one line per call).
 */
const LOG_BUFFER_MAX = 16 * 1024 * 1024
/** How long the last flush, as the process exits, waits for a reader that does not read. */
const EXIT_FLUSH_MS = 2_000

const stdoutDestinations = new Set<{ flushSync(): void }>()
let exiting = false
let exitFlushRegistered = false
let waitingSince = 0

/**
 * stdout as pino's default destination is (asynchronous), but bounded, and with an exit that
 * does not wait for ever: pino flushes it synchronously at exit, retrying a full pipe every
 * 100 ms without end, so a sidecar whose log reader had stopped never exited on SIGTERM (nor on
 * a second or third: its event loop was held). At exit, what a reader has not taken within
 * EXIT_FLUSH_MS is dropped.
 */
function stdoutDestination(): DestinationStream {
  if (!exitFlushRegistered) {
    exitFlushRegistered = true
    // Before pino's own exit flush (registered with the first destination), so it finds nothing left.
    process.prependListener('exit', () => {
      exiting = true
      for (const d of stdoutDestinations) {
        try {
          d.flushSync()
        } catch {
          // Not taken in time, or not open: dropped.
        }
        d.flushSync = () => {}
      }
    })
  }
  const destination = pino.destination({
    fd: process.stdout.fd ?? 1,
    sync: false,
    maxLength: LOG_BUFFER_MAX,
    retryEAGAIN: () => {
      if (!exiting) return true
      waitingSince ||= Date.now()
      return Date.now() - waitingSince < EXIT_FLUSH_MS
    },
  })
  stdoutDestinations.add(destination)
  destination.once('close', () => stdoutDestinations.delete(destination))
  return destination
}

export function createLogger(level: string, name: string, destination?: DestinationStream): Logger {
  const options = {
    level,
    name,
    base: { pid: process.pid },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  }
  return pino(options, destination ?? stdoutDestination())
}

export type { Logger }
