/**
 * Zero runs (Block.count: one Block for many zero clusters, a hole the source never read)
 * through every sink and transform: each must give exactly what the same clusters one by one
 * give, and qemu-img must agree with the result.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { expandZeroRuns, zeroRun, type Block } from '../../src/block.js';
import { InvalidArgumentError } from '../../src/errors.js';
import { zeroBuffer } from '../../src/io/buffers.js';
import { OffsetWriter } from '../../src/io/output.js';
import { AllocationBitmap } from '../../src/write/bitmap.js';
import { convert, type ConvertOptions } from '../../src/write/convert.js';
import { createExternalSink, ExternalWriter } from '../../src/write/external-sink.js';
import { InternalImageWriter } from '../../src/write/internal-sink.js';
import { MetadataEmitter, type ClusterState } from '../../src/write/metadata.js';
import { resolveImageSettings } from '../../src/write/settings.js';
import { createFileBlockSource } from '../../src/write/sources.js';
import { wrap } from '../../src/write/wrap.js';
import { createHasher } from '../../transforms/fingerprint.js';
import { ManifestWriter } from '../../transforms/manifest.js';
import { createZeroDetectStream, zeroDetect } from '../../transforms/zero-detect.js';
import { patternBytes, randomBytesAt } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, qemuImg, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, collect, KiB, MemoryWritable, MiB, withoutNative } from './helpers.js';

test('AllocationBitmap.setRange marks exactly what set() per cluster marks', () => {
  const ranges: Array<[number, number]> = [[0, 1], [3, 5], [7, 9], [8, 16], [17, 40], [63, 64], [100, 1000], [1001, 1003], [5000, 70_000]];
  const byRange = new AllocationBitmap();
  const byCluster = new AllocationBitmap();
  for (const [start, end] of ranges) {
    byRange.setRange(start, end);
    for (let i = start; i < end; i++) byCluster.set(i);
  }
  byRange.setRange(10, 10); // empty: changes nothing
  assert.equal(byRange.count(), byCluster.count());
  for (let i = 0; i < 70_100; i++) assert.equal(byRange.get(i), byCluster.get(i), `cluster ${i}`);
  assert.equal(byRange.anyInRange(1, 3), false);
  assert.equal(byRange.anyInRange(69_999, 80_000), true);
  assert.equal(byRange.anyInRange(70_000, 80_000), false, 'the end is exclusive');
});

/** What happens to a stretch of clusters: [first, first + count) in one state. */
type Step = [first: number, count: number, state: ClusterState];

/** Runs crossing L2 tables at 512-byte clusters (64 entries a table), in every state. */
const steps: Step[] = [
  [0, 1, 'data'],
  [1, 150, 'zero'],
  [151, 1, 'data'],
  [152, 1, 'zero'],
  [153, 64, 'unchanged'],
  [217, 3, 'data'],
  [220, 200, 'zero'],
  [420, 1, 'data'],
];
const STEP_CLUSTERS = 421;

test('MetadataEmitter.recordRun writes the same bytes as record() for each cluster', async (t) => {
  const dir = tempDir(t);
  const clusterSize = 512;
  const virtualSize = STEP_CLUSTERS * clusterSize;
  const layouts: Array<{ name: string; dataFileRaw: boolean; backing: boolean; output: 'file' | 'stream'; sizeKnown: boolean }> = [
    { name: 'raw, streamed', dataFileRaw: true, backing: false, output: 'file', sizeKnown: true },
    { name: 'raw, size unknown', dataFileRaw: true, backing: false, output: 'file', sizeKnown: false },
    { name: 'sparse, at the end', dataFileRaw: false, backing: false, output: 'file', sizeKnown: true },
    { name: 'sparse, streamed', dataFileRaw: false, backing: false, output: 'stream', sizeKnown: true },
    { name: 'overlay, at the end', dataFileRaw: false, backing: true, output: 'file', sizeKnown: true },
    { name: 'overlay, streamed', dataFileRaw: false, backing: true, output: 'stream', sizeKnown: true },
  ];
  for (const layout of layouts) {
    const outputs: Buffer[] = [];
    for (const byRun of [false, true]) {
      const path = join(dir, `${layout.name}-${byRun}.qcow2`);
      const memory = new MemoryWritable();
      const output = await OffsetWriter.create(layout.output === 'file' ? path : memory, { label: 'metadata file', sync: false });
      const emitter = new MetadataEmitter(output, {
        settings: resolveImageSettings({ clusterSize, dataFileRaw: layout.dataFileRaw }),
        dataFileName: 'disk.data',
        ...(layout.backing ? { backing: { name: 'base.qcow2', format: 'qcow2' } } : {}),
        ...(layout.sizeKnown ? { virtualSize } : {}),
      });
      await emitter.start();
      for (const [first, count, rawState] of steps) {
        // Without a backing file there is nothing to be unchanged against.
        const state = rawState === 'unchanged' && !layout.backing ? 'zero' : rawState;
        if (byRun) await emitter.recordRun(first, count, state);
        else for (let i = first; i < first + count; i++) await emitter.record(i, state);
      }
      await emitter.finish(virtualSize);
      await output.commit();
      outputs.push(layout.output === 'file' ? readFileSync(path) : memory.bytes());
    }
    assert.ok(outputs[0]!.length > 0);
    assert.ok(outputs[0]!.equals(outputs[1]!), layout.name);
  }
});

