// Preloaded into every test process with --require (package.json tap.node-arg), so it runs before
// tap's own --import of its process tracker (@tapjs/processinfo). The tracker installs module
// loader hooks that record each loaded file's line lengths and source map, for coverage; the
// suite runs with coverage off, and those hooks cost each test file about 0.6 s of CPU on Node 20
// and on Node 24 (Node 20's run in a loader thread that every import waits on). The tracker's
// calls to install them are skipped; any other caller's go through. What else the tracker does
// (the process record tap reads at exit) is unchanged. untracked-children.ts keeps it out of the
// processes a test starts.
import Module from 'node:module'

const fromTracker = (): boolean => /@tapjs[\\/]processinfo/.test(new Error().stack ?? '')

type Installer = (...args: unknown[]) => unknown
const installers = Module as unknown as Record<'register' | 'registerHooks', Installer | undefined>
for (const name of ['register', 'registerHooks'] as const) {
  const install = installers[name]
  if (typeof install !== 'function') continue
  installers[name] = function (this: unknown, ...args: unknown[]) {
    if (fromTracker()) return name === 'registerHooks' ? { deregister() {} } : undefined
    return install.apply(this, args)
  }
}
