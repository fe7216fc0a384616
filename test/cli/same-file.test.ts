/**
 * No command replaces a file the user did not ask to replace (issue: every one of these
 * destroyed a file with exit 0): an output that is an input, a data file, a backing file or
 * another output of the same run is refused before anything is created, through symlinks and
 * hard links; an existing output is replaced only with --force; an empty name is refused.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { linkSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';

const MiB = 1024 * 1024;

function setup(dir: string): Buffer {
  const raw = randomBytesAt(5, 0, 2 * MiB);
  writeFileSync(join(dir, 'in.raw'), raw);
  return raw;
}

/** Runs the CLI in `dir` and asserts a refusal (exit 2, one line naming the collision) that left `dir` as it was. */
function refused(dir: string, args: string[], pattern: RegExp): void {
  const before = new Map(readdirSync(dir).map((name) => [name, readFileSync(join(dir, name))]));
  const result = runCli(args, { cwd: dir });
  assert.equal(result.code, 2, `${args.join(' ')}: ${result.stderr}`);
  assert.match(result.stderr, pattern, args.join(' '));
  assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
  const after = readdirSync(dir).sort();
  assert.deepEqual(after, [...before.keys()].sort(), `${args.join(' ')}: files were created or removed`);
  for (const name of after) assert.ok(readFileSync(join(dir, name)).equals(before.get(name)!), `${args.join(' ')}: ${name} changed`);
}

test('convert refuses outputs that are its input, base, manifest or each other', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  setup(dir);
  assert.equal(runCli(['convert', '-q', 'in.raw', 'img.qcow2', '--data-file', 'img.data'], { cwd: dir }).code, 0);
  refused(dir, ['convert', 'in.raw', 'out.qcow2', '--manifest', 'in.raw'], /manifest 'in\.raw' is the input/);
  refused(dir, ['convert', 'in.raw', 'out.qcow2', '--manifest', 'out.qcow2'], /manifest and the output are the same file/);
  refused(dir, ['convert', 'in.raw', 'out.qcow2', '--data-file', 'd.data', '--manifest', 'd.data'], /manifest and the data file are the same file/);
  refused(dir, ['convert', 'in.raw', 'img.qcow2', '--data-file', 'n.data', '--base', 'img.qcow2', '--force'], /output 'img\.qcow2' is the base/);
  // The base's own data file is read too.
  refused(dir, ['convert', 'in.raw', 'o.qcow2', '--data-file', 'img.data', '--base', 'img.qcow2', '--force'], /data file 'img\.data' is the data file of the base/);
  refused(dir, ['convert', 'in.raw', 'in.raw', '--data-file', 'x.data'], /output 'in\.raw' is the input/);
  // Through a symlink and a hard link.
  symlinkSync('in.raw', join(dir, 'alias.raw'));
  linkSync(join(dir, 'in.raw'), join(dir, 'hard.raw'));
  refused(dir, ['convert', 'in.raw', 'out.qcow2', '--data-file', 'alias.raw', '--force'], /data file 'alias\.raw' is the input/);
  refused(dir, ['convert', 'in.raw', 'hard.raw', '--data-file', 'y.data', '--force'], /output 'hard\.raw' is the input/);
  refused(dir, ['convert', 'in.raw', ''], /output name is empty/);
});

test('export refuses to write over the image, its data file or its backing file', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  setup(dir);
  qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=df.raw', 'dfi.qcow2', '1M'], dir);
  qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', 'in.raw', 'base.qcow2'], dir);
  qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  refused(dir, ['export', 'base.qcow2', 'base.qcow2'], /output 'base\.qcow2' is the image/);
  refused(dir, ['export', 'top.qcow2', 'base.qcow2', '--force'], /output 'base\.qcow2' is the backing file/);
  refused(dir, ['export', 'dfi.qcow2', 'df.raw', '--force'], /output 'df\.raw' is the data file of the image/);
  refused(dir, ['export', 'base.qcow2', ''], /output name is empty/);
});

test('wrap refuses its raw file as output', (t) => {
  const dir = tempDir(t);
  setup(dir);
  symlinkSync('in.raw', join(dir, 'alias.raw'));
  refused(dir, ['wrap', 'in.raw', 'alias.raw', '--force'], /output 'alias\.raw' is the raw file/);
});

test('every command replaces an existing output only with --force', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  setup(dir);
  assert.equal(runCli(['convert', '-q', 'in.raw', 'a.qcow2'], { cwd: dir }).code, 0);
  writeFileSync(join(dir, 'keep'), 'precious');
  for (const args of [
    ['convert', 'in.raw', 'keep', '--data-file', 'fresh.data'],
    ['convert', 'in.raw', 'fresh.qcow2', '--data-file', 'keep'],
    ['convert', 'in.raw', 'fresh.qcow2', '--manifest', 'keep'],
    ['convert', 'in.raw', 'keep', '--internal'],
    ['export', 'a.qcow2', 'keep'],
    ['wrap', 'in.raw', 'keep'],
  ]) {
    refused(dir, args, /'keep' already exists/);
  }
  for (const args of [
    ['convert', '-q', 'in.raw', 'keep', '--data-file', 'fresh.data', '--force'],
    ['export', '-q', 'a.qcow2', 'keep', '--force'],
    ['wrap', '-q', 'in.raw', 'keep', '--force'],
  ]) {
    writeFileSync(join(dir, 'keep'), 'precious');
    const result = runCli(args, { cwd: dir });
    assert.equal(result.code, 0, `${args.join(' ')}: ${result.stderr}`);
    assert.notEqual(readFileSync(join(dir, 'keep'), 'utf8'), 'precious');
  }
});