test('MetadataEmitter.recordRun writes the L2 tables a run passes at once, so a pipe reader sees them', async () => {
  const memory = new MemoryWritable();
  const output = await OffsetWriter.create(memory, { label: 'metadata file' });
  // 64 KiB clusters: 8192 entries per L2 table, and each table fills a write batch of its own.
  const clusterSize = 65536;
  const virtualSize = 4 * 8192 * clusterSize;
  const emitter = new MetadataEmitter(output, { settings: resolveImageSettings({ clusterSize, dataFileRaw: true }), dataFileName: 'disk.data', virtualSize });
  await emitter.start();
  const front = memory.bytes().length;
  await emitter.recordRun(0, 8192 * 3 + 10, 'zero');
  assert.equal(memory.bytes().length, front + 3 * clusterSize, 'tables 0–2 are complete and out; table 3 is still open');
  await emitter.finish(virtualSize);
  await output.commit();
});

/**
 * Blocks for `steps` as runs, or one cluster each; data clusters hold a pattern of their index.
 * `unchanged` clusters are zeros marked `sameAsBase` when `overlay`, plain zeros otherwise.
 */
function stepBlocks(clusterSize: number, asRuns: boolean, tail?: Uint8Array, overlay = false): Block[] {
  const blocks: Block[] = [];
  for (const [first, count, state] of steps) {
    const marks = state === 'unchanged' && overlay ? { sameAsBase: true } : {};
    if (state === 'data') {
      for (let i = first; i < first + count; i++) blocks.push({ index: i, data: patternBytes(clusterSize, i) });
    } else if (asRuns) {
      blocks.push({ ...zeroRun(first, count, clusterSize), ...marks });
    } else {
      for (let i = first; i < first + count; i++) blocks.push({ index: i, data: zeroBuffer(clusterSize), zero: true, ...marks });
    }
  }
  if (tail) blocks.push({ index: STEP_CLUSTERS, data: tail });
  return blocks;
}

test('hand-made zero runs through zero-detect and the external sink (files and a data pipe) give the same image', async (t) => {
  const dir = tempDir(t);
  const clusterSize = 512;
  const tail = randomBytesAt(3, 0, 300); // a short last cluster after the runs
  const size = STEP_CLUSTERS * clusterSize + tail.length;
  for (const dataFileRaw of [true, false]) {
    const results: Array<{ data: Buffer; metadata: Buffer; piped: Buffer; dataClusters: number; zeroClusters: number }> = [];
    for (const asRuns of [false, true]) {
      // The same file names in two directories: the stored data-file name is part of the metadata.
      const where = join(dir, `raw-${dataFileRaw}-runs-${asRuns}`);
      mkdirSync(where);
      const sink = createExternalSink({ output: join(where, 'image.qcow2'), dataFile: join(where, 'image.data'), dataFileName: 'image.data', clusterSize, dataFileRaw, size, sync: false });
      await pipeline(Readable.from(stepBlocks(clusterSize, asRuns, tail)), createZeroDetectStream(), sink);
      const summary = await sink.finished;
      // The same Blocks into a data file that is a pipe: the holes become real zeros.
      const pipe = new MemoryWritable();
      const writer = await ExternalWriter.create({ output: join(where, 'piped.qcow2'), dataFile: pipe, dataFileName: 'piped.data', clusterSize, dataFileRaw, sync: false });
      for await (const block of zeroDetect(stepBlocks(clusterSize, asRuns, tail))) await writer.write(block);
      await writer.finish();
      results.push({
        data: readFileSync(join(where, 'image.data')),
        metadata: readFileSync(join(where, 'image.qcow2')),
        piped: pipe.bytes(),
        dataClusters: summary.dataClusters,
        zeroClusters: summary.zeroClusters,
      });
      if (needQemu(t)) {
        const expected = Buffer.concat([...stepBlocks(clusterSize, false, tail).map((b) => b.data)]);
        writeFileSyncSparse(join(where, 'expected.raw'), expected);
        assertQemuAgrees(join(where, 'expected.raw'), 'image.qcow2', where);
      }
    }
    const [single, runs] = results;
    assert.ok(single!.data.equals(runs!.data), `data file, raw ${dataFileRaw}`);
    assert.ok(single!.metadata.equals(runs!.metadata), `metadata, raw ${dataFileRaw}`);
    assert.ok(single!.piped.equals(runs!.piped) && single!.piped.equals(single!.data), `piped data file, raw ${dataFileRaw}`);
    assert.deepEqual([runs!.dataClusters, runs!.zeroClusters], [single!.dataClusters, single!.zeroClusters]);
  }
});

