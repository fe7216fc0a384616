#!/usr/bin/env node
// The qcow2-stream command (package.json's `bin`; `npm run build` copies it to dist/src/cli).
// It runs cli-bundle.cjs, the whole CLI in one file, so start-up skips the ESM loader's work
// per module. Parsing the 800 KB bundle is the rest of the start-up, which V8's code cache saves:
// - Node 22.1+: module.enableCompileCache() keeps that cache in Node's own directory
//   (NODE_COMPILE_CACHE, else node-compile-cache in the OS temp dir), made by the first run of
//   each Node version, so it serves whatever Node runs the command;
// - Node 20 has no such cache: the bundle is compiled from a code cache that the build made, when
//   the build ran on this very Node version (a repository checkout), else from source.
'use strict';
const { readFileSync } = require('node:fs');
const { join } = require('node:path');
const { createRequire, enableCompileCache, wrap } = require('node:module');
const { Script } = require('node:vm');

const bundle = join(__dirname, 'cli-bundle.cjs');
if (typeof enableCompileCache === 'function') {
  // A cache directory that cannot be made only costs the compile: nothing to report.
  enableCompileCache();
  require(bundle);
} else {
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
}
