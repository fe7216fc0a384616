/**
 * The installed command's launcher (src/cli/launch.cjs, package.json's `bin`) keeps V8's code
 * cache of the CLI bundle where Node keeps its own compile cache (Node 22.1+: module.enableCompileCache),
 * so the cache serves whichever Node runs the command, not only the one that built it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import Module from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/qemu.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string> };
const bin = join(root, pkg.bin['qcow2-stream']!);
const skip = !existsSync(bin)
  ? 'not built: run npm run build'
  : typeof (Module as { enableCompileCache?: unknown }).enableCompileCache !== 'function'
    ? `Node ${process.version} has no module.enableCompileCache: the launcher uses the build's code cache (test/cli/bundle.test.ts)`
    : undefined;

function filesUnder(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir, { recursive: true, withFileTypes: true }).filter((entry) => entry.isFile()).map((entry) => entry.name) : [];
}

test("the launcher keeps the bundle's code cache in Node's compile cache directory", { skip }, (t) => {
  const tmp = tempDir(t, 'qcow2-stream-compile-cache-');
  // Node's default directory is node-compile-cache in the OS temp dir; NODE_COMPILE_CACHE is left
  // unset, since it would turn the cache on by itself, without the launcher.
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !/^NODE_(COMPILE_CACHE|DISABLE_COMPILE_CACHE|OPTIONS)$/.test(name)));
  const cacheDir = join(tmp, 'node-compile-cache');
  for (let run = 0; run < 2; run++) {
    const result = spawnSync(process.execPath, [bin, '--version'], { env: { ...env, TMPDIR: tmp }, encoding: 'utf8' });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout.trim(), pkg.version);
    assert.ok(filesUnder(cacheDir).length > 0, `run ${run + 1} left no compile cache in ${cacheDir}`);
  }
});