test('hand-made zero runs through the internal sink (plain, dedup, overlay) and the manifest writer', async (t) => {
  const dir = tempDir(t);
  const clusterBits = 9;
  const clusterSize = 2 ** clusterBits;
  const hasher = await createHasher();
  const tail = randomBytesAt(4, 0, 100);
  const size = STEP_CLUSTERS * clusterSize + tail.length;
  const variants = [
    { name: 'plain', dedup: false, backing: false },
    { name: 'dedup', dedup: true, backing: false },
    { name: 'overlay', dedup: false, backing: true },
  ];
  for (const variant of variants) {
    const images: Buffer[] = [];
    const manifests: Buffer[] = [];
    for (const asRuns of [false, true]) {
      const image = join(dir, `${variant.name}-${asRuns}.qcow2`);
      const manifestPath = join(dir, `${variant.name}-${asRuns}.xxh`);
      const writer = await InternalImageWriter.create({
        output: image,
        clusterSize: 2 ** clusterBits,
        refcountBits: 16,
        size,
        sync: false,
        dedup: variant.dedup ? { hasher } : undefined,
        backing: variant.backing ? { name: 'base.qcow2', format: 'qcow2' } : undefined,
      });
      const manifest = await ManifestWriter.create({ output: manifestPath, hasher, clusterSize });
      for (const block of stepBlocks(clusterSize, asRuns, tail, variant.backing)) {
        await manifest.add(block);
        await writer.write(block);
      }
      await writer.finish();
      await manifest.finish(size);
      images.push(readFileSync(image));
      manifests.push(readFileSync(manifestPath));
    }
    assert.ok(images[0]!.equals(images[1]!), `image: ${variant.name}`);
    assert.ok(manifests[0]!.equals(manifests[1]!), `manifest: ${variant.name}`);
  }
  if (!needQemu(t)) return;
  const expected = Buffer.concat(stepBlocks(clusterSize, false, tail).map((b) => b.data));
  writeFileSyncSparse(join(dir, 'expected.raw'), expected);
  for (const name of ['plain-true', 'dedup-true']) {
    assert.equal(qemuCheck(`${name}.qcow2`, dir).code, 0, name);
    assert.equal(qemuCompare('expected.raw', `${name}.qcow2`, dir).code, 0, name);
  }
  // The overlay's zero runs must hide whatever its backing file holds: zero-flagged entries.
  writeFileSyncSparse(join(dir, 'ones.raw'), Buffer.alloc(size, 0xff));
  assert.equal(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'ones.raw'), join(dir, 'base.qcow2')]).code, 0);
  assert.equal(qemuCheck('overlay-true.qcow2', dir).code, 0);
  const overlayView = Buffer.from(expected);
  // 'unchanged' clusters read from the base (all 0xff); every other cluster as written.
  for (const [first, count, state] of steps) if (state === 'unchanged') overlayView.fill(0xff, first * clusterSize, (first + count) * clusterSize);
  writeFileSyncSparse(join(dir, 'overlay-expected.raw'), overlayView);
  const cmp = qemuCompare('overlay-expected.raw', 'overlay-true.qcow2', dir);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
});

