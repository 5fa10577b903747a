// The `latchkey` executable the tests start, as the package's bin, the image and `npm start` do:
// the bundle (scripts/bundle.mjs), by absolute path, whatever a test's working directory.
import { fileURLToPath } from 'node:url'

/** dist/bin/latchkey.js; this file runs from dist/test/helpers/. */
export const CLI = fileURLToPath(new URL('../../bin/latchkey.js', import.meta.url))
