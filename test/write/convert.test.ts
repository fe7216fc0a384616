import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import fc from 'fast-check';
import { convert, type ConvertOptions } from '../../src/write/convert.js';
import { roundUpToSector } from '../../src/format/index.js';
import { isAllZero } from '../../src/io/buffers.js';
import { mixedExtents, writeRawImage, type Extent } from '../helpers/images.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { allocatedBytes, assertQemuAgrees, chunksOf, decodeImage, assertRefcountsExact, KiB, MiB, qemuFacts } from './helpers.js';

/** Per guest cluster: does qemu-img map report data there? */
function mappedData(image: string, cwd: string, clusterSize: number, size: number): boolean[] {
  const map = qemuImg(['map', '--output=json', image], cwd);
  assert.equal(map.code, 0, map.stderr);
  const out = new Array<boolean>(Math.ceil(size / clusterSize)).fill(false);
  for (const e of JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean }>) {
    for (let c = Math.floor(e.start / clusterSize); c * clusterSize < e.start + e.length && c < out.length; c++) out[c] = e.data;
  }
  return out;
}

function nonZeroClusters(raw: Uint8Array, clusterSize: number, virtualSize: number): boolean[] {
  const out: boolean[] = [];
  for (let off = 0; off < virtualSize; off += clusterSize) out.push(!isAllZero(raw.subarray(off, off + clusterSize)));
  return out;
}

interface Case {
  clusterSize: number;
  refcountBits: number;
  dataFileRaw: boolean;
  size: number;
  /** How the input reaches convert(): a path, or an async iterable chunked by this pattern. */
  chunks?: number[];
  declareSize?: boolean;
}

/** Converts a generated image in `dir` and checks it with qemu-img and our own decoder. */
async function convertAndVerify(dir: string, c: Case, name: string, extents?: Extent[]): Promise<void> {
  const raw = join(dir, `${name}.raw`);
  writeRawImage(raw, c.size, extents ?? mixedExtents(c.size, c.clusterSize, c.size % 97));
  const input: ConvertOptions['input'] = c.chunks ? Readable.from(chunksOf(readFileSync(raw), c.chunks)) : raw;
  const summary = await convert({
    input,
    output: join(dir, `${name}.qcow2`),
    dataFile: join(dir, `${name}.data`),
    dataFileName: `${name}.data`,
    clusterSize: c.clusterSize,
    refcountBits: c.refcountBits,
    dataFileRaw: c.dataFileRaw,
    ...(c.declareSize ? { size: c.size } : {}),
  });
  const label = JSON.stringify(c);
  const virtualSize = roundUpToSector(c.size);
  assert.equal(summary.virtualSize, virtualSize, label);
  assert.equal(summary.inputBytes, c.size, label);
  assert.equal(statSync(join(dir, `${name}.data`)).size, virtualSize, `data file ends at the virtual size: ${label}`);
  assertQemuAgrees(`${name}.raw`, `${name}.qcow2`, dir);
  const facts = qemuFacts(`${name}.qcow2`, dir);
  assert.equal(facts.virtualSize, virtualSize, label);
  assert.equal(facts.dataFileRaw, c.dataFileRaw, label);
  assert.equal(facts.dataFile, `${name}.data`, label);
  const bytes = readFileSync(raw);
  const expected = nonZeroClusters(bytes, c.clusterSize, virtualSize);
  assert.equal(summary.dataClusters, expected.filter(Boolean).length, label);
  assert.equal(summary.dataClusters + summary.zeroClusters, expected.length, label);
  if (!c.dataFileRaw) assert.deepEqual(mappedData(`${name}.qcow2`, dir, c.clusterSize, virtualSize), expected, `map shows zero clusters unallocated: ${label}`);
  assertRefcountsExact(decodeImage(readFileSync(join(dir, `${name}.qcow2`))));
}

const CLUSTER_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152];

test('every cluster size and refcount width: qemu-img check clean and compare identical', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [i, clusterSize] of CLUSTER_SIZES.entries()) {
    // Sizes that are multiples of neither 512 nor the cluster, data in guest cluster 0 and in
    // the short last cluster (mixedExtents puts random bytes at both ends).
    const size = Math.min(3 * clusterSize, 4 * MiB) + 1000 + i * 37;
    await convertAndVerify(dir, { clusterSize, refcountBits: 2 ** (i % 7), dataFileRaw: i % 2 === 0, size }, `cs${clusterSize}`);
  }
});

