// Which process on this host is calling: the connection's peer address and port are looked up
// in /proc/net/tcp{,6} (the row gives the socket's uid and inode), the inode among every
// process's open file descriptors (its pid), and the pid's executable, hashed. Done once per
// connection, off the request path of every later request on it; the result is kept on the
// socket. Policy can then refuse callers that are not the agent; the audit says who called.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { readFile, readdir, readlink, stat } from 'node:fs/promises'
import type { Socket } from 'node:net'
import ipaddr from 'ipaddr.js'
import { processIp } from '../../lib/ip-address.js'
import { LRUCache } from 'lru-cache'
import type { CallerProcess } from '../context.js'
import { LatchkeyError } from '../errors.js'

export interface CallerPolicy {
  /** uids allowed to use the sidecar; empty: any. */
  allowedUids: readonly number[]
  /** sha256 (hex) of executables allowed to use the sidecar; empty: any. */
  allowedExecutables: readonly string[]
}

/** "0100007F:1F90" (IPv4, little-endian) or 32 hex digits of IPv6 in 4 little-endian words. */
function parseProcAddress(hex: string): { address: string; port: number } | null {
  const [a, p] = hex.split(':')
  if (!a || !p) return null
  const port = parseInt(p, 16)
  if (a.length === 8) {
    const n = parseInt(a, 16)
    return { address: [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, n >>> 24].join('.'), port }
  }
  if (a.length === 32) {
    const bytes: number[] = []
    for (let w = 0; w < 4; w++) {
      const word = a.slice(w * 8, w * 8 + 8)
      for (let i = 3; i >= 0; i--) bytes.push(parseInt(word.slice(i * 2, i * 2 + 2), 16))
    }
    return { address: ipaddr.fromByteArray(bytes).toString(), port }
  }
  return null
}

function canonical(address: string): string {
  try {
    const a = processIp(address)
    return a.toString()
  } catch {
    return address
  }
}

/** The uid and inode of the peer's end of this connection, from /proc/net/tcp and tcp6. */
async function findSocket(peer: { address: string; port: number }, local: { address: string; port: number }): Promise<{ uid: number; inode: string } | null> {
  const want = canonical(peer.address)
  const ours = canonical(local.address)
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string
    try {
      text = await readFile(table, 'utf8')
    } catch {
      continue
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/)
      if (f.length < 10) continue
      const l = parseProcAddress(f[1]!)
      const r = parseProcAddress(f[2]!)
      if (!l || !r || l.port !== peer.port || r.port !== local.port) continue
      if (canonical(l.address) !== want || canonical(r.address) !== ours) continue
      return { uid: Number(f[7]), inode: f[9]! }
    }
  }
  return null
}

/**
 * Every process holding this socket, lowest pid first. All of them, not the first found: a socket
 * may be held by several (inherited across fork and exec, or passed over a unix socket), and the
 * first in /proc's order is only the lowest pid. A caller spawning an allowed executable with the
 * connection inherited, then writing on it from a later process, was that executable.
 */
async function findPids(inode: string): Promise<number[]> {
  const target = `socket:[${inode}]`
  const pids = (await readdir('/proc')).filter((d) => /^\d+$/.test(d))
  const holders: number[] = []
  for (const pid of pids) {
    if (Number(pid) === process.pid) continue
    let fds: string[]
    try {
      fds = await readdir(`/proc/${pid}/fd`)
    } catch {
      continue
    }
    for (const fd of fds) {
      const link = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')
      if (link === target) {
        holders.push(Number(pid))
        break
      }
    }
  }
  return holders
}

/**
 * sha256 of executables, kept per file (device, inode, size, mtime, ctime): a hard link is the same file
 * under another name, so any number of them cost one read, where a cache by path read a 500 MB
 * binary once per link (10 links: 12.3 s of the sidecar's CPU, another caller's first call 1.9 s
 * instead of 0.34). Bounded (an LRU), concurrent asks for one file share one read, and at most
 * `maxRunning` files are read at once: a caller touching its binary before every connection costs
 * a read each time, but only that many at once. The ctime is in the key because the owner cannot
 * set it: a file rewritten in place with its size kept and its mtime put back (`touch -r`) was
 * the allowed binary's cached hash for other content. A file that changes while it is read gets
 * no hash (and so no allowed_executables match).
 */