/** Writes `bytes` to `path`, leaving whole zero 4 KiB blocks as holes; returns the path. */
function writeFileSyncSparse(path: string, bytes: Buffer): string {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, bytes.length);
    for (let off = 0; off < bytes.length; off += 4096) {
      const chunk = bytes.subarray(off, off + 4096);
      if (chunk.some((b) => b !== 0)) writeSync(fd, chunk, 0, chunk.length, off);
    }
  } finally {
    closeSync(fd);
  }
  return path;
}

test('a zero run is refused where it cannot be: after a short block, or not made of whole clusters', async (t) => {
  const dir = tempDir(t);
  const open = () => ExternalWriter.create({ output: join(dir, 'x.qcow2'), dataFile: join(dir, 'x.data'), dataFileName: 'x.data', clusterSize: 512, overwrite: true, sync: false });
  const afterShort = await open();
  await afterShort.write({ index: 0, data: new Uint8Array(100), zero: true });
  await assert.rejects(afterShort.write(zeroRun(1, 4, 512)), InvalidArgumentError);
  await afterShort.abort();
  const overlapped = await open();
  await overlapped.write(zeroRun(0, 4, 512));
  await assert.rejects(overlapped.write({ index: 2, data: new Uint8Array(512) }), InvalidArgumentError, 'a block inside an earlier run');
  await overlapped.abort();
  const partial = await open();
  await assert.rejects(partial.write({ index: 0, count: 3, data: new Uint8Array(100), zero: true }), InvalidArgumentError);
  await assert.rejects(partial.write({ index: 0, count: 0, data: new Uint8Array(512), zero: true }), InvalidArgumentError);
  await partial.abort();
});

test('zero-detect marks a zero run zero and passes it on whole (generator and stream)', async () => {
  const run = (): Block => ({ index: 7, count: 40, data: zeroBuffer(4096) });
  const [fromGenerator] = await collect(zeroDetect([run()]));
  const [fromStream] = await collect(Readable.from([run()]).pipe(createZeroDetectStream()) as AsyncIterable<Block>);
  for (const block of [fromGenerator!, fromStream!]) assert.deepEqual([block.index, block.count, block.zero], [7, 40, true]);
});

test('expandZeroRuns gives one zero Block per cluster and passes other Blocks through', async () => {
  const data = { index: 5, data: new Uint8Array([1]) };
  const out = await collect(expandZeroRuns([zeroRun(2, 3, 512), data]));
  assert.deepEqual(out.map((b) => [b.index, b.zero ?? false, b.data.length, b.count]), [[2, true, 512, undefined], [3, true, 512, undefined], [4, true, 512, undefined], [5, false, 1, undefined]]);
  assert.equal(out[3], data);
});

/** A sparse raw image with big holes (runs), small ones (read), written zeros, repeated and random data. */
function sparseRaw(path: string, size: number, seed: number, dataInTheLongHole = false): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    const put = (offset: number, bytes: Uint8Array) => writeSync(fd, bytes, 0, bytes.length, offset);
    put(1 * MiB + 1000, randomBytesAt(seed, 0, 70 * KiB)); // after a 1 MiB hole, edges inside clusters
    put(1 * MiB + 200 * KiB, Buffer.alloc(128 * KiB)); // written zeros after a small hole
    put(3 * MiB, patternBytes(64 * KiB, 7)); // two copies of one cluster (dedup)
    put(6 * MiB, patternBytes(64 * KiB, 7));
    put(6 * MiB + 96 * KiB, randomBytesAt(seed, 1, 8 * KiB)); // a small extent 32 KiB after the copy
    put(size - 500, randomBytesAt(seed, 2, 500)); // the short tail after a long hole
    // A base may hold data where the next image has a hole: an overlay must hide it.
    if (dataInTheLongHole) put(8 * MiB + 4 * KiB, randomBytesAt(seed, 3, 100 * KiB));
  } finally {
    closeSync(fd);
  }
}


