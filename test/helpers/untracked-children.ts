// Preloaded into every test process (package.json tap.node-arg). tap's runner has its process
// tracker (@tapjs/processinfo) follow every child process, through NODE_OPTIONS and a spawn hook
// (process-on-spawn), so that coverage can follow them. The suite runs with coverage off, and
// the tracker cost each sidecar, broker and CLI a test starts 0.2–0.6 s of CPU: on Node 20 it
// routes every module load through a loader thread. Children start without it; the test
// process keeps the tracker's process record, which tap reads (tracker-hooks-off.cts turns off
// its module hooks there).
import { addListener } from 'process-on-spawn'

const tracker = /@tapjs[\\/]processinfo/
const untracked = (options: string | undefined): string | undefined => {
  if (options === undefined) return undefined
  const kept = options
    .split(/\s+/)
    .filter((o) => o !== '' && !tracker.test(o))
    .join(' ')
  return kept === '' ? undefined : kept
}

const own = untracked(process.env.NODE_OPTIONS)
if (own === undefined) delete process.env.NODE_OPTIONS
else process.env.NODE_OPTIONS = own

// Runs after the tracker's own listener, which put it back into the child's environment.
addListener((child) => {
  const kept = untracked(child.env.NODE_OPTIONS)
  const env = { ...child.env }
  if (kept === undefined) delete env.NODE_OPTIONS
  else env.NODE_OPTIONS = kept
  child.env = env
})
