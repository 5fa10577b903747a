// npm 11.16+ reads package.json's allowScripts, and npm 12 runs a dependency's install script only
// where it is allowed there, skipping the rest with a warning at the end of the install. Skipped,
// better-sqlite3's native build leaves a newcomer's `npm install && npm start` with a collector
// that cannot open its SQLite store, found at run time, not at install. So every locked package
// with an install script has a decision in allowScripts, and every decision names such a package.
import t from 'tap'
import { readFileSync } from 'node:fs'

const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { allowScripts?: Record<string, boolean> }
const lock = JSON.parse(readFileSync('package-lock.json', 'utf8')) as { packages: Record<string, { hasInstallScript?: boolean }> }

/** Locked packages (by name) whose install, preinstall or postinstall script npm would run. */
const withScripts = new Set(
  Object.entries(lock.packages)
    .filter(([path, p]) => path !== '' && p.hasInstallScript === true)
    .map(([path]) => path.slice(path.lastIndexOf('node_modules/') + 'node_modules/'.length)),
)

t.test('every dependency with an install script has a decision in allowScripts', async (t) => {
  const allow = pkg.allowScripts ?? {}
  t.ok(withScripts.size > 0, 'the lockfile lists packages with install scripts (else this test reads the wrong field)')
  for (const name of withScripts) t.type(allow[name], 'boolean', `${name}: allowed or denied`)
  for (const name of Object.keys(allow)) t.ok(withScripts.has(name), `${name}: a locked package with an install script (else a stale entry)`)
  t.equal(allow['better-sqlite3'], true, "better-sqlite3's native build runs: the SQLite store needs it")
})