function fileKey(st: { dev: number; ino: number; size: number; mtimeMs: number; ctimeMs: number }): string {
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`
}

export class ExecutableHashes {
  private readonly done: LRUCache<string, string>
  private readonly pending = new Map<string, Promise<string | null>>()
  private readonly queue: (() => void)[] = []
  private running = 0
  /** Files read to hash them, since start: what a cache miss costs. */
  reads = 0

  constructor(
    maxEntries = 256,
    private readonly maxRunning = 2,
  ) {
    this.done = new LRUCache({ max: maxEntries })
  }

  /** sha256 (hex) of the file at `path` (for a caller, `/proc/<pid>/exe`: the file it runs, whatever its path now names); null if it cannot be read. */
  async hash(path: string): Promise<string | null> {
    const st = await stat(path).catch(() => null)
    if (!st) return null
    const key = fileKey(st)
    const cached = this.done.get(key)
    if (cached) return cached
    let p = this.pending.get(key)
    if (!p) {
      p = this.read(key, path).finally(() => this.pending.delete(key))
      this.pending.set(key, p)
    }
    return p
  }

  private async read(key: string, path: string): Promise<string | null> {
    if (this.running >= this.maxRunning) await new Promise<void>((resolve) => this.queue.push(resolve))
    this.running++
    try {
      this.reads++
      const h = createHash('sha256')
      await new Promise<void>((resolve, reject) => createReadStream(path).on('data', (c) => h.update(c)).on('end', resolve).on('error', reject))
      const after = await stat(path)
      if (fileKey(after) !== key) return null
      const sha256 = h.digest('hex')
      this.done.set(key, sha256)
      return sha256
    } catch {
      return null
    } finally {
      this.running--
      this.queue.shift()?.()
    }
  }
}

export class PeerProcessResolver {
  private readonly bySocket = new WeakMap<Socket, CallerProcess | null | Promise<CallerProcess | null>>()
  private readonly hashes = new ExecutableHashes()

  constructor(private readonly policy: CallerPolicy) {}

  /** The caller of this connection; sync once known, a promise the first time. */
  resolve(socket: Socket): CallerProcess | null | Promise<CallerProcess | null> {
    const known = this.bySocket.get(socket)
    if (known !== undefined) return known
    const p = this.lookup(socket).catch(() => null)
    this.bySocket.set(socket, p)
    void p.then((r) => this.bySocket.set(socket, r))
    return p
  }

  /** Throws LK_CALLER_DENIED when the policy names allowed callers and this is not one (or unknown). */
  check(caller: CallerProcess | null): void {
    const { allowedUids, allowedExecutables } = this.policy
    if (allowedUids.length > 0 && (!caller || !allowedUids.includes(caller.uid))) {
      throw new LatchkeyError('LK_CALLER_DENIED', caller ? `uid ${caller.uid} may not use this sidecar` : 'the calling process could not be identified')
    }
    if (allowedExecutables.length > 0 && (!caller || !caller.sha256 || !allowedExecutables.includes(caller.sha256))) {
      throw new LatchkeyError('LK_CALLER_DENIED', caller?.exe ? `${caller.exe} is not an allowed caller` : 'the calling process could not be identified')
    }
  }

  private async lookup(socket: Socket): Promise<CallerProcess | null> {
    if (!socket.remoteAddress || !socket.remotePort || !socket.localAddress || !socket.localPort) return null
    const found = await findSocket({ address: socket.remoteAddress, port: socket.remotePort }, { address: socket.localAddress, port: socket.localPort })
    if (!found) return null
    const pids = await findPids(found.inode)
    let pid: number | null = null
    let exe: string | null = null
    let sha256: string | null = null
    for (const holder of pids) {
      const path = await readlink(`/proc/${holder}/exe`).catch(() => null)
      // Hashed through /proc: the file the process runs, even if its path now names another.
      const hash = path ? await this.hashes.hash(`/proc/${holder}/exe`) : null
      if (pid === null) {
        pid = holder
        exe = path
        sha256 = hash
        continue
      }
      // Held by processes running different executables (or one not known): no one of them is the
      // caller, and none may lend its name to the others. Unidentified, which an allow-list refuses.
      if (hash === null || hash !== sha256) return { pid: null, uid: found.uid, exe: null, sha256: null }
    }
    return { pid, uid: found.uid, exe, sha256 }
  }
}
