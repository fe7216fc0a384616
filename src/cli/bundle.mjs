#!/usr/bin/env node
// Builds the command-line tool for a fast start, after tsc (`npm run build` runs both):
//   dist/src/cli/cli-bundle.cjs           the CLI (dist/src/cli/main.js) and its dependencies in one file
//   dist/src/cli/cli-bundle.<node>.cache  V8's code cache of it, only when the building Node has no
//                                         module.enableCompileCache (Node 20): see launch.cjs
//   dist/src/cli/qcow2-stream.cjs         package.json's `bin`: src/cli/launch.cjs, which runs the bundle
//
// Why: through the ESM loader, a conversion's ~40 modules are resolved, read and compiled one
// at a time. One CommonJS file compiled from a code cache starts about 35 ms sooner (an empty
// conversion: 0.094 s → about 0.06 s), 5-10 % of converting a 2 GiB image. The library itself
// (dist/src/index.js) stays unbundled. The package ships the bundle and the launcher, not the
// code cache (it serves one Node version) nor the other compiled CLI files (package.json's `files`).
//
// Everything sits next to main.js, so the paths the CLI finds from its own location
// (package.json for --version, the native addon) resolve as they do from dist/src/cli and src/io.
import { chmodSync, copyFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import Module from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Script } from 'node:vm';
import { build } from 'esbuild';

const root = fileURLToPath(new URL('../..', import.meta.url));
const out = join(root, 'dist/src/cli');
const bundlePath = join(out, 'cli-bundle.cjs');

const result = await build({
  entryPoints: [join(out, 'main.js')],
  outfile: bundlePath,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  // The sources find files next to themselves with import.meta.url, which CommonJS lacks.
  define: { 'import.meta.url': 'bundleUrl' },
  banner: { js: "const bundleUrl = require('node:url').pathToFileURL(__filename).href;" },
  write: false,
  logLevel: 'warning',
});
// main.js starts with a #! line, which esbuild keeps; the launcher compiles the file as a function body.
const source = result.outputFiles[0].text.replace(/^#!.*\n/, '');
// esbuild turns import() of our modules into require(); one left (of a built-in) would fail at
// run time, since a script compiled by the launcher has no module loader.
if (/\bimport\(/.test(source)) throw new Error('the CLI bundle contains import(): load built-ins with process.getBuiltinModule instead');
writeFileSync(bundlePath, source);

for (const name of readdirSync(out)) if (/^cli-bundle\..*\.cache$/.test(name)) rmSync(join(out, name));
// Where Node has its own compile cache the launcher uses that and would never read this one.
if (typeof Module.enableCompileCache !== 'function') {
  // Compiled exactly as the launcher compiles it, or V8 rejects the cache.
  const script = new Script(Module.wrap(source), { filename: bundlePath });
  writeFileSync(join(out, `cli-bundle.${process.version}.cache`), script.createCachedData());
}

const launcher = join(out, 'qcow2-stream.cjs');
copyFileSync(join(root, 'src/cli/launch.cjs'), launcher);
chmodSync(launcher, 0o755);
