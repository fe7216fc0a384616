import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { detectFormat, isVhdFooter, probeFile, probeFormat, rawNameWarning } from '../../src/read/probe.js';
import { openDisk } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { convert } from '../../src/write/convert.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;

/** Makes `name` with qemu-img create; returns its path. */
function create(dir: string, name: string, format: string, size: string, options: string[] = []): string {
  let made = qemuImg(['create', '-q', '-f', format, ...options, name, size], dir);
  // qemu's LUKS key setup benchmarks PBKDF with CPU-time samples, which a loaded machine can
  // make unusable ("Unable to get accurate CPU usage"): the oracle's hiccup, so try again.
  for (let tries = 0; made.code !== 0 && made.stderr.includes('accurate CPU usage') && tries < 5; tries++) {
    made = qemuImg(['create', '-q', '-f', format, ...options, name, size], dir);
  }
  assert.equal(made.code, 0, made.stderr);
  return join(dir, name);
}

test('the probe names every format qemu-img makes, as qemu-img does', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cases: Array<[string, string, string[], string]> = [
    ['qcow2', 'a.img', [], 'qcow2'],
    ['vmdk', 'sparse.img', ['-o', 'subformat=monolithicSparse'], 'vmdk'],
    ['vmdk', 'stream.img', ['-o', 'subformat=streamOptimized'], 'vmdk'],
    ['vmdk', 'flat.img', ['-o', 'subformat=monolithicFlat'], 'vmdk'],
    ['vmdk', 'split.img', ['-o', 'subformat=twoGbMaxExtentSparse'], 'vmdk'],
    ['vpc', 'dyn.img', ['-o', 'subformat=dynamic'], 'vpc'],
    ['vpc', 'fixed.img', ['-o', 'subformat=fixed'], 'vpc'],
    ['vhdx', 'x.img', [], 'vhdx'],
    ['vdi', 'x.vdi', [], 'vdi'],
    ['qed', 'x.qed', [], 'qed'],
    ['parallels', 'x.hdd', [], 'parallels'],
    ['qcow', 'x.qcow', [], 'qcow'],
    ['luks', 'x.luks', ['--object', 'secret,id=s0,data=pw', '-o', 'key-secret=s0,iter-time=200'], 'luks'],
    ['raw', 'plain.img', [], 'raw'],
  ];
  for (const [format, name, options, expected] of cases) {
    const path = create(dir, name, format, '3M', options);
    assert.equal(await probeFile(path), expected, `${format} ${options.join(' ')}`);
  }
});

test('recognised formats no reader opens are refused by name; raw is read; wrong names warn', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [format, name, options] of [
    ['vdi', 'x.vdi', []],
    ['qed', 'x.qed', []],
    ['parallels', 'x.hdd', []],
    ['luks', 'x.luks', ['--object', 'secret,id=s0,data=pw', '-o', 'key-secret=s0,iter-time=200']],
  ] as const) {
    const path = create(dir, name, format, '1M', [...options]);
    await assert.rejects(probeFormat(path), (err: unknown) => {
      assert.ok(isQcow2StreamError(err));
      assert.equal(err.code, 'QCOW_ERR_UNSUPPORTED_FORMAT');
      assert.equal((err as unknown as { format: string }).format, format);
      return true;
    });
    await assert.rejects(openDisk(path), { code: 'QCOW_ERR_UNSUPPORTED_FORMAT' });
  }
  const raw = create(dir, 'named.vhd', 'raw', '1M');
  const warnings: string[] = [];
  assert.equal(await probeFormat(raw, { onWarning: (w) => warnings.push(w) }), 'raw');
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /named like a VHD image/);
  assert.equal(rawNameWarning(join(dir, 'disk.img')), undefined);
  assert.match(rawNameWarning('a.QCOW2') ?? '', /qcow2/);
});

test('detectFormat: structure, not just magic, where the magic is weak', () => {
  const text = (s: string) => new TextEncoder().encode(s);
  assert.equal(detectFormat(text('# Disk DescriptorFile\nversion=1\nCID=1\n')), 'vmdk');
  assert.equal(detectFormat(text('# comment\r\n  \r\nversion=3\r\n')), 'vmdk');
  assert.equal(detectFormat(text('hello\nversion=1\n')), 'raw');
  assert.equal(detectFormat(text('version=4\n')), 'raw');
  assert.equal(detectFormat(new Uint8Array(0)), 'raw');
  // A qcow2 magic with version 1 is qcow; a cloop, bochs or DMG is named too.
  assert.equal(detectFormat(Uint8Array.of(0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1)), 'qcow');
  assert.equal(detectFormat(text('Bochs Virtual HD Image\0')), 'bochs');
  assert.equal(detectFormat(text('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n')), 'cloop');
  const koly = new Uint8Array(512);
  koly.set(text('koly'));
  assert.equal(detectFormat(new Uint8Array(512), koly), 'dmg');

  // A fixed VHD is known by its footer alone: the cookie without a valid checksum is raw.
  const footer = new Uint8Array(512);
  footer.set(text('conectix'));
  const view = new DataView(footer.buffer);
  view.setUint32(60, 2);
  assert.equal(isVhdFooter(footer), false, 'bad checksum');
  let sum = 0;
  for (const byte of footer) sum += byte;
  view.setUint32(64, ~sum >>> 0);
  assert.equal(isVhdFooter(footer), true);
  assert.equal(detectFormat(new Uint8Array(512), footer), 'vpc');
  view.setUint32(60, 7);
  assert.equal(detectFormat(new Uint8Array(512), footer), 'raw', 'unknown disk type');
});

test('convert and export refuse an unsupported container with exit 2 and leave no output', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  create(dir, 'x.vdi', 'vdi', '1M');
  create(dir, 'x.qed', 'qed', '1M');
  for (const input of ['x.vdi', 'x.qed']) {
    for (const args of [['convert', input, 'out.qcow2'], ['export', input, 'out.raw'], ['map', input], ['info', input]]) {
      const result = runCli(args, { cwd: dir });
      assert.equal(result.code, 2, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /is a (VirtualBox VDI|QED) image.*\[QCOW_ERR_UNSUPPORTED_FORMAT\]/);
      assert.doesNotMatch(result.stderr, /^\s+at /m);
    }
  }
  assert.deepEqual(readdirSync(dir).sort(), ['x.qed', 'x.vdi']);
});

test('-f raw overrides the probe: the container bytes are then the disk, as asked', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const vdi = create(dir, 'x.vdi', 'vdi', '1M');
  const image = await openDisk(vdi, { format: 'raw' });
  await exportToFile(image, join(dir, 'bytes.raw'), { sync: false });
  await image.close();
  await convert({ input: vdi, inputFormat: 'raw', output: join(dir, 'o.qcow2'), sync: false });
  assert.ok(existsSync(join(dir, 'o.data')));
  assert.equal(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', vdi, 'o.qcow2'], dir).code, 0);
  writeFileSync(join(dir, 'zero.vmdk'), new Uint8Array(MiB));
  const warned = runCli(['convert', 'zero.vmdk', 'z.qcow2', '-q'], { cwd: dir });
  assert.equal(warned.code, 0, warned.stderr);
  assert.match(warned.stderr, /warning: 'zero\.vmdk' is named like a VMDK image/);
  const forced = runCli(['convert', '-f', 'raw', 'zero.vmdk', 'z2.qcow2', '-q'], { cwd: dir });
  assert.equal(forced.code, 0, forced.stderr);
  assert.equal(forced.stderr, '', 'no warning when the format is given');
});
