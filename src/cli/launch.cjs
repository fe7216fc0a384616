#!/usr/bin/env node
// The qcow2-stream command (package.json's `bin`; `npm run build` copies it to dist/src/cli).
// It runs cli-bundle.cjs, the whole CLI in one file, compiled from the V8 code cache that the
// build made for this Node version when there is one: start-up then skips parsing the 450 KB
// bundle. Without a cache, or with one V8 rejects, the bundle is compiled from source as usual.
'use strict';
const { readFileSync } = require('node:fs');
const { join } = require('node:path');
const { createRequire, wrap } = require('node:module');
const { Script } = require('node:vm');

const bundle = join(__dirname, 'cli-bundle.cjs');
let cachedData;
try {
  cachedData = readFileSync(join(__dirname, `cli-bundle.${process.version}.cache`));
} catch {
  // No cache for this Node version.
}
// No import() in the bundle: a script compiled this way has no module loader for it.
const script = new Script(wrap(readFileSync(bundle, 'utf8')), { filename: bundle, cachedData });
const module_ = { exports: {} };
script.runInThisContext().call(module_.exports, module_.exports, createRequire(bundle), module_, bundle, __dirname);
