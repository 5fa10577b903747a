// Bundles the compiled CLI (dist/cli/latchkey.js, from tsc) into dist/bin/: the `latchkey`
// executable the package, the image and the tests run. Unbundled, a start resolved and read
// ~400 ESM and CommonJS files (undici, grpc-js, pino, yaml, commander, dist/): `check-config` took
// 0.74 s of CPU on Node 20, 0.44 s bundled (medians of 10). Code splitting keeps each command loading only its
// own process's code, as the dynamic imports in cli/latchkey.ts intend.
//   node scripts/bundle.mjs
import { build } from 'esbuild'
import { chmodSync, readFileSync, rmSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const outdir = `${root}dist/bin`
rmSync(outdir, { recursive: true, force: true })

const { metafile } = await build({
  absWorkingDir: root,
  entryPoints: {
    latchkey: 'dist/cli/latchkey.js',
    // The collector's SQLite store starts it as a worker by its URL beside the module that does.
    'sqlite-reader': 'dist/collector/store/sqlite-reader.js',
  },
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  // The oldest Node supported (package.json engines): nothing is lowered for it.
  target: 'node20.18',
  // No keepNames: it wraps every function and class in a call to Object.defineProperty, closures
  // made per call included (undici's writeH1 and the header scrub made several per request: 1.9%
  // of the sidecar's sampled CPU at 16 connections). Unminified, a name changes only where two
  // modules of a chunk declare the same one; the check below keeps our classes' names as written.
  keepNames: false,
  // A native addon (loaded from node_modules by its own `bindings` lookup), and pg's optional one.
  external: ['better-sqlite3', 'pg-native'],
  // CommonJS dependencies (grpc-js, pino, pg) call require(); an ES module has none of its own.
  banner: { js: "import { createRequire as __latchkeyRequire } from 'node:module'; const require = __latchkeyRequire(import.meta.url);" },
  sourcemap: 'linked',
  logLevel: 'warning',
  metafile: true,
})
chmodSync(`${outdir}/latchkey.js`, 0o755)
// tsc's entry stays executable too: npx keeps a checkout's bin link by the checkout's path
// (~/.npm/_npx/<hash>) and never renews it, and one made before the CLI was bundled points at
// dist/cli/latchkey.js: `npx latchkey` then failed with "Permission denied".
chmodSync(`${root}dist/cli/latchkey.js`, 0o755)

// `await import('pkg')` of a CommonJS package (yaml, undici) is, split, a chunk exporting only
// `default`: its named exports are undefined in the bundle while Node gives them unbundled. Such a
// package is imported statically by a module of ours that is itself imported dynamically.
const defaultOnly = Object.entries(metafile.outputs).filter(([, o]) => o.entryPoint?.startsWith('node_modules/') && o.exports.length === 1 && o.exports[0] === 'default')
if (defaultOnly.length > 0) {
  for (const [, o] of defaultOnly) console.error(`bundle: a dynamic import of ${o.entryPoint}, a CommonJS module: only its default export survives bundling; import it statically from a module of ours instead`)
  process.exit(1)
}

// Our classes keep their names (error types are logged and reported by them): esbuild renames a
// declaration, say `class LatchkeyError` to `LatchkeyError2`, only when another module of the same
// chunk declares the name too. Such a clash fails the build, naming both.
const ours = new Set()
for (const input of Object.keys(metafile.inputs)) {
  if (!input.startsWith('dist/')) continue
  for (const m of readFileSync(`${root}${input}`, 'utf8').matchAll(/\bclass ([A-Za-z_$][\w$]*)/g)) ours.add(m[1])
}
const renamed = []
for (const output of Object.keys(metafile.outputs)) {
  if (!output.endsWith('.js')) continue
  // Declared `class X2 {` or, as esbuild emits most, `var X2 = class extends ... {` (named by its binding).
  for (const m of readFileSync(`${root}${output}`, 'utf8').matchAll(/\b(?:class ([A-Za-z_$][\w$]*?)(\d+)\b|([A-Za-z_$][\w$]*?)(\d+) = class\b)/g)) {
    const [name, digits] = m[1] === undefined ? [m[3], m[4]] : [m[1], m[2]]
    if (ours.has(name) && !ours.has(name + digits)) renamed.push(`${name} (as ${name}${digits}, in ${output})`)
  }
}
if (renamed.length > 0) {
  console.error(`bundle: classes of ours renamed where another module of their chunk declares the same name: ${renamed.join(', ')}; rename one of them`)
  process.exit(1)
}
