/** `qcow2-stream export` as a user runs it: files, stdout, refusals with clean failures. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, locate, qemuRaw, writeU32, writeU64 } from '../read/fixtures.js';

function assertCleanFailure(result: { code: number; stderr: string }, code: string, dir: string): void {
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, new RegExp(`\\[${code}\\]`));
  assert.doesNotMatch(result.stderr, /^\s+at /m, 'no stack trace');
  assert.deepEqual(readdirSync(dir).filter((n) => n.includes('out') || n.includes('.partial')), [], 'no output left behind');
}

test('export writes the same bytes as qemu-img convert -O raw, to a file and to stdout', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'a.qcow2', '3M');
  io(dir, 'a.qcow2', 'write -P 0x11 0 1M', 'write -z 512k 64k', 'write -P 0x22 2M 100k');
  const expected = qemuRaw(dir, 'a.qcow2');
  const toFile = runCli(['export', 'a.qcow2', 'disk.raw'], { cwd: dir });
  assert.equal(toFile.code, 0, toFile.stderr);
  assert.ok(readFileSync(join(dir, 'disk.raw')).equals(expected));
  const toStdout = runCli(['export', '--quiet', 'a.qcow2', '-'], { cwd: dir });
  assert.equal(toStdout.code, 0, toStdout.stderr);
  assert.ok(toStdout.stdoutBytes.equals(expected));
});

test('export refuses broken and hostile images with exit 2, a one-line error and no output', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'hg.qcow2', '2M');
  io(dir, 'hg.qcow2', 'write -P 0x11 0 1M');
  // host ≠ guest in the last L2 entry: the failure comes after data was already written
  const hg = locate(join(dir, 'hg.qcow2'));
  writeU64(join(dir, 'hg.qcow2'), hg.l2EntryOffset(30), 0x10000n | (1n << 63n));
  assertCleanFailure(runCli(['export', '-f', 'qcow2', 'hg.qcow2', 'out.raw'], { cwd: dir }), 'QCOW_ERR_CORRUPT_IMAGE', dir);

  img(dir, 'create', '-f', 'qcow2', 'magic.qcow2', '1M');
  writeU32(join(dir, 'magic.qcow2'), 0, 0x51464900);
  assertCleanFailure(runCli(['export', '-f', 'qcow2', 'magic.qcow2', 'out.raw'], { cwd: dir }), 'QCOW_ERR_BAD_MAGIC', dir);
});

test('a data-file name outside the image directory is refused; --data-file and --allow-unsafe-paths get past it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const images = join(dir, 'images');
  img(dir, 'create', '-f', 'qcow2', '-o', `data_file=${join(dir, 'elsewhere.data')}`, 'images.qcow2', '1M');
  io(dir, 'images.qcow2', 'write -P 0x33 0 64k');
  // move the image into its own directory so the absolute name points outside it
  mkdirSync(images);
  renameSync(join(dir, 'images.qcow2'), join(images, 'a.qcow2'));
  const refused = runCli(['export', 'a.qcow2', 'out.raw'], { cwd: images });
  assertCleanFailure(refused, 'QCOW_ERR_PATH_POLICY', images);
  assert.match(refused.stderr, /hint: .*--data-file/);
  const explicit = runCli(['export', '--quiet', '--data-file', '../elsewhere.data', 'a.qcow2', 'out.raw'], { cwd: images });
  assert.equal(explicit.code, 0, explicit.stderr);
  assert.equal(readFileSync(join(images, 'out.raw'))[0], 0x33);
});
