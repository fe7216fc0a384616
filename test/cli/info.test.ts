/** `qcow2-stream info`: qemu-img info's fields, and it never opens the data or backing file. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuInfo, tempDir } from '../helpers/qemu.js';
import { img, replaceStoredName } from '../read/fixtures.js';

test('info --json matches qemu-img info and works with the data file and backing file gone', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '1M');
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data,extended_l2=on,compression_type=zstd', '-b', 'base.qcow2', '-F', 'qcow2', 'a.qcow2', '3M');
  const qemu = qemuInfo('a.qcow2', dir);
  rmSync(join(dir, 'd.data'));
  rmSync(join(dir, 'base.qcow2'));
  const result = runCli(['info', '--json', 'a.qcow2'], { cwd: dir });
  assert.equal(result.code, 0, result.stderr);
  const ours = JSON.parse(result.stdout) as Record<string, unknown>;
  for (const key of ['virtual-size', 'cluster-size', 'format', 'filename', 'backing-filename', 'backing-filename-format', 'dirty-flag']) {
    assert.deepEqual(ours[key], qemu[key], key);
  }
  const specific = (v: Record<string, unknown>) => (v['format-specific'] as { data: Record<string, unknown> }).data;
  for (const key of ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2', 'data-file', 'data-file-raw']) {
    assert.deepEqual(specific(ours)[key], specific(qemu)[key], key);
  }
});

test('info shows a hostile stored name without touching it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const json = 'json:{"driver":"file","filename":"/etc/hostname"}';
  img(dir, 'create', '-f', 'qcow2', '-o', `data_file=${'x'.repeat(json.length)}`, 'h.qcow2', '1M');
  replaceStoredName(join(dir, 'h.qcow2'), 'x'.repeat(json.length), json);
  const result = runCli(['info', 'h.qcow2'], { cwd: dir });
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /file format: qcow2/);
  assert.ok(result.stdout.includes(`data file: ${json} (not opened)`));
  assert.match(result.stdout, /virtual size: 1\.00 MiB \(1048576 bytes\)/);
});
