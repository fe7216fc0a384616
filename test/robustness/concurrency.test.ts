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
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { runLoad, type LoadSpec } from './load.js';
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

/** Bytes of input per conversion: big enough that holding the data would show in the peak. */
const CONVERT_SIZE = 64 * MiB;
/**
 * The peak resident set of 8 conversions of 64 MiB and 8 exports of 24 MiB running at once, above
 * the process's peak once loaded. Measured 140–160 MiB (each conversion keeps up to 8 spare
 * 2 MiB read buffers; 8 conversions of 256 MiB peak at the same), where holding the data would
 * take 700 MiB.
 */
const LOAD_RSS_BUDGET = 256 * MiB;

test('8 conversions (external and internal layouts) and 8 exports at once: byte-exact, bounded peak memory', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const images = makeImages(dir);
  const inputs = Array.from({ length: 8 }, (_, i) => {
    const path = join(dir, `in${i}.raw`);
    writeRawImage(path, CONVERT_SIZE, mixedExtents(CONVERT_SIZE, 65536, 100 + i), 100 + i);
    return path;
  });
  const out = (i: number) => join(dir, `c${i}.qcow2`);
  const conversions: LoadSpec['conversions'] = [
    { input: inputs[0]!, options: { output: out(0) } },
    { input: inputs[1]!, options: { output: out(1), dataFileRaw: false } },
    { input: inputs[2]!, stream: true, options: { output: out(2), dataFile: join(dir, 'c2.data') } },
    { input: inputs[3]!, options: { output: out(3), clusterSize: 4096, refcountBits: 1 } },
    { input: inputs[4]!, options: { output: out(4), layout: 'internal' } },
    { input: inputs[5]!, options: { output: out(5), layout: 'internal', dedup: true } },
    { input: inputs[6]!, options: { output: out(6), layout: 'internal', clusterSize: 2 * MiB } },
    { input: inputs[7]!, stream: true, options: { output: out(7), dataFile: join(dir, 'c7.data'), size: CONVERT_SIZE, clusterSize: 2 * MiB, dataFileRaw: false } },
  ];
  const exports = images.map((name) => ({ image: join(dir, name), output: join(dir, `${name}.out`) }));

  const report = await runLoad(dir, { conversions, exports });
  const growth = (report.maxRssKiB - report.baselineMaxRssKiB) * 1024;
  t.diagnostic(`peak rss ${(report.maxRssKiB / 1024).toFixed(1)} MiB, +${(growth / MiB).toFixed(1)} MiB over the loaded process, for 8 × ${CONVERT_SIZE / MiB} MiB converted and 8 × ${SIZE / MiB} MiB exported`);

  for (const [i, input] of inputs.entries()) {
    const compared = qemuCompare(input, out(i));
    assert.equal(compared.code, 0, `conversion ${i} differs from its input: ${compared.stdout}${compared.stderr}`);
    const checked = qemuCheck(out(i));
    assert.equal(checked.code, 0, `conversion ${i}: ${checked.stdout}${checked.stderr}`);
  }
  for (const name of images) {
    assert.ok(readFileSync(join(dir, `${name}.out`)).equals(qemuRaw(dir, name)), `${name}: differs from qemu-img convert -O raw`);
  }
  assert.ok(growth < LOAD_RSS_BUDGET, `the peak resident set grew by ${(growth / MiB).toFixed(1)} MiB`);
});