test('a handful of crosses: raw and sparse, widths at both ends, larger images, declared sizes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cases: Case[] = [
    { clusterSize: 512, refcountBits: 64, dataFileRaw: false, size: 300 * KiB + 1 },
    { clusterSize: 512, refcountBits: 1, dataFileRaw: true, size: 40 * KiB + 511 },
    { clusterSize: 65536, refcountBits: 1, dataFileRaw: false, size: 9 * MiB + 5, declareSize: true },
    { clusterSize: 65536, refcountBits: 64, dataFileRaw: true, size: 9 * MiB + 5, declareSize: true },
    { clusterSize: 2097152, refcountBits: 2, dataFileRaw: false, size: 5 * MiB - 3 },
    { clusterSize: 4096, refcountBits: 16, dataFileRaw: false, size: 4096 * 512 * 2 + 4096 * 3 + 100 }, // 3 L2 tables
    { clusterSize: 65536, refcountBits: 16, dataFileRaw: true, size: 512 },
    { clusterSize: 65536, refcountBits: 16, dataFileRaw: false, size: 1 },
    { clusterSize: 65536, refcountBits: 16, dataFileRaw: true, size: 0 },
  ];
  for (const [i, c] of cases.entries()) await convertAndVerify(dir, c, `x${i}`);
});

test('input chunk patterns (1 byte, 7 bytes, cluster−1, random) give the same image', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const clusterSize = 4096;
  const size = 20 * clusterSize + 777;
  const patterns = [[1], [7], [clusterSize - 1], [1, 5000, 3, 70_000, 123, 4096]];
  let reference: Buffer | undefined;
  for (const [i, chunks] of patterns.entries()) {
    for (const dataFileRaw of [true, false]) {
      const name = `p${i}${dataFileRaw ? 'r' : 's'}`;
      await convertAndVerify(dir, { clusterSize, refcountBits: 16, dataFileRaw, size, chunks, declareSize: i % 2 === 0 }, name, mixedExtents(size, clusterSize, 5));
      if (dataFileRaw) {
        // The metadata differs only in the stored name; the data files are byte-identical.
        const data = readFileSync(join(dir, `${name}.data`));
        reference ??= data;
        assert.ok(data.equals(reference));
      }
    }
  }
});

test('the data file is sparse: zero clusters become holes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 64 * MiB;
  await convertAndVerify(dir, { clusterSize: 65536, refcountBits: 16, dataFileRaw: true, size }, 'mostly-zero', [
    { offset: 0, length: 100_000, kind: 'random' },
    { offset: 10 * MiB, length: 8 * MiB, kind: 'zeros' }, // written zeros become holes too
    { offset: size - 5000, length: 5000, kind: 'random' },
  ]);
  const allocated = allocatedBytes(join(dir, 'mostly-zero.data'));
  assert.ok(allocated < 2 * MiB, `data file allocates ${allocated} bytes of ${size}`);
});

test('property: random small images convert to images qemu agrees with', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.record({
        clusterSize: fc.constantFrom(512, 4096, 65536),
        refcountBits: fc.constantFrom(1, 2, 4, 8, 16, 32, 64),
        dataFileRaw: fc.boolean(),
        size: fc.integer({ min: 0, max: 400 * KiB }),
        extents: fc.array(
          fc.record({ offset: fc.integer({ min: 0, max: 400 * KiB }), length: fc.integer({ min: 1, max: 80 * KiB }), kind: fc.constantFrom('random', 'zeros', 'pattern') }),
          { maxLength: 6 },
        ),
        chunks: fc.option(fc.array(fc.integer({ min: 1, max: 100_000 }), { minLength: 1, maxLength: 5 }), { nil: undefined }),
      }),
      async ({ extents, ...c }) => {
        await convertAndVerify(dir, { ...c, ...(c.chunks ? { chunks: c.chunks } : {}) } as Case, `prop${run++}`, extents as Extent[]);
      },
    ),
    { numRuns: 15 },
  );
});

test('the default data file is the output with .data, and its stored name is relative to the image', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'disk.raw');
  writeFileSync(raw, Buffer.alloc(70_000, 7));
  const summary = await convert({ input: raw, output: join(dir, 'disk.qcow2') });
  assert.equal(summary.dataFile, join(dir, 'disk.data'));
  assert.equal(summary.dataFileName, 'disk.data');
  // qemu 7.2 resolves it from its working directory: the image's, here.
  assertQemuAgrees(raw, join(dir, 'disk.qcow2'), dir);
  assert.equal(qemuFacts(join(dir, 'disk.qcow2'), dir).dataFile, 'disk.data');
});
