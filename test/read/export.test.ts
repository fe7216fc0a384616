/**
 * Every kind of image qemu makes, exported by the reader and compared byte for byte with
 * `qemu-img convert -O raw` of the same image.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { openDisk, openImage, type OpenImageOptions } from '../../src/read/image.js';
import { exportStream, exportToFile } from '../../src/read/export.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { mixedExtents, randomBytesAt, writeRawImage } from '../helpers/images.js';
import { img, io, qemuRaw, writeBytes } from './fixtures.js';

/** Exports `image` (in `dir`) with our reader to a file and returns the bytes and warnings. */
async function ourRaw(dir: string, image: string, options: OpenImageOptions = {}): Promise<{ bytes: Buffer; warnings: readonly string[] }> {
  const opened = await openImage(join(dir, image), options);
  try {
    const out = join(dir, `${image}.ours.raw`);
    const result = await exportToFile(opened, out, { overwrite: true });
    return { bytes: readFileSync(out), warnings: result.warnings };
  } finally {
    await opened.close();
  }
}

async function assertSameAsQemu(dir: string, image: string, options: OpenImageOptions = {}): Promise<readonly string[]> {
  const expected = qemuRaw(dir, image);
  const { bytes, warnings } = await ourRaw(dir, image, options);
  assert.equal(bytes.length, expected.length, `${image}: size`);
  assert.ok(bytes.equals(expected), `${image}: content differs from qemu-img convert -O raw`);
  return warnings;
}

/** Asserts the data file holds non-zero bytes at `offset` (so reading it there would be wrong). */
function assertStale(path: string, offset: number): void {
  const bytes = readFileSync(path).subarray(offset, offset + 4096);
  assert.ok(bytes.some((b) => b !== 0), `expected stale data in ${path} at ${offset}`);
}

test('external data file, raw bit off: zero flags over stale data-file bytes read as zeros', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'a.qcow2', '4M');
  io(dir, 'a.qcow2', 'write -P 0xab 0 1M', 'write -z 256k 128k', 'discard 512k 64k', 'write -P 0x11 3M 128k', 'write -z 3M 64k', 'write -P 0x22 4032k 64k');
  assertStale(join(dir, 'd.data'), 3 * 1024 * 1024);
  const warnings = await assertSameAsQemu(dir, 'a.qcow2');
  assert.deepEqual(warnings, []);
});

test('external data file, raw bit on', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data,data_file_raw=on', 'a.qcow2', '3M');
  io(dir, 'a.qcow2', 'write -P 0xcd 64k 1M', 'write -z 128k 64k', 'discard 640k 128k', 'write -P 0x01 0 512');
  await assertSameAsQemu(dir, 'a.qcow2');
});

test('internal data, v3: plain and preallocated zero clusters, discards', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'a.qcow2', '2M');
  io(dir, 'a.qcow2', 'write -P 0x5a 0 768k', 'write -z 64k 64k', 'discard 256k 64k', 'write -z 1M 128k');
  await assertSameAsQemu(dir, 'a.qcow2');
  img(dir, 'create', '-f', 'qcow2', '-o', 'preallocation=metadata', 'p.qcow2', '1M');
  io(dir, 'p.qcow2', 'write -P 0x77 0 512k', 'write -z 128k 64k');
  await assertSameAsQemu(dir, 'p.qcow2');
});

test('version 2 (compat=0.10)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '2M');
  io(dir, 'v2.qcow2', 'write -P 0x42 32k 300k', 'write -z 128k 64k', 'discard 256k 64k');
  const opened = await openImage(join(dir, 'v2.qcow2'));
  assert.equal(opened.header?.version, 2);
  await opened.close();
  await assertSameAsQemu(dir, 'v2.qcow2');
});

test('compressed clusters: deflate and zstd, mixed with incompressible ones', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeRawImage(join(dir, 'src.raw'), 3 * 1024 * 1024 + 4096, mixedExtents(3 * 1024 * 1024 + 4096, 65536, 7));
  img(dir, 'convert', '-c', '-O', 'qcow2', 'src.raw', 'z.qcow2');
  img(dir, 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'zs.qcow2');
  img(dir, 'convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'z4k.qcow2');
  for (const name of ['z.qcow2', 'zs.qcow2', 'z4k.qcow2']) {
    const opened = await openImage(join(dir, name));
    let compressed = 0;
    for await (const e of opened.extents()) if (e.compressed) compressed++;
    await opened.close();
    assert.ok(compressed > 0, `${name} has compressed clusters`);
    await assertSameAsQemu(dir, name);
  }
  // read() across a compressed cluster boundary, unaligned
  const image = await openImage(join(dir, 'zs.qcow2'));
  const expected = readFileSync(join(dir, 'src.raw'));
  assert.ok(Buffer.from(await image.read(65536 - 100, 70000)).equals(expected.subarray(65536 - 100, 65536 - 100 + 70000)));
  await image.close();
});

test('extended L2: partial subcluster writes, zero subclusters, backing read through unallocated subclusters', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '1M');
  io(dir, 'base.qcow2', 'write -P 0x33 0 1M');
  img(dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', 'x.qcow2', '1M');
  io(dir, 'x.qcow2', 'write -P 0x44 4k 4k', 'write -P 0x55 70k 10k', 'write -z 8k 2k', 'write -z 200k 6k', 'discard 72k 2k');
  await assertSameAsQemu(dir, 'x.qcow2');
});

