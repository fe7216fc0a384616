/**
 * The native data mover (src/native/qcow2_native.c copyClusters, OffsetWriter.copyClustersFrom,
 * ExternalWriter.copyFromFile): a plain file conversion copies without a Block per cluster.
 * It must make byte for byte the image the Blocks make (the reference path, forced here with
 * QCOW2_STREAM_NO_NATIVE), qemu-img must agree with it, and its failures must be as typed and
 * as clean as the Blocks' ones.
 */

import { test, mock, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isQcow2StreamError } from '../../src/errors.js';
import { isAllZero } from '../../src/io/buffers.js';
import { nativeAddon } from '../../src/io/native.js';
import { convert, type ConvertOptions, type ConvertSummary } from '../../src/write/convert.js';
import { ExternalWriter } from '../../src/write/external-sink.js';
import { mixedExtents, randomBytesAt, writeRawImage, type Extent } from '../helpers/images.js';
import { hasQemuImg, tempDir } from '../helpers/qemu.js';
import { leakedSince, openDescriptors } from '../helpers/descriptors.js';
import { allocatedBytes, assertQemuAgrees, KiB, MiB, sha256File, withoutNative } from './helpers.js';

const addon = nativeAddon();
const skipReason = addon ? undefined : 'the native addon is not built (or QCOW2_STREAM_NO_NATIVE is set): run npm install';

/** Counts the native copies while `fn` runs. */
async function countingCopies<T>(t: TestContext, fn: () => Promise<T>): Promise<{ result: T; copies: number }> {
  const copy = mock.method(addon!, 'copyClusters');
  t.after(() => copy.mock.restore());
  const result = await fn();
  const copies = copy.mock.callCount();
  copy.mock.restore();
  return { result, copies };
}

/** Converts natively and through Blocks; returns both summaries after checking the files are identical. */
async function convertBothWays(t: TestContext, dir: string, input: string, options: Partial<ConvertOptions> = {}) {
  const native = await countingCopies(t, () => convert({ input, output: join(dir, 'n.qcow2'), dataFile: join(dir, 'n.data'), dataFileName: 'x.data', sync: false, ...options }));
  const blocks = await withoutNative(() => convert({ input, output: join(dir, 'b.qcow2'), dataFile: join(dir, 'b.data'), dataFileName: 'x.data', sync: false, ...options }));
  assert.equal(sha256File(join(dir, 'n.qcow2')), sha256File(join(dir, 'b.qcow2')), 'metadata differs');
  assert.equal(sha256File(join(dir, 'n.data')), sha256File(join(dir, 'b.data')), 'data file differs');
  // The two runs store the same name for different files: both warn, naming their own output.
  const strip = ({ seconds: _s, dataFile: _d, warnings: _w, ...rest }: ConvertSummary) => rest;
  assert.deepEqual(strip(native.result), strip(blocks), 'summaries differ');
  return { native: native.result, copies: native.copies };
}

const CASES: Array<{ name: string; size: number; clusterSize: number; extents: (size: number, cs: number) => Extent[]; raw?: boolean }> = [
  { name: 'mixed, 64 KiB clusters, raw bit on', size: 23 * MiB + 4321, clusterSize: 64 * KiB, extents: (s, cs) => mixedExtents(s, cs, 3) },
  { name: 'mixed, 64 KiB clusters, raw bit off', size: 23 * MiB + 4321, clusterSize: 64 * KiB, extents: (s, cs) => mixedExtents(s, cs, 4), raw: false },
  { name: 'mixed, 512-byte clusters', size: 5 * MiB + 512, clusterSize: 512, extents: (s, cs) => mixedExtents(s, cs, 5) },
  { name: 'mixed, 4 KiB clusters', size: 9 * MiB + 100, clusterSize: 4 * KiB, extents: (s, cs) => mixedExtents(s, cs, 6) },
  { name: 'mixed, 2 MiB clusters', size: 40 * MiB + 3, clusterSize: 2 * MiB, extents: (s, cs) => mixedExtents(s, cs, 7) },
  { name: 'all data', size: 7 * MiB, clusterSize: 64 * KiB, extents: (s) => [{ offset: 0, length: s, kind: 'random' }] },
  { name: 'all written zeros', size: 7 * MiB, clusterSize: 64 * KiB, extents: (s) => [{ offset: 0, length: s, kind: 'zeros' }] },
  { name: 'one byte in the middle of each 2 MiB, short tail', size: 8 * MiB + 1, clusterSize: 64 * KiB, extents: (s) => [0, 1, 2, 3].map((i) => ({ offset: i * 2 * MiB + MiB + 7, length: 1, kind: 'random' as const })).concat([{ offset: s - 1, length: 1, kind: 'random' }]) },
];

