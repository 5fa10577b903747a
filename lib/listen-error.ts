// A listener that cannot start, said in one line that names the setting, the address and why:
// what `latchkey` prints instead of a stack trace (its errors with code LK_STARTUP are for people).
export function listenError(setting: string, host: string, port: number, err: unknown): Error {
  const e = err as { code?: string; message?: string }
  const text = `${e.code ?? ''} ${e.message ?? ''}`
  const why = text.includes('EADDRINUSE') ? 'the address is already in use' : text.includes('EACCES') ? 'permission denied' : text.includes('EADDRNOTAVAIL') ? 'no such local address' : (e.code ?? e.message ?? 'error')
  return Object.assign(new Error(`${setting}: cannot listen on ${host}:${port}: ${why}`), { code: 'LK_STARTUP' })
}
