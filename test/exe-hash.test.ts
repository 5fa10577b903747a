// The caller's executable is hashed once per file, not once per name: hard links give a caller
// any number of paths to one binary at no disk cost (measured before: 10 links to a 500 MB
// binary, 12.3 s of the sidecar's CPU). Real files in a temp dir; `reads` counts the files read.
import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import { linkSync, mkdtempSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ExecutableHashes } from '../proxy/identify/peer-process.js'

const dir = mkdtempSync(join(tmpdir(), 'lk-exe-'))
t.teardown(() => rmSync(dir, { recursive: true, force: true }))
const body = randomBytes(4 * 1024 * 1024)
const bin = join(dir, 'agent')
writeFileSync(bin, body)
const want = createHash('sha256').update(body).digest('hex')
const links = Array.from({ length: 10 }, (_, i) => join(dir, `link${i}`))
for (const l of links) linkSync(bin, l)

t.test('hard links to one binary are read once, asked at once or one after another', async (t) => {
  const h = new ExecutableHashes()
  const together = await Promise.all([bin, ...links].map((p) => h.hash(p)))
  t.same(together, Array(11).fill(want), 'every name, the same hash')
  t.equal(h.reads, 1, '11 names asked at once: one read')
  for (const p of links) t.equal(await h.hash(p), want)
  t.equal(h.reads, 1, 'asked again one by one: still one read')
})

t.test('a touch is one new read for every name, not one per name', async (t) => {
  const h = new ExecutableHashes()
  await h.hash(bin)
  const later = new Date(Date.now() + 60_000)
  utimesSync(bin, later, later)
  const after = await Promise.all(links.map((p) => h.hash(p)))
  t.same(after, Array(10).fill(want))
  t.equal(h.reads, 2, 'touched: re-read once')
})

t.test('the cache is bounded: past its size the oldest file is read again', async (t) => {
  const h = new ExecutableHashes(3)
  const others = Array.from({ length: 3 }, (_, i) => {
    const p = join(dir, `other${i}`)
    writeFileSync(p, `other ${i}`)
    return p
  })
  await h.hash(bin)
  await h.hash(links[0]!)
  t.equal(h.reads, 1)
  for (const p of others) await h.hash(p)
  t.equal(h.reads, 4)
  await h.hash(links[1]!)
  t.equal(h.reads, 5, 'evicted by three newer files: read again')
})

t.test('distinct files are read at most maxRunning at a time', async (t) => {
  const h = new ExecutableHashes(256, 1)
  const files = Array.from({ length: 4 }, (_, i) => {
    const p = join(dir, `distinct${i}`)
    writeFileSync(p, randomBytes(256 * 1024))
    return p
  })
  let peak = 0
  const probe = setInterval(() => (peak = Math.max(peak, (h as unknown as { running: number }).running)), 0)
  await Promise.all(files.map((p) => h.hash(p)))
  clearInterval(probe)
  t.equal(h.reads, 4)
  t.ok(peak <= 1, `never more than one read at once (peak ${peak})`)
  t.equal(await h.hash(join(dir, 'missing')), null, 'a file that cannot be read: no hash')
})

t.test('a file rewritten in place, its size and mtime put back, is read again: the ctime is in the key', async (t) => {
  const h = new ExecutableHashes()
  const p = join(dir, 'swapped')
  const allowed = randomBytes(64 * 1024)
  writeFileSync(p, allowed)
  // A whole second, so utimes can put it back exactly.
  const mtime = new Date(Math.floor(Date.now() / 1000) * 1000 - 60_000)
  utimesSync(p, mtime, mtime)
  t.equal(await h.hash(p), createHash('sha256').update(allowed).digest('hex'))
  const other = randomBytes(64 * 1024)
  // The same inode, size and mtime: only the ctime (which utimes itself sets) tells.
  writeFileSync(p, other)
  utimesSync(p, mtime, mtime)
  t.equal(statSync(p).mtimeMs, mtime.getTime(), 'the mtime is back where it was')
  t.equal(await h.hash(p), createHash('sha256').update(other).digest('hex'), 'the new content hashed, not the cached hash of the old')
  t.equal(h.reads, 2)
})
