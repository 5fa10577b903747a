// Work blocked in libuv's thread pool (an append to a hung disk) holds process.exit() for ever:
// exit joins the pool's threads first (nodejs/node#35021), and a thread in write(2) to a hung
// NFS or EBS volume does not return. Whoever starts such work says so here while it is
// outstanding past its bound, and the shutdown then ends the process by signal instead.

let stuck = 0

/** Thread-pool work has been outstanding past its bound (called once per such piece of work). */
export function markStuck(): void {
  stuck++
}

/** That work completed after all. */
export function unmarkStuck(): void {
  stuck = Math.max(0, stuck - 1)
}

/**
 * Ends the process with `code`; or, while thread-pool work is stuck, by `signal` with its
 * default action restored (exit status 128 + the signal's number), which waits on no thread.
 */
export function exitNow(code: number, signal: NodeJS.Signals): void {
  // process.exit() would wait for ever on a thread that does not return.
  if (stuck === 0) process.exit(code)
  process.removeAllListeners(signal)
  process.kill(process.pid, signal)
}