test('extended L2 with a raw data file: allocated host cluster with bitmap 0 reads zeros, not the data file (P15)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on,data_file=d.data,data_file_raw=on', 'x.qcow2', '1M');
  io(dir, 'x.qcow2', 'write -P 0x66 0 8k');
  // Bytes written straight into the data file where the bitmap says "unallocated".
  writeBytes(join(dir, 'd.data'), 128 * 1024, Buffer.alloc(4096, 0x99));
  const { bytes } = await ourRaw(dir, 'x.qcow2');
  assert.equal(bytes[128 * 1024], 0);
  await assertSameAsQemu(dir, 'x.qcow2');
});

test('backing chain of three, different cluster sizes, backing shorter and raw at the bottom', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeFileSync(join(dir, 'bottom.raw'), randomBytesAt(3, 0, 700 * 1024));
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'bottom.raw', '-F', 'raw', 'mid.qcow2', '1M');
  io(dir, 'mid.qcow2', 'write -P 0x12 100k 20k', 'write -z 300k 8k');
  img(dir, 'create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '3M');
  io(dir, 'top.qcow2', 'write -P 0x34 0 64k', 'write -P 0x56 2M 64k');
  await assertSameAsQemu(dir, 'top.qcow2');
  const image = await openImage(join(dir, 'top.qcow2'));
  const depths = new Set<number>();
  for await (const e of image.extents()) depths.add(e.depth);
  await image.close();
  assert.deepEqual([...depths].sort(), [0, 1, 2]);
});

test('cluster sizes 512 B and 2 MiB, and a size that is not a multiple of the cluster', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512', 's.qcow2', '3M');
  io(dir, 's.qcow2', 'write -P 0x21 1000 300k', 'write -z 2k 1k', 'write -P 0x22 2M 513');
  await assertSameAsQemu(dir, 's.qcow2');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=2M,data_file=big.data', 'b.qcow2', '5M');
  io(dir, 'b.qcow2', 'write -P 0x23 1M 2M', 'write -z 4M 512k', 'write -P 0x24 4608k 4k');
  await assertSameAsQemu(dir, 'b.qcow2');
  img(dir, 'create', '-f', 'qcow2', 'odd.qcow2', '1000000');
  io(dir, 'odd.qcow2', 'write -P 0x25 983040 17408');
  const opened = await openImage(join(dir, 'odd.qcow2'));
  assert.equal(opened.virtualSize, 1000448);
  await opened.close();
  await assertSameAsQemu(dir, 'odd.qcow2');
});

test('a data file shorter than the image reads zeros past its end, with a warning', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'a.qcow2', '1M');
  io(dir, 'a.qcow2', 'write -P 0x31 0 512k');
  truncateSync(join(dir, 'd.data'), 100000);
  const seen: string[] = [];
  const warnings = await assertSameAsQemu(dir, 'a.qcow2', { onWarning: (m) => seen.push(m) });
  assert.equal(warnings.length, 1);
  assert.match(warnings[0] ?? '', /data file .* is 100000 bytes long/);
  assert.deepEqual(seen, warnings);
});

test('an explicitly given data file replaces the stored name', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=gone.data', 'a.qcow2', '1M');
  io(dir, 'a.qcow2', 'write -P 0x41 0 256k');
  const expected = qemuRaw(dir, 'a.qcow2');
  writeFileSync(join(dir, 'moved.data'), readFileSync(join(dir, 'gone.data')));
  truncateSync(join(dir, 'gone.data'), 0);
  const { bytes } = await ourRaw(dir, 'a.qcow2', { dataFile: join(dir, 'moved.data') });
  assert.ok(bytes.equals(expected));
});

test('exportStream yields the same bytes, and a file export keeps zero ranges as holes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'a.qcow2', '64M');
  io(dir, 'a.qcow2', 'write -P 0x61 0 1M', 'write -P 0x62 40M 3M');
  const expected = qemuRaw(dir, 'a.qcow2');
  const image = await openDisk(join(dir, 'a.qcow2'));
  const chunks: Buffer[] = [];
  for await (const chunk of exportStream(image)) chunks.push(chunk as Buffer);
  assert.ok(Buffer.concat(chunks).equals(expected));

  // To a Writable (a pipe-like sink): zeros are written out.
  const sink = new PassThrough();
  const received: Buffer[] = [];
  sink.on('data', (c: Buffer) => received.push(c));
  await exportToFile(image, sink);
  const streamed = Buffer.concat(received);
  assert.equal(streamed.length, expected.length);
  assert.ok(streamed.equals(expected));

  const out = join(dir, 'sparse.raw');
  await exportToFile(image, out);
  await image.close();
  const stats = statSync(out);
  assert.equal(stats.size, 64 * 1024 * 1024);
  assert.ok(stats.blocks * 512 < 8 * 1024 * 1024, `expected a sparse file, got ${stats.blocks * 512} bytes allocated`);
});

test('raw images open through openDisk (probed and explicit)', async (t) => {
  const dir = tempDir(t);
  const bytes = randomBytesAt(9, 0, 300000);
  writeFileSync(join(dir, 'r.raw'), bytes);
  const image = await openDisk(join(dir, 'r.raw'));
  assert.equal(image.format, 'raw');
  assert.equal(image.virtualSize, 300032); // rounded up to 512 like qemu; the padding reads as zeros
  assert.deepEqual([...(await image.read(299990, 42))].slice(10), new Array(32).fill(0));
  assert.ok(Buffer.from(await image.read(1234, 5000)).equals(bytes.subarray(1234, 6234)));
  await image.close();
});
