/**
 * A data file beside the image's directory, not in it: `convert in.raw img/out.qcow2
 * --data-file dat/out.data` stores 'dat/out.data', which qemu resolves from its working
 * directory. Our readers refuse it by the path policy: the refusal must say so (not only "does
 * not exist"), and convert must warn when it writes such a name.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuCompare, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';

test('a data file beside the image directory: warned at creation, refused with the real reason', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  mkdirSync(join(dir, 'img'));
  mkdirSync(join(dir, 'dat'));
  const raw = randomBytesAt(3, 0, 256 * 1024);
  writeFileSync(join(dir, 'in.raw'), raw);
  const made = runCli(['convert', '-q', 'in.raw', 'img/out.qcow2', '--data-file', 'dat/out.data'], { cwd: dir });
  assert.equal(made.code, 0, made.stderr);
  assert.match(made.stderr, /warning: The data-file name 'dat\/out\.data' .* refuse it/);
  assert.equal(qemuCompare('in.raw', 'img/out.qcow2', dir).code, 0, 'qemu reads it from this directory');

  const refused = runCli(['export', 'img/out.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /read from the working directory as qemu reads it, it names '.*\/dat\/out\.data', outside the image directory/);
  assert.match(refused.stderr, /QCOW_ERR_PATH_POLICY/);

  const allowed = runCli(['export', '-q', '--allow-unsafe-paths', 'img/out.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(allowed.code, 0, allowed.stderr);
  assert.ok(readFileSync(join(dir, 'out.raw')).equals(raw));

  // A data file in the image's directory or below it: no warning.
  const inside = runCli(['convert', '-q', 'in.raw', 'img/b.qcow2', '--data-file', 'img/sub.data'], { cwd: dir });
  assert.equal(inside.code, 0, inside.stderr);
  assert.equal(inside.stderr, '');
});
