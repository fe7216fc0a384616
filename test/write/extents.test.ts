/**
 * The extent probe (src/io/extents.ts, the optional native addon) and the sources that use it:
 * with the probe a file's holes are found and never read, without it (QCOW2_STREAM_NO_NATIVE=1,
 * or no addon) everything is read; either way the Blocks carry the same bytes.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { expandZeroRuns, type Block } from '../../src/block.js';
import { InputSizeError } from '../../src/errors.js';
import { isAllZero } from '../../src/io/buffers.js';
import { dataExtents, extentProbeKind, NO_NATIVE_ENV, type DataExtent } from '../../src/io/extents.js';
import { fileHandleTarget, readBlocks, READ_SIZE } from '../../src/write/sources.js';
import { randomBytesAt } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { collect, KiB, MiB, withoutNative } from './helpers.js';

const nativeBuilt = extentProbeKind() === 'native';

/** Skips a test that needs the addon where it was not built (the fallback tests still run). */
function needNative(t: TestContext): boolean {
  if (nativeBuilt) return true;
  t.skip(`the native extent probe is not available (not built, or ${NO_NATIVE_ENV} is set): run npm install`);
  return false;
}

/** A file of `size` bytes holding random data in `ranges` and holes everywhere else. */
function sparseFile(path: string, size: number, ranges: ReadonlyArray<readonly [start: number, end: number]>): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const [start, end] of ranges) writeSync(fd, randomBytesAt(start, start, end - start), 0, end - start, start);
  } finally {
    closeSync(fd);
  }
}

/** File layouts around the edge cases, data at 4 KiB-aligned offsets (the file system's block). */
const layouts: Record<string, { size: number; ranges: Array<[number, number]> }> = {
  'hole at the start': { size: 8 * MiB, ranges: [[3 * MiB, 8 * MiB]] },
  'hole in the middle': { size: 8 * MiB, ranges: [[0, 1 * MiB], [5 * MiB, 8 * MiB]] },
  'hole at the end': { size: 8 * MiB, ranges: [[0, 2 * MiB]] },
  'all hole': { size: 8 * MiB, ranges: [] },
  'no holes': { size: 8 * MiB, ranges: [[0, 8 * MiB]] },
  'many small extents': { size: 6 * MiB, ranges: Array.from({ length: 12 }, (_, i): [number, number] => [i * 512 * KiB, i * 512 * KiB + 4 * KiB]) },
  // Holes just under and at the size worth skipping (256 KiB), then a long one at the end.
  'holes around the threshold': { size: 1 * MiB, ranges: [[0, 64 * KiB], [256 * KiB, 320 * KiB], [576 * KiB, 640 * KiB]] },
  empty: { size: 0, ranges: [] },
};

async function extentsOf(path: string, start: number, end: number): Promise<DataExtent[]> {
  const handle = await open(path, 'r');
  try {
    return [...dataExtents(handle.fd, start, end)];
  } finally {
    await handle.close();
  }
}

test('dataExtents: the probe reports exactly the written ranges; without it, the whole range is data', async (t) => {
  const dir = tempDir(t);
  for (const [name, { size, ranges }] of Object.entries(layouts)) {
    const path = join(dir, `${name}.raw`);
    sparseFile(path, size, ranges);
    assert.deepEqual(await withoutNative(() => extentsOf(path, 0, size)), size === 0 ? [] : [{ start: 0, end: size }], `fallback: ${name}`);
    if (nativeBuilt) {
      assert.deepEqual(await extentsOf(path, 0, size), ranges.map(([start, end]) => ({ start, end })), `native: ${name}`);
    }
  }
  if (!needNative(t)) return;
  // A window into the file: extents are clipped to it, and one that starts in a hole skips it.
  const path = join(dir, 'hole in the middle.raw');
  assert.deepEqual(await extentsOf(path, 512 * KiB, 5 * MiB + 512 * KiB), [
    { start: 512 * KiB, end: 1 * MiB },
    { start: 5 * MiB, end: 5 * MiB + 512 * KiB },
  ]);
  assert.deepEqual(await extentsOf(path, 2 * MiB, 4 * MiB), []);
  // A range past the end of the file is all hole.
  assert.deepEqual(await extentsOf(path, 8 * MiB, 16 * MiB), []);
});

/** Reads a file into Blocks with the given options. */
async function blocksOf(path: string, clusterSize: number, zeroRuns: boolean): Promise<Block[]> {
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    return await collect(readBlocks(fileHandleTarget(handle, { name: path }), { clusterSize, size, zeroRuns }));
  } finally {
    await handle.close();
  }
}