for (const c of CASES) {
  test(`native copy = Blocks, byte for byte: ${c.name}`, { skip: skipReason }, async (t) => {
    const dir = tempDir(t);
    const input = join(dir, 'in.raw');
    writeRawImage(input, c.size, c.extents(c.size, c.clusterSize), 11);
    const { native, copies } = await convertBothWays(t, dir, input, { clusterSize: c.clusterSize, ...(c.raw === undefined ? {} : { dataFileRaw: c.raw }) });
    assert.ok(copies > 0, 'the native mover was not used');
    assert.equal(native.inputBytes, c.size);
    // Zero clusters stay holes: no more is allocated than the Blocks allocate, and (for clusters
    // of at least a file-system block) no more than the data written, plus a block of slack.
    assert.ok(allocatedBytes(join(dir, 'n.data')) <= allocatedBytes(join(dir, 'b.data')), 'more allocated than through Blocks');
    if (c.clusterSize >= 4 * KiB) assert.ok(allocatedBytes(join(dir, 'n.data')) <= native.dataBytesWritten + 4096, 'zero clusters were written');
    if (hasQemuImg) {
      writeFileSync(join(dir, 'x.data'), readFileSync(join(dir, 'n.data')));
      assertQemuAgrees('in.raw', 'n.qcow2', dir);
    }
  });
}

test('native copy: an empty input makes the same empty image', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), '');
  const { native } = await convertBothWays(t, dir, join(dir, 'in.raw'));
  assert.equal(native.virtualSize, 0);
});

test('native copy: holes queue behind the copies in flight, even one longer than the queue (2 GiB)', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  // 1 MiB extents apart, then a hole of 2.1 GiB: 68 hole pieces of 32 MiB behind one copy.
  const size = 2 * 1024 * MiB + 200 * MiB;
  const extents: Extent[] = [0, 3, 5, 40, 43, 2 * 1024 + 150, 2 * 1024 + 199].map((mib) => ({ offset: mib * MiB, length: MiB, kind: 'random' as const }));
  writeRawImage(input, size, extents, 21);
  for (const dataFileRaw of [true, false]) {
    const options = { input, dataFileRaw, dataFileName: 'x.data', sync: false, overwrite: true };
    const { result: native, copies } = await countingCopies(t, () => convert({ ...options, output: join(dir, 'n.qcow2'), dataFile: join(dir, 'n.data') }));
    const blocks = await withoutNative(() => convert({ ...options, output: join(dir, 'b.qcow2'), dataFile: join(dir, 'b.data') }));
    assert.equal(copies, extents.length, 'one copy per data extent');
    assert.equal(sha256File(join(dir, 'n.qcow2')), sha256File(join(dir, 'b.qcow2')), `metadata differs (raw bit ${dataFileRaw})`);
    assert.equal(native.dataClusters, blocks.dataClusters);
    assert.equal(native.dataClusters, (extents.length * MiB) / (64 * KiB));
    // Both data files hold the extents and nothing else.
    for (const name of ['n.data', 'b.data']) {
      const allocated = allocatedBytes(join(dir, name));
      assert.ok(allocated >= extents.length * MiB && allocated <= extents.length * MiB + 4096, `${name}: ${allocated} bytes allocated`);
      const fd = openSync(join(dir, name), 'r');
      t.after(() => closeSync(fd));
      for (const e of extents) {
        const bytes = Buffer.alloc(e.length);
        readSync(fd, bytes, 0, e.length, e.offset);
        assert.ok(bytes.equals(randomBytesAt(21, e.offset, e.length)), `${name} at ${e.offset}`);
      }
    }
  }
});

