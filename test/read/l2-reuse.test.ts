/**
 * Exporting or mapping a huge data-file image with the raw bit walks every L2 table (qemu
 * preallocates them all: 128 MiB per TiB). A fresh buffer per table read left that much garbage
 * outside the JS heap between collections, and peak RSS grew with the virtual size (about
 * +40 MB at 1 TiB, +100 MB at 4 TiB over the CLI's 93 MB). An evicted table's buffer is now
 * reused, so the walk allocates about as many buffers as the cache holds whatever the size; and
 * a table a walk still iterates is never handed to another read.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage, type Extent } from '../../src/read/image.js';
import type { Qcow2Image } from '../../src/read/qcow2-reader.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io } from './fixtures.js';

const KiB = 1024;
const GiB = 1024 * 1024 * KiB;
/** The smallest cache (the reader keeps at least 4 tables): every fifth table evicts one. */
const CACHE_TABLES = 4;

async function collect(extents: AsyncIterable<Extent>): Promise<Extent[]> {
  const all: Extent[] = [];
  for await (const extent of extents) all.push(extent);
  return all;
}

async function allExtents(path: string): Promise<Extent[]> {
  const image = await openImage(path);
  try {
    return await collect(image.extents());
  } finally {
    await image.close();
  }
}

test('walking a raw-bit data-file image allocates L2 buffers for the cache, not one per table', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // qemu preallocates every L2 table of a raw-bit image: 256 tables of 64 KiB for 128 GiB.
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=x.data,data_file_raw=on', 'x.qcow2', '128G');
  io(dir, 'x.qcow2', 'write -P 0x11 0 64k', 'write -P 0x22 100G 1M');
  const image = (await openImage(join(dir, 'x.qcow2'), { l2CacheBytes: CACHE_TABLES * 64 * KiB })) as Qcow2Image;
  try {
    const extents = await collect(image.extents());
    assert.deepEqual(
      extents.map((e) => [e.start, e.length, e.kind]),
      [[0, 128 * GiB, 'data']],
    );
    assert.ok(image.l2Allocations <= 2 * CACHE_TABLES, `${image.l2Allocations} L2 buffers allocated for 256 tables read through a ${CACHE_TABLES}-table cache`);
  } finally {
    await image.close();
  }
});

test('reused L2 buffers never change what a walk in progress reads: interleaved walks and reads through a 4-table cache', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // 4 KiB clusters: one L2 table maps 2 MiB, so 48 MiB take 24 tables; scattered writes make
  // every table's entries different (host offsets in allocation order, not guest order).
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'scatter.qcow2', '48M');
  const writes: string[] = [];
  for (let i = 0; i < 24; i++) writes.push(`write -P ${(i * 7 + 1) & 0xff} ${((i * 11) % 24) * 2 * 1024 + 8 + i}k 12k`, `write -z ${((i * 5) % 24) * 2 * 1024 + 1000}k 8k`);
  io(dir, 'scatter.qcow2', ...writes);
  img(dir, 'convert', '-O', 'raw', 'scatter.qcow2', 'scatter.raw');
  const expected = readFileSync(join(dir, 'scatter.raw'));
  const path = join(dir, 'scatter.qcow2');
  const reference = await allExtents(path);

  const image = (await openImage(path, { l2CacheBytes: CACHE_TABLES * 4 * KiB })) as Qcow2Image;
  try {
    const seen: Extent[] = [];
    for await (const extent of image.extents()) {
      seen.push(extent);
      // A read elsewhere across six tables evicts every table of the cache, the one this walk
      // is in the middle of included, while the walk holds it.
      const window = 12 * 1024 * KiB;
      const far = (extent.start + 24 * 1024 * KiB) % (image.virtualSize - window);
      const bytes = await image.read(far, window);
      assert.ok(Buffer.from(bytes).equals(expected.subarray(far, far + window)), `read at ${far} during the walk`);
    }
    assert.deepEqual(seen, reference);
    assert.ok(image.l2Allocations <= 2 * CACHE_TABLES + 2, `${image.l2Allocations} L2 buffers allocated`);
  } finally {
    await image.close();
  }
});
