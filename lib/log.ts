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

export function createLogger(level: string, name: string, destination?: DestinationStream): Logger {
  const options = {
    level,
    name,
    base: { pid: process.pid },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  }
  return destination ? pino(options, destination) : pino(options)
}

export type { Logger }