test('takeHole and copyFromFile take ranges in order, on cluster boundaries, and a write() after them comes last', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  writeRawImage(input, 4 * MiB, [{ offset: 0, length: 4 * MiB, kind: 'random' }], 5);
  const fd = openSync(input, 'r');
  t.after(() => closeSync(fd));
  const source = { fd, name: input };
  const writer = await ExternalWriter.create({ output: join(dir, 'o.qcow2'), dataFile: join(dir, 'o.data'), size: 4 * MiB + 64 * KiB, sync: false });
  await writer.copyFromFile(source, 0, MiB);
  await writer.takeHole(MiB, MiB);
  await assert.rejects(writer.takeHole(MiB, 64 * KiB), { code: 'QCOW_ERR_INVALID_ARGUMENT' }, 'a hole before the end of what was taken');
  await assert.rejects(writer.takeHole(2 * MiB + 512, 64 * KiB), { code: 'QCOW_ERR_INVALID_ARGUMENT' }, 'a hole off a cluster boundary');
  await assert.rejects(writer.takeHole(2 * MiB, 0), { code: 'QCOW_ERR_INVALID_ARGUMENT' }, 'an empty hole');
  await writer.copyFromFile(source, 2 * MiB, MiB);
  await writer.takeHole(3 * MiB, MiB);
  await writer.write({ index: 64, data: Buffer.alloc(64 * KiB, 7) });
  const summary = await writer.finish();
  assert.equal(summary.dataClusters, 2 * 16 + 1);
  const data = readFileSync(join(dir, 'o.data'));
  const expected = Buffer.concat([randomBytesAt(5, 0, MiB), Buffer.alloc(MiB), randomBytesAt(5, 2 * MiB, MiB), Buffer.alloc(MiB), Buffer.alloc(64 * KiB, 7)]);
  assert.ok(data.equals(expected), 'the data file holds the copies, the holes and the Block in place');
  if (hasQemuImg) {
    writeFileSync(join(dir, 'expected.raw'), expected);
    assertQemuAgrees('expected.raw', 'o.qcow2', dir);
  }
});

test('copyClusters: flags match the zero check, zero clusters are not written, a short source is reported', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const cs = 4 * KiB;
  const source = Buffer.alloc(40 * cs + 100);
  for (const i of [0, 3, 4, 9, 17, 39]) randomBytesAt(i, 0, cs).copy(source, i * cs);
  source[25 * cs + cs - 1] = 1; // only the last byte of a cluster
  source[40 * cs + 50] = 7; // in the short tail
  writeFileSync(join(dir, 'src'), source);
  const src = openSync(join(dir, 'src'), 'r');
  const dst = openSync(join(dir, 'dst'), 'w+');
  t.after(() => {
    closeSync(src);
    closeSync(dst);
  });
  const flags = new Uint8Array(41).fill(9);
  const read = await addon!.copyClusters(src, 0, dst, 1 * MiB, source.length, cs, flags);
  assert.equal(read, source.length);
  for (let i = 0; i < 41; i++) assert.equal(flags[i], isAllZero(source.subarray(i * cs, (i + 1) * cs)) ? 1 : 0, `cluster ${i}`);
  const written = readFileSync(join(dir, 'dst'));
  assert.equal(written.length, 1 * MiB + source.length);
  assert.ok(written.subarray(1 * MiB).equals(source));
  assert.ok(isAllZero(written.subarray(0, 1 * MiB)));

  // Nowhere to write (-1): the same flags, nothing written (the plan of a single-file image to a pipe).
  const scanFlags = new Uint8Array(41).fill(9);
  assert.equal(await addon!.copyClusters(src, 0, -1, 0, source.length, cs, scanFlags), source.length);
  assert.deepEqual([...scanFlags], [...flags]);

  // Past the end of the source: only what was read is checked and written.
  const tailFlags = new Uint8Array(4).fill(9);
  const short = await addon!.copyClusters(src, 39 * cs, dst, 0, 4 * cs, cs, tailFlags);
  assert.equal(short, cs + 100);
  assert.deepEqual([...tailFlags], [0, 0, 9, 9]);
});