test('convert(): every layout, dedup, manifests and overlays give the same files with and without the probe', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 10 * MiB + 300;
  sparseRaw(join(dir, 'base.raw'), size, 1, true);
  sparseRaw(join(dir, 'next.raw'), size, 2); // the same layout, other random bytes
  const base = await convert({ input: join(dir, 'base.raw'), output: join(dir, 'base.qcow2'), layout: 'internal', manifest: join(dir, 'base.xxh'), clusterSize: 4096, sync: false });
  assert.equal(base.inputBytes, size);
  const variants: Array<{ name: string; options: Partial<ConvertOptions>; files: string[] }> = [
    { name: 'raw', options: { clusterSize: 4096 }, files: ['qcow2', 'data'] },
    { name: 'sparse', options: { clusterSize: 4096, dataFileRaw: false, manifest: '' }, files: ['qcow2', 'data', 'xxh'] },
    { name: 'big-clusters', options: { clusterSize: 2 * MiB }, files: ['qcow2', 'data'] },
    { name: 'internal', options: { layout: 'internal', clusterSize: 4096 }, files: ['qcow2'] },
    { name: 'dedup', options: { layout: 'internal', dedup: true, clusterSize: 4096, manifest: '' }, files: ['qcow2', 'xxh'] },
    { name: 'overlay', options: { base: join(dir, 'base.qcow2'), clusterSize: 4096 }, files: ['qcow2', 'data'] },
    { name: 'overlay-manifest', options: { base: join(dir, 'base.qcow2'), baseManifest: join(dir, 'base.xxh'), clusterSize: 4096 }, files: ['qcow2', 'data'] },
  ];
  for (const { name, options, files } of variants) {
    const outputs: Buffer[][] = [];
    for (const native of [true, false]) {
      // The same file names in two directories: the stored data-file name is part of the metadata.
      const where = join(dir, `${name}-native-${native}`);
      mkdirSync(where);
      const stem = join(where, name);
      const run = () =>
        convert({
          ...options,
          input: join(dir, 'next.raw'),
          output: `${stem}.qcow2`,
          ...(options.layout === 'internal' ? {} : { dataFile: `${stem}.data`, dataFileName: `${name}.data` }),
          ...(options.manifest === '' ? { manifest: `${stem}.xxh` } : {}),
          sync: false,
        });
      const summary = native ? await run() : await withoutNative(run);
      assert.equal(summary.inputBytes, size, name);
      assertQemuAgrees(join(dir, 'next.raw'), `${name}.qcow2`, where);
      outputs.push(files.map((ext) => readFileSync(`${stem}.${ext}`)));
    }
    files.forEach((ext, i) => assert.ok(outputs[0]![i]!.equals(outputs[1]![i]!), `${name}: .${ext} differs between the probe and the fallback`));
  }
});

test('wrap in sparse mode: the same metadata with and without the probe', async (t) => {
  const dir = tempDir(t);
  const size = 10 * MiB + 300;
  sparseRaw(join(dir, 'disk.raw'), size, 4);
  const outputs: Buffer[] = [];
  for (const native of [true, false]) {
    const output = join(dir, `wrapped-${native}.qcow2`);
    const run = () => wrap({ input: join(dir, 'disk.raw'), output, dataFileName: 'disk.raw', dataFileRaw: false, clusterSize: 4096, sync: false });
    const summary = native ? await run() : await withoutNative(run);
    assert.ok(summary.dataClusters > 0 && summary.dataClusters < Math.ceil(size / 4096), 'some clusters data, some not');
    if (needQemu(t)) assertQemuAgrees(join(dir, 'disk.raw'), `wrapped-${native}.qcow2`, dir);
    outputs.push(readFileSync(output));
  }
  assert.ok(outputs[0]!.equals(outputs[1]!), 'the probe changed the metadata');
});

test('createFileBlockSource with zeroRuns feeds the stream stages the same image', async (t) => {
  const dir = tempDir(t);
  const size = 10 * MiB + 300;
  sparseRaw(join(dir, 'in.raw'), size, 3);
  const outputs: Buffer[] = [];
  for (const zeroRuns of [false, true]) {
    const where = join(dir, `runs-${zeroRuns}`);
    mkdirSync(where);
    const sink = createExternalSink({ output: join(where, 'o.qcow2'), dataFile: join(where, 'o.data'), dataFileName: 'o.data', size, sync: false });
    await pipeline(createFileBlockSource(join(dir, 'in.raw'), { zeroRuns }), createZeroDetectStream(), sink);
    const summary = await sink.finished;
    assert.equal(summary.inputBytes, size);
    outputs.push(Buffer.concat([readFileSync(join(where, 'o.qcow2')), readFileSync(join(where, 'o.data'))]));
    if (needQemu(t)) assertQemuAgrees(join(dir, 'in.raw'), 'o.qcow2', where);
  }
  assert.ok(outputs[0]!.equals(outputs[1]!));
});
