/** `qcow2-stream info`: qemu-img info's fields, and it never opens the data or backing file. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuInfo, qemuIo, tempDir } from '../helpers/qemu.js';
import { img, readU64, replaceStoredName, writeU64 } from '../read/fixtures.js';

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
  assert.match(result.stdout, /^virtual size: 1 MiB \(1048576 bytes\)$/m); // qemu-img info's size format
});

test('info lists bitmaps, snapshots and the full backing name as qemu-img info does, in JSON and as text', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  mkdirSync(join(dir, 'sub'));
  const sub = join(dir, 'sub');
  img(sub, 'create', '-f', 'qcow2', 'base.qcow2', '4M');
  img(sub, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'img.qcow2', '4M');
  qemuIo(['-c', 'write -P 1 0 64k', 'img.qcow2'], sub);
  img(sub, 'bitmap', '--add', 'img.qcow2', 'b1');
  img(sub, 'bitmap', '--add', '-g', '128k', 'img.qcow2', 'second');
  img(sub, 'bitmap', '--disable', 'img.qcow2', 'second');
  img(sub, 'snapshot', '-c', 'snap1', 'img.qcow2');
  qemuIo(['-c', 'write -P 2 0 64k', 'img.qcow2'], sub);
  img(sub, 'snapshot', '-c', 'a longer snapshot name', 'img.qcow2');
  // From the parent directory, so the full backing name differs from the stored one.
  const qemu = qemuInfo('sub/img.qcow2', dir);
  const result = runCli(['info', '--json', 'sub/img.qcow2'], { cwd: dir });
  assert.equal(result.code, 0, result.stderr);
  const ours = JSON.parse(result.stdout) as Record<string, unknown>;
  assert.equal(ours['full-backing-filename'], 'sub/base.qcow2');
  for (const key of ['full-backing-filename', 'backing-filename', 'snapshots']) assert.deepEqual(ours[key], qemu[key], key);
  const specific = (v: Record<string, unknown>) => (v['format-specific'] as { data: Record<string, unknown> }).data;
  assert.deepEqual(specific(ours)['bitmaps'], specific(qemu)['bitmaps']);
  assert.equal((specific(ours)['bitmaps'] as unknown[]).length, 2);

  // The text: qemu's snapshot table and bitmap list, line for line (same TZ for both).
  const env = { TZ: 'Europe/Paris' };
  const qemuText = spawnSync('qemu-img', ['info', 'sub/img.qcow2'], { cwd: dir, env: { ...process.env, ...env }, encoding: 'utf8' }).stdout;
  const text = runCli(['info', 'sub/img.qcow2'], { cwd: dir, env }).stdout;
  const section = (s: string, from: string, to: string) => s.slice(s.indexOf(from), s.indexOf(to));
  assert.equal(section(text, 'Snapshot list:', 'Format specific'), section(qemuText, 'Snapshot list:', 'Format specific'));
  assert.equal(section(text, '    bitmaps:', '    refcount bits'), section(qemuText, '    bitmaps:', '    refcount bits'));
  assert.match(section(text, 'Snapshot list:', 'Format specific'), /a longer snapshot name/);
  assert.deepEqual(text.split('\n').slice(0, 4), qemuText.split('\n').slice(0, 4), 'image, format, virtual size, disk size');
});

test('bitmaps left inconsistent (autoclear bit 0 clear) are not listed, as in qemu-img info', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'b.qcow2', '1M');
  img(dir, 'bitmap', '--add', 'b.qcow2', 'b1');
  const path = join(dir, 'b.qcow2');
  writeU64(path, 88, readU64(path, 88) & ~1n); // autoclear_features
  const qemu = qemuInfo('b.qcow2', dir);
  const ours = JSON.parse(runCli(['info', '--json', 'b.qcow2'], { cwd: dir }).stdout) as Record<string, unknown>;
  const specific = (v: Record<string, unknown>) => (v['format-specific'] as { data: Record<string, unknown> }).data;
  assert.equal(specific(qemu)['bitmaps'], undefined);
  assert.equal(specific(ours)['bitmaps'], undefined);
});