test('copyClusters: a call longer than its 2 MiB pieces copies each piece to its place', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const cs = 64 * KiB;
  const size = 7 * MiB + 3 * KiB;
  writeRawImage(join(dir, 'src'), size, mixedExtents(size, cs, 21), 21);
  const source = readFileSync(join(dir, 'src'));
  const src = openSync(join(dir, 'src'), 'r');
  const dst = openSync(join(dir, 'dst'), 'w+');
  t.after(() => {
    closeSync(src);
    closeSync(dst);
  });
  const clusters = Math.ceil(size / cs);
  const flags = new Uint8Array(clusters);
  assert.equal(await addon!.copyClusters(src, 0, dst, 0, size, cs, flags), size);
  for (let i = 0; i < clusters; i++) assert.equal(flags[i], isAllZero(source.subarray(i * cs, (i + 1) * cs)) ? 1 : 0, `cluster ${i}`);
  const written = readFileSync(join(dir, 'dst'));
  assert.ok(Buffer.concat([written, Buffer.alloc(size - written.length)]).equals(source));
});

test('copyClusters: system-call failures reject with errno and syscall, bad arguments throw', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'src'), randomBytesAt(1, 0, 64 * KiB));
  const src = openSync(join(dir, 'src'), 'r');
  t.after(() => closeSync(src));
  const flags = new Uint8Array(1);
  // Writing to a descriptor opened read-only: EBADF from write().
  await assert.rejects(addon!.copyClusters(src, 0, src, 0, 64 * KiB, 64 * KiB, flags), (err: Error & { errno?: number; syscall?: string }) => {
    assert.equal(err.errno, -9);
    assert.equal(err.syscall, 'write');
    return true;
  });
  // Reading a closed descriptor: EBADF from read().
  const closed = openSync(join(dir, 'src'), 'r');
  closeSync(closed);
  await assert.rejects(addon!.copyClusters(closed, 0, src, 0, 64 * KiB, 64 * KiB, flags), { errno: -9, syscall: 'read' });
  assert.throws(() => addon!.copyClusters(src, 0, src, 0, 64 * KiB, 3000, flags), RangeError);
  assert.throws(() => addon!.copyClusters(src, 0, src, 0, 32 * MiB, 64 * KiB, new Uint8Array(512)), RangeError);
  assert.throws(() => addon!.copyClusters(src, 0, src, 0, 128 * KiB, 64 * KiB, flags), RangeError, 'one flag for two clusters');
  assert.throws(() => (addon!.copyClusters as (...args: unknown[]) => unknown)(src, 0, src, 0, 64 * KiB, 64 * KiB, [0]), TypeError);
});

test('native copy: an input shorter than its declared size is an InputSizeError and leaves nothing', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  writeRawImage(input, 6 * MiB, [{ offset: 0, length: 6 * MiB, kind: 'random' }]);
  const descriptors = openDescriptors();
  // The input is opened (size 6 MiB), then shrinks while the copies run: the short read ends it.
  const copy = addon!.copyClusters;
  const patched = mock.method(addon!, 'copyClusters', (...args: Parameters<typeof copy>) => {
    truncateSync(input, 3 * MiB);
    return copy.apply(addon, args);
  });
  t.after(() => patched.mock.restore());
  await assert.rejects(convert({ input, output: join(dir, 'out.qcow2'), sync: false }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_INPUT_SIZE', err.message);
    return true;
  });
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw']);
  assert.deepEqual(leakedSince(descriptors), []);
});

test('native copy: an abort stops it with an AbortedError, nothing left, no descriptor open', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  writeRawImage(input, 64 * MiB, [{ offset: 0, length: 64 * MiB, kind: 'random' }]);
  const descriptors = openDescriptors();
  const controller = new AbortController();
  let calls = 0;
  const copy = addon!.copyClusters;
  const patched = mock.method(addon!, 'copyClusters', (...args: Parameters<typeof copy>) => {
    if (++calls === 5) controller.abort();
    return copy.apply(addon, args);
  });
  t.after(() => patched.mock.restore());
  await assert.rejects(convert({ input, output: join(dir, 'out.qcow2'), signal: controller.signal }), { code: 'QCOW_ERR_ABORTED' });
  assert.ok(calls < 32, `${calls} copies: the abort did not stop the run`);
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw']);
  assert.deepEqual(leakedSince(descriptors), []);
});

test('native copy: progress goes up to the input size, in steps of the interval', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  const size = 40 * MiB + 512;
  writeRawImage(input, size, mixedExtents(size, 64 * KiB, 9));
  const seen: number[] = [];
  const { copies } = await countingCopies(t, () =>
    convert({ input, output: join(dir, 'out.qcow2'), sync: false, progressInterval: 8 * MiB, onProgress: (p) => seen.push(p.bytesDone) }),
  );
  assert.ok(copies > 0);
  assert.equal(seen.at(-1), size);
  assert.ok(seen.length >= 5, `${seen.length} reports`);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i]! > seen[i - 1]!, 'progress went back');
  assert.ok(existsSync(join(dir, 'out.data')));
});

