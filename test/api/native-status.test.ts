/**
 * nativeAddonStatus(): whether the addon is in use, and why not. The three reasons are produced
 * for real: the environment variable, a module tree without the built addon, and a file where
 * the addon should be that does not load.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { nativeAddonStatus } from '../../src/index.js';
import { nativeAddon, NO_NATIVE_ENV } from '../../src/io/native.js';
import { tempDir } from '../helpers/qemu.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const built = existsSync(join(root, 'src', 'native', 'build', 'Release', 'qcow2_native.node'));

test('the status agrees with the addon the library uses, and QCOW2_STREAM_NO_NATIVE reports disabled', (t) => {
  const saved = process.env[NO_NATIVE_ENV];
  t.after(() => {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  });
  delete process.env[NO_NATIVE_ENV];
  const status = nativeAddonStatus();
  assert.equal(status.active, nativeAddon() !== null);
  assert.equal(status.active, built, JSON.stringify(status));
  if (status.active) assert.match(status.path, /qcow2_native\.node$/);

  process.env[NO_NATIVE_ENV] = '1';
  const disabled = nativeAddonStatus();
  assert.equal(nativeAddon(), null);
  assert.ok(!disabled.active);
  assert.equal(disabled.reason, 'disabled');
  assert.match(disabled.message, /QCOW2_STREAM_NO_NATIVE=1/);
});

/** The status as a copy of native.ts placed at `dir`/src/io sees it (in a child process, with tsx). */
function statusIn(dir: string): Record<string, unknown> {
  const module = join(dir, 'src', 'io', 'native.ts');
  const script = `const m = await import(${JSON.stringify(pathToFileURL(module).href)}); process.stdout.write(JSON.stringify(m.nativeAddonStatus()));`;
  const env = { ...process.env };
  delete env[NO_NATIVE_ENV];
  const result = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: root, env, encoding: 'utf8' });
  assert.equal(result.status, 0, result.stderr);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

test('not built, and built but not loadable: each says so', (t) => {
  const dir = tempDir(t);
  mkdirSync(join(dir, 'src', 'io'), { recursive: true });
  copyFileSync(join(root, 'src', 'io', 'native.ts'), join(dir, 'src', 'io', 'native.ts'));
  // An ES module, as in the package.
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
  const missing = statusIn(dir);
  assert.equal(missing['active'], false);
  assert.equal(missing['reason'], 'not-built');

  const release = join(dir, 'src', 'native', 'build', 'Release');
  mkdirSync(release, { recursive: true });
  writeFileSync(join(release, 'qcow2_native.node'), 'not a shared object');
  const broken = statusIn(dir);
  assert.equal(broken['active'], false);
  assert.equal(broken['reason'], 'load-failed');
  assert.equal(broken['path'], join(release, 'qcow2_native.node'));
  assert.match(String(broken['message']), /\S/);
});
