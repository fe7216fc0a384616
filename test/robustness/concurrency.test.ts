/**
 * Eight exports at once in one process, each of a different kind of image: every output is
 * byte-exact against qemu-img, and memory stays bounded (each export holds a few 2 MiB chunks
 * and at most 8 MiB of L2 tables, whatever the image size). The peak is printed as a
 * diagnostic.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { img, io, qemuRaw } from '../read/fixtures.js';
import { leakedSince, openDescriptors } from '../helpers/descriptors.js';

const MiB = 1024 * 1024;
const SIZE = 24 * MiB;
/** Above the memory at the start, for all eight exports together. */
const ARRAY_BUFFER_BUDGET = 128 * MiB;
const RSS_BUDGET = 256 * MiB;

function makeImages(dir: string): string[] {
  writeRawImage(join(dir, 'src.raw'), SIZE, mixedExtents(SIZE, 65536, 5), 5);
  const writes = (p: number) => [`write -P ${p} 0 5M`, `write -P ${p + 1} 7M 3M`, 'write -z 12M 2M', `write -P ${p + 2} 20M 4M`];
  img(dir, 'create', '-f', 'qcow2', 'internal.qcow2', '24M');
  io(dir, 'internal.qcow2', ...writes(0x10));
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=ext.data', 'ext.qcow2', '24M');
  io(dir, 'ext.qcow2', ...writes(0x20));
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=raw.data,data_file_raw=on', 'raw-bit.qcow2', '24M');
  io(dir, 'raw-bit.qcow2', ...writes(0x30));
  img(dir, 'convert', '-c', '-O', 'qcow2', 'src.raw', 'zlib.qcow2');
  img(dir, 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'zstd.qcow2');
  img(dir, 'convert', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'small-clusters.qcow2');
  img(dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '24M');
  io(dir, 'v2.qcow2', ...writes(0x40));
  img(dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'internal.qcow2', '-F', 'qcow2', 'extl2-overlay.qcow2', '24M');
  io(dir, 'extl2-overlay.qcow2', 'write -P 0x55 4k 4k', 'write -P 0x56 6M 1M', 'write -z 21M 8k');
  return ['internal', 'ext', 'raw-bit', 'zlib', 'zstd', 'small-clusters', 'v2', 'extl2-overlay'].map((n) => `${n}.qcow2`);
}

test('8 exports at once of different images: byte-exact, bounded memory, nothing left open', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const names = makeImages(dir);
  const expected = new Map(names.map((name) => [name, qemuRaw(dir, name)]));
  const descriptors = openDescriptors();

  const base = process.memoryUsage();
  let peakRss = base.rss;
  let peakArrayBuffers = base.arrayBuffers;
  const sampler = setInterval(() => {
    const now = process.memoryUsage();
    peakRss = Math.max(peakRss, now.rss);
    peakArrayBuffers = Math.max(peakArrayBuffers, now.arrayBuffers);
  }, 5);
  try {
    await Promise.all(
      names.map(async (name) => {
        const image = await openImage(join(dir, name));
        try {
          await exportToFile(image, join(dir, `${name}.out`));
        } finally {
          await image.close();
        }
      }),
    );
  } finally {
    clearInterval(sampler);
  }
  const arrayBuffersGrowth = peakArrayBuffers - base.arrayBuffers;
  const rssGrowth = peakRss - base.rss;
  t.diagnostic(
    `peak rss ${(peakRss / MiB).toFixed(1)} MiB (+${(rssGrowth / MiB).toFixed(1)}), peak array buffers +${(arrayBuffersGrowth / MiB).toFixed(1)} MiB for 8 × ${SIZE / MiB} MiB`,
  );
  for (const name of names) {
    assert.ok(readFileSync(join(dir, `${name}.out`)).equals(expected.get(name)!), `${name}: differs from qemu-img convert -O raw`);
  }
  assert.ok(arrayBuffersGrowth < ARRAY_BUFFER_BUDGET, `array buffers grew by ${arrayBuffersGrowth} bytes`);
  assert.ok(rssGrowth < RSS_BUDGET, `rss grew by ${rssGrowth} bytes`);
  assert.deepEqual(leakedSince(descriptors), []);
});