/** Exports `image` natively and without the addon; checks both files are identical and returns the warnings. */
async function exportBothWays(t: TestContext, dir: string, image: string): Promise<{ warnings: readonly string[]; copies: number }> {
  const { openImage } = await import('../../src/read/image.js');
  const { exportToFile } = await import('../../src/read/export.js');
  const run = async (out: string) => {
    const opened = await openImage(image);
    try {
      return await exportToFile(opened, out, { sync: false, overwrite: true });
    } finally {
      await opened.close();
    }
  };
  const native = await countingCopies(t, () => run(join(dir, 'native.raw')));
  const plain = await withoutNative(() => run(join(dir, 'plain.raw')));
  assert.equal(sha256File(join(dir, 'native.raw')), sha256File(join(dir, 'plain.raw')), 'the exports differ');
  assert.ok(allocatedBytes(join(dir, 'native.raw')) <= allocatedBytes(join(dir, 'plain.raw')), 'the native export is less sparse');
  assert.deepEqual(native.result.warnings, plain.warnings);
  // (Past the end of a data file the buffered path writes the zeros of a granule it shares with data; the copy stops at the end.)
  if (plain.warnings.length === 0) assert.equal(native.result.bytesWritten, plain.bytesWritten);
  return { warnings: native.result.warnings, copies: native.copies };
}

test('native export = buffered export: external, internal and overlay images, and a data file shorter than the image maps', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const size = 21 * MiB + 512;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 64 * KiB, 31), 31);
  const input = join(dir, 'in.raw');
  await convert({ input, output: join(dir, 'ext.qcow2'), sync: false });
  await convert({ input, output: join(dir, 'int.qcow2'), layout: 'internal', sync: false });
  writeRawImage(join(dir, 'next.raw'), size, mixedExtents(size, 64 * KiB, 32), 32);
  await convert({ input: join(dir, 'next.raw'), output: join(dir, 'top.qcow2'), layout: 'internal', base: join(dir, 'int.qcow2'), sync: false });
  const source = readFileSync(input);
  for (const image of ['ext.qcow2', 'int.qcow2']) {
    const { warnings, copies } = await exportBothWays(t, dir, join(dir, image));
    assert.ok(copies > 0, `${image}: the native mover was not used`);
    assert.deepEqual(warnings, []);
    assert.ok(readFileSync(join(dir, 'native.raw')).equals(source), `${image}: not the input`);
  }
  await exportBothWays(t, dir, join(dir, 'top.qcow2'));
  assert.ok(readFileSync(join(dir, 'native.raw')).equals(readFileSync(join(dir, 'next.raw'))), 'overlay: not its input');
  // Cut the data file inside a chunk: its tail reads as zeros, with the image's warning.
  truncateSync(join(dir, 'ext.data'), 5 * MiB + 4096 + 100);
  const { warnings } = await exportBothWays(t, dir, join(dir, 'ext.qcow2'));
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /is 5247076 bytes long, but the image maps data at byte 5247076 and beyond/);
});

test('export reads only the data of a sparse data file (SEEK_HOLE), in both paths', { skip: skipReason }, async (t) => {
  const dir = tempDir(t);
  const size = 256 * MiB;
  // Two small data extents; the rest of the raw data file is holes (one extent in the image).
  writeRawImage(join(dir, 'in.raw'), size, [{ offset: 3 * MiB + 4096, length: 100 * KiB, kind: 'random' }, { offset: 200 * MiB, length: 3 * MiB, kind: 'random' }], 41);
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'sparse.qcow2'), sync: false });
  const { copies } = await exportBothWays(t, dir, join(dir, 'sparse.qcow2'));
  assert.ok(copies >= 2 && copies <= 4, `${copies} copies for two data extents`);
  assert.ok(readFileSync(join(dir, 'native.raw')).equals(readFileSync(join(dir, 'in.raw'))));
  assert.ok(allocatedBytes(join(dir, 'native.raw')) <= 4 * MiB);
});
