/**
 * map against `qemu-img map --output=json`, and compareImages against `qemu-img compare`.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk } from '../../src/read/image.js';
import { mapImage, formatMapJsonEntry, type MapEntry } from '../../src/read/map.js';
import { compareImages } from '../../src/read/compare.js';
import { needQemu, qemuImg, run, tempDir } from '../helpers/qemu.js';
import { extentProbeKind } from '../../src/io/extents.js';
import { traceCalls } from '../robustness/faults.js';
import { randomBytesAt } from '../helpers/images.js';
import { img, io } from './fixtures.js';

type QemuMapEntry = Omit<MapEntry, 'file' | 'compressed'>;

async function ourMap(path: string, format?: 'qcow2' | 'raw'): Promise<QemuMapEntry[]> {
  const image = await openDisk(path, format ? { format } : {});
  const out: QemuMapEntry[] = [];
  // Through the JSON formatter, so what is compared is what the CLI prints.
  for await (const entry of mapImage(image)) out.push(JSON.parse(formatMapJsonEntry(entry)) as QemuMapEntry);
  await image.close();
  return out;
}

test('map agrees with qemu-img map on data-file, internal, zero-flag and backing-chain images', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '4M');
  io(dir, 'ext.qcow2', 'write -P 0x11 0 128k', 'write -z 64k 64k', 'write -z 1M 64k', 'write -P 0x12 2M 192k', 'discard 2112k 64k');
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '4M');
  io(dir, 'base.qcow2', 'write -P 0x11 0 128k', 'write -P 0x22 1M 64k');
  img(dir, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2', '8M');
  io(dir, 'ov.qcow2', 'write -P 0x33 64k 64k', 'write -z 1M 64k', 'write -P 0x44 5M 64k', 'write -z 6M 64k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on', 'x.qcow2', '1M');
  io(dir, 'x.qcow2', 'write -P 0x55 4k 4k', 'write -z 64k 2k');
  for (const image of ['ext.qcow2', 'base.qcow2', 'ov.qcow2', 'x.qcow2']) {
    const qemu = JSON.parse(qemuImg(['map', '--output=json', image], dir).stdout) as QemuMapEntry[];
    assert.deepEqual(await ourMap(join(dir, image)), qemu, image);
  }
});

test('compareImages: identical, first differing sector, size mismatch with zero and non-zero excess', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const base = randomBytesAt(5, 0, 1024 * 1024);
  writeFileSync(join(dir, 'a.raw'), base);
  img(dir, 'convert', '-f', 'raw', '-O', 'qcow2', 'a.raw', 'a.qcow2');
  const changed = Buffer.from(base);
  changed[700_000] = (changed[700_000] ?? 0) ^ 0xff;
  writeFileSync(join(dir, 'b.raw'), changed);
  writeFileSync(join(dir, 'longer-zero.raw'), Buffer.concat([base, Buffer.alloc(65536)]));
  writeFileSync(join(dir, 'longer-data.raw'), Buffer.concat([base, Buffer.alloc(70000), Buffer.from([1])]));

  const compare = async (x: string, y: string) => {
    const a = await openDisk(join(dir, x));
    const b = await openDisk(join(dir, y));
    try {
      return await compareImages(a, b);
    } finally {
      await a.close();
      await b.close();
    }
  };
  const qemuSays = (x: string, y: string) => qemuImg(['compare', x, y], dir).stdout;

  assert.deepEqual(await compare('a.raw', 'a.qcow2'), { identical: true, sizeMismatch: false });
  assert.match(qemuSays('a.raw', 'a.qcow2'), /Images are identical/);

  const diff = await compare('a.qcow2', 'b.raw');
  assert.equal(diff.identical, false);
  assert.equal(diff.mismatchOffset, Math.floor(700_000 / 512) * 512);
  assert.match(qemuSays('a.qcow2', 'b.raw'), new RegExp(`Content mismatch at offset ${diff.mismatchOffset}!`));

  assert.deepEqual(await compare('a.qcow2', 'longer-zero.raw'), { identical: true, sizeMismatch: true });
  assert.match(qemuSays('a.qcow2', 'longer-zero.raw'), /Images are identical/);

  const tail = await compare('longer-data.raw', 'a.qcow2');
  assert.equal(tail.identical, false);
  assert.match(qemuSays('longer-data.raw', 'a.qcow2'), new RegExp(`Content mismatch at offset ${tail.mismatchOffset}!`));
});

test('map of a 0-byte image is one entry of length 0, as qemu-img map prints it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'empty.qcow2', '0');
  writeFileSync(join(dir, 'empty.raw'), '');
  for (const [image, format] of [['empty.qcow2', 'qcow2'], ['empty.raw', 'raw']] as const) {
    const qemu = JSON.parse(qemuImg(['map', '--output=json', '-f', format, image], dir).stdout) as QemuMapEntry[];
    assert.deepEqual(await ourMap(join(dir, image), format), qemu, image);
    assert.equal(qemu.length, 1);
  }
});

test('map asks the file below for its holes where qemu does: raw layers and metadata-preallocated qcow2', async (t) => {
  if (!needQemu(t)) return;
  if (extentProbeKind() !== 'native') {
    t.skip('needs the native hole probe (SEEK_DATA/SEEK_HOLE); without it holes read as data, as documented');
    return;
  }
  const dir = tempDir(t);
  // A sparse raw file, as an image and as a backing file.
  writeFileSync(join(dir, 'base.raw'), '');
  truncateSync(join(dir, 'base.raw'), 4 * 1024 * 1024);
  const fd = openSync(join(dir, 'base.raw'), 'r+');
  writeSync(fd, randomBytesAt(3, 0, 8192), 0, 8192, 1024 * 1024);
  closeSync(fd);
  img(dir, 'create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2');
  io(dir, 'top.qcow2', 'write -P 1 2M 64k');
  // preallocation=metadata: every cluster allocated, the file mostly holes.
  img(dir, 'create', '-f', 'qcow2', '-o', 'preallocation=metadata', 'prealloc.qcow2', '4M');
  io(dir, 'prealloc.qcow2', 'write -P 1 1M 4k');
  // Data clusters refcounted but punched out of the file (as after `snapshot -a`): past qemu's
  // threshold the holes read as zeros; one punched cluster is below it and still reads as data.
  img(dir, 'create', '-f', 'qcow2', 'punched.qcow2', '4M');
  io(dir, 'punched.qcow2', 'write -P 7 0 4M');
  copyFileSync(join(dir, 'punched.qcow2'), join(dir, 'one-hole.qcow2'));
  const firstData = 0x50000;
  assert.equal(run('fallocate', ['-p', '-o', String(firstData + 65536), '-l', String(3 * 1024 * 1024), 'punched.qcow2'], dir).code, 0);
  assert.equal(run('fallocate', ['-p', '-o', String(firstData + 65536), '-l', '65536', 'one-hole.qcow2'], dir).code, 0);
  const cases = [['base.raw', 'raw'], ['top.qcow2', 'qcow2'], ['prealloc.qcow2', 'qcow2'], ['punched.qcow2', 'qcow2'], ['one-hole.qcow2', 'qcow2']] as const;
  for (const [image, format] of cases) {
    const qemu = JSON.parse(qemuImg(['map', '--output=json', '-f', format, image], dir).stdout) as QemuMapEntry[];
    assert.deepEqual(await ourMap(join(dir, image), format), qemu, image);
  }
  const top = await ourMap(join(dir, 'top.qcow2'));
  assert.ok(top.some((e) => e.depth === 1 && e.zero && !e.data), 'a hole of the raw backing file is zero, not data');
  const prealloc = await ourMap(join(dir, 'prealloc.qcow2'));
  assert.ok(prealloc.some((e) => e.zero && e.data), 'a hole under a preallocated cluster is zero');
});

test('compare -f raw of a big sparse raw file reads none of its holes, and still finds what differs where qemu does', async (t) => {
  if (!needQemu(t)) return;
  if (extentProbeKind() !== 'native') {
    t.skip('needs the native hole probe (SEEK_DATA/SEEK_HOLE); without it the holes are read, as documented');
    return;
  }
  const dir = tempDir(t);
  const GiB = 1024 ** 3;
  // Issue 13, item 15: a sparse raw file of 2 GiB with 100 KiB of data.
  const raw = join(dir, 'big.raw');
  writeFileSync(raw, '');
  truncateSync(raw, 2 * GiB);
  const data = randomBytesAt(5, 0, 100 * 1024);
  const fd = openSync(raw, 'r+');
  writeSync(fd, data, 0, data.length, 1_500_000_000);
  closeSync(fd);
  img(dir, 'convert', '-f', 'raw', '-O', 'qcow2', 'big.raw', 'image.qcow2');
  const compare = async (x: string, y: string, xFormat: 'raw' | 'qcow2', yFormat: 'raw' | 'qcow2') => {
    const a = await openDisk(join(dir, x), { format: xFormat });
    const b = await openDisk(join(dir, y), { format: yFormat });
    try {
      return await compareImages(a, b);
    } finally {
      await a.close();
      await b.close();
    }
  };
  const reads = await traceCalls(t, 'read', (path) => path.endsWith('/big.raw'));
  const bytesRead = () => reads.calls.reduce((sum, args) => sum + Number(args[2]), 0);
  assert.deepEqual(await compare('big.raw', 'image.qcow2', 'raw', 'qcow2'), { identical: true, sizeMismatch: false });
  assert.ok(bytesRead() <= 4 * 1024 * 1024, `read ${bytesRead()} bytes of a raw file holding 100 KiB of data`);
  assert.ok(bytesRead() >= data.length, `the data itself is compared (read ${bytesRead()} in ${reads.calls.length} calls)`);

  // A difference inside the data, and one where the raw file has a hole: qemu's offsets.
  io(dir, 'image.qcow2', 'write -P 0x5a 1500050000 1', 'write -P 0x5b 1800000000 1');
  const mismatch = await compare('big.raw', 'image.qcow2', 'raw', 'qcow2');
  assert.equal(mismatch.mismatchOffset, Math.floor(1_500_050_000 / 512) * 512);
  assert.match(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'big.raw', 'image.qcow2'], dir).stdout, new RegExp(`offset ${mismatch.mismatchOffset}!`));
  io(dir, 'image.qcow2', `write -P ${data[50_000 - 0]} 1500050000 1`);
  const inHole = await compare('image.qcow2', 'big.raw', 'qcow2', 'raw');
  assert.equal(inHole.mismatchOffset, Math.floor(1_800_000_000 / 512) * 512);
  assert.match(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', 'image.qcow2', 'big.raw'], dir).stdout, new RegExp(`offset ${inHole.mismatchOffset}!`));
  assert.ok(bytesRead() <= 12 * 1024 * 1024, `read ${bytesRead()} bytes over three comparisons`);

  // A longer sparse raw file: its excess is holes, not read, and reads as zeros.
  const longer = join(dir, 'longer.raw');
  writeFileSync(longer, '');
  truncateSync(longer, 3 * GiB);
  const longerFd = openSync(longer, 'r+');
  writeSync(longerFd, data, 0, data.length, 1_500_000_000);
  closeSync(longerFd);
  const longerReads = await traceCalls(t, 'read', (path) => path.endsWith('/longer.raw'));
  const r = await compare('longer.raw', 'big.raw', 'raw', 'raw');
  assert.deepEqual(r, { identical: true, sizeMismatch: true });
  const longerBytes = longerReads.calls.reduce((sum, args) => sum + Number(args[2]), 0);
  assert.ok(longerBytes <= 4 * 1024 * 1024, `read ${longerBytes} bytes of the longer file`);
});
