/**
 * A data file beside the image's directory, not in it: `convert in.raw img/out.qcow2
 * --data-file dat/out.data` stores its absolute path, which qemu opens from any working
 * directory. Our readers refuse it by the path policy: the refusal must say so (not only "does
 * not exist"), and convert must warn when it writes such a name. A data file inside the image's
 * directory is stored relative to it, with no warning.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuCompare, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';
import { qemuFacts } from '../write/helpers.js';

test('a data file beside the image directory: warned at creation, refused with the real reason', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  mkdirSync(join(dir, 'img'));
  mkdirSync(join(dir, 'dat'));
  const raw = randomBytesAt(3, 0, 256 * 1024);
  writeFileSync(join(dir, 'in.raw'), raw);
  const made = runCli(['convert', '-q', 'in.raw', 'img/out.qcow2', '--data-file', 'dat/out.data'], { cwd: dir });
  assert.equal(made.code, 0, made.stderr);
  assert.match(made.stderr, /warning: The data-file name '\/.*\/dat\/out\.data' .* refuse it/);
  assert.equal(qemuCompare('in.raw', 'img/out.qcow2', dir).code, 0, 'qemu reads it from this directory');
  assert.equal(qemuCompare(join(dir, 'in.raw'), join(dir, 'img/out.qcow2'), join(dir, 'img')).code, 0, 'and from any other (an absolute name)');

  const refused = runCli(['export', 'img/out.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /".*\/dat\/out\.data" is an absolute path outside the image directory/);
  assert.match(refused.stderr, /QCOW_ERR_PATH_POLICY/);

  const allowed = runCli(['export', '-q', '--allow-unsafe-paths', 'img/out.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(allowed.code, 0, allowed.stderr);
  assert.ok(readFileSync(join(dir, 'out.raw')).equals(raw));

  // A data file in the image's directory or below it: no warning.
  const inside = runCli(['convert', '-q', 'in.raw', 'img/b.qcow2', '--data-file', 'img/sub.data'], { cwd: dir });
  assert.equal(inside.code, 0, inside.stderr);
  assert.equal(inside.stderr, '');
  assert.equal(qemuFacts('img/b.qcow2', dir).dataFile, 'sub.data', 'stored relative to the image');
});
