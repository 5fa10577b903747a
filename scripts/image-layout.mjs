// Lays out what the image's runtime stage holds, into <dest>: package.json, the bundled CLI
// (dist/bin, which is the whole program: esbuild bundles every dependency but the two native
// ones), deploy/, and of node_modules only the bundle's externals with what they load at run time.
// The Dockerfile runs it; test/image-layout.test.ts runs the CLI from such a layout, away from the
// checkout, so a dependency missing from it fails there and not first in a deployed image.
// Copying all of node_modules put ~140 packages in the image that nothing loads.
//   node scripts/image-layout.mjs <dest>
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const dest = process.argv[2]
if (!dest) {
  console.error('usage: node scripts/image-layout.mjs <dest>')
  process.exit(2)
}

/** The bundle's externals (scripts/bundle.mjs) that are installed: pg-native is optional, and pg loads it only when asked to. */
const EXTERNALS = ['better-sqlite3']
/** Dependencies used only when the package is installed (fetching a prebuilt binary), never when it runs. */
const INSTALL_ONLY = new Set(['prebuild-install'])

/** A package's directory as Node would find it from `from` (node_modules of each parent in turn). */
function packageDir(name, from) {
  for (let dir = from; ; dir = dirname(dir)) {
    const candidate = join(dir, 'node_modules', name)
    if (existsSync(join(candidate, 'package.json'))) return candidate
    if (dirname(dir) === dir) throw new Error(`image-layout: ${name} is not installed (needed from ${from})`)
  }
}

const packages = new Map()
const visit = (name, from) => {
  const dir = packageDir(name, from)
  if (packages.has(dir)) return
  packages.set(dir, name)
  const { dependencies = {} } = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'))
  for (const dep of Object.keys(dependencies)) if (!INSTALL_ONLY.has(dep)) visit(dep, dir)
}
for (const name of EXTERNALS) visit(name, root)

rmSync(dest, { recursive: true, force: true })
mkdirSync(dest, { recursive: true })
cpSync(join(root, 'package.json'), join(dest, 'package.json'))
cpSync(join(root, 'dist/bin'), join(dest, 'dist/bin'), { recursive: true })
cpSync(join(root, 'deploy'), join(dest, 'deploy'), { recursive: true })
/**
 * Of a native addon (one with a binding.gyp), its JavaScript and the built `.node` files in
 * build/Release, not the C sources, the SQLite amalgamation and the object files it was built
 * from (42 of better-sqlite3's 44 MB).
 */
const runtimeFile = (pkgDir) => {
  if (!existsSync(join(pkgDir, 'binding.gyp'))) return () => true
  return (src) => {
    const rel = src.slice(pkgDir.length + 1)
    if (rel === 'src' || rel === 'deps' || rel.startsWith('src/') || rel.startsWith('deps/')) return false
    if (rel === 'build' || rel === 'build/Release') return true
    if (rel.startsWith('build/')) return /^build\/Release\/[^/]+\.node$/.test(rel)
    return true
  }
}
for (const dir of packages.keys()) cpSync(dir, join(dest, dir.slice(root.length)), { recursive: true, filter: runtimeFile(dir) })
console.log(`image layout in ${dest}: dist/bin, deploy, ${[...packages.values()].join(', ')}`)