/** Blocks as comparable values: index, zero flag, bytes; zero runs expanded. */
async function flattened(blocks: Block[]): Promise<Array<{ index: number; bytes: string }>> {
  const out = [];
  for await (const block of expandZeroRuns(blocks)) out.push({ index: block.index, bytes: Buffer.from(block.data).toString('base64') });
  return out;
}

/** Asserts the Blocks tile the file: in order, no gap, no overlap, runs of whole zero clusters. */
function assertTiles(blocks: Block[], file: Buffer, clusterSize: number, label: string): void {
  let next = 0;
  for (const block of blocks) {
    assert.equal(block.index, next, `${label}: block ${block.index} follows ${next - 1}`);
    if (block.count !== undefined) {
      assert.ok(block.count >= 1 && block.zero === true && block.data.length === clusterSize, `${label}: run at ${block.index}`);
      const bytes = file.subarray(block.index * clusterSize, (block.index + block.count) * clusterSize);
      assert.equal(bytes.length, block.count * clusterSize, `${label}: a run never covers the short last cluster`);
      assert.ok(isAllZero(bytes), `${label}: the run at ${block.index} covers only zeros`);
    }
    next += block.count ?? 1;
  }
  assert.equal(next, Math.ceil(file.length / clusterSize), `${label}: every cluster is covered`);
}

test('readBlocks with zeroRuns: the same bytes with and without the probe, holes as runs only with it', async (t) => {
  const dir = tempDir(t);
  const cases: Array<{ name: string; size: number; ranges: Array<[number, number]> }> = [
    ...Object.entries(layouts).map(([name, layout]) => ({ name, ...layout })),
    // Edges that fall inside clusters of every size above 4 KiB, and a short last cluster after a hole.
    { name: 'unaligned edges', size: 9 * MiB + 700, ranges: [[1 * MiB + 4 * KiB, 1 * MiB + 12 * KiB], [4 * MiB - 4 * KiB, 4 * MiB + 4 * KiB]] },
    // A short last cluster that holds data.
    { name: 'data in the short tail', size: 5 * MiB + 100, ranges: [[5 * MiB, 5 * MiB + 100]] },
  ];
  for (const { name, size, ranges } of cases) {
    const path = join(dir, `${name}.raw`);
    sparseFile(path, size, ranges);
    const file = readFileSync(path);
    for (const clusterSize of [512, 4 * KiB, 64 * KiB, READ_SIZE]) {
      const label = `${name}, ${clusterSize}-byte clusters`;
      const plain = await blocksOf(path, clusterSize, false);
      const fallback = await withoutNative(() => blocksOf(path, clusterSize, true));
      assert.ok(plain.every((b) => b.count === undefined) && fallback.every((b) => b.count === undefined), `${label}: runs only with the probe`);
      assert.deepEqual(await flattened(fallback), await flattened(plain), label);
      if (!nativeBuilt) continue;
      const native = await blocksOf(path, clusterSize, true);
      assertTiles(native, file, clusterSize, label);
      assert.deepEqual(await flattened(native), await flattened(plain), label);
      // Holes of 256 KiB or more are skipped (smaller ones are cheaper to read than to split a read for).
      const runClusters = native.reduce((n, b) => n + (b.count ?? 0), 0);
      assert.equal(runClusters, skippedClusters(size, ranges, clusterSize), `${label}: clusters skipped`);
    }
  }
  needNative(t);
});

/**
 * The clusters a probing source should skip: every stretch of whole clusters that no data range
 * touches and that is at least 256 KiB (and one cluster) long; the short last cluster is read.
 */
function skippedClusters(size: number, ranges: ReadonlyArray<readonly [number, number]>, clusterSize: number): number {
  const minHole = Math.max(clusterSize, 256 * KiB);
  const lastWhole = size - (size % clusterSize);
  let skipped = 0;
  let dataEnd = 0;
  for (const [start, end] of [...ranges, [lastWhole, size] as const]) {
    const hole = Math.floor(start / clusterSize) * clusterSize - dataEnd;
    if (hole >= minHole) skipped += hole / clusterSize;
    dataEnd = Math.max(dataEnd, Math.min(size, Math.ceil(end / clusterSize) * clusterSize));
  }
  return skipped;
}

test('readBlocks with zeroRuns still refuses a file shorter than the size it was given', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'short.raw');
  sparseFile(path, 1 * MiB, [[0, 64 * KiB]]);
  for (const native of nativeBuilt ? [true, false] : [false]) {
    const run = async () => {
      const handle = await open(path, 'r');
      try {
        await collect(readBlocks(fileHandleTarget(handle, { name: path }), { clusterSize: 64 * KiB, size: 4 * MiB, zeroRuns: true }));
      } finally {
        await handle.close();
      }
    };
    await assert.rejects(native ? run() : withoutNative(run), InputSizeError, `native probe ${native}`);
  }
});
