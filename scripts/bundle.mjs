// Bundles the compiled CLI (dist/cli/latchkey.js, from tsc) into dist/bin/: the `latchkey`
// executable the package, the image and the tests run. Unbundled, a start resolved and read
// ~400 ESM and CommonJS files (undici, grpc-js, pino, yaml, commander, dist/): `check-config` took
// 0.74 s of CPU on Node 20, 0.44 s bundled (medians of 10). Code splitting keeps each command loading only its
// own process's code, as the dynamic imports in cli/latchkey.ts intend.
//   node scripts/bundle.mjs
import { build } from 'esbuild'
import { chmodSync, rmSync } from 'node:fs'
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
  // Class and function names as written: logs and error types name them.
  keepNames: true,
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
