/**
 * Property tests (fast-check) for the codec: equivalence with simple reference models written
 * from the qemu rules in the digest, round trips, and robustness against hostile bytes.
 */

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  checkVirtualSize,
  COMPAT_LAZY_REFCOUNTS,
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  encodeCompressedDescriptor,
  encodeHeaderCluster,
  encodeL1Entry,
  encodeL2Entry,
  encodeName,
  encodeRefcountTableEntry,
  fillRefcountOnes,
  getRefcount,
  imageGeometry,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  maxRefcount,
  maxVirtualSize,
  parseHeader,
  refcountsPerBlock,
  setRefcount,
  solveRefcountLayout,
  type ClusterType,
  type HeaderSpec,
} from '../../src/format/index.js';
import { InvalidArgumentError, LimitExceededError, Qcow2StreamError } from '../../src/errors.js';
import { assertQcowError, atOffset } from './helpers.js';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const OFFSET_MASK = 0x00fffffffffffe00n;

const order = fc.integer({ min: 0, max: 6 });
const clusterBits = fc.integer({ min: 9, max: 21 });
/** Cluster-aligned offsets below 2^53, biased towards the edges. */
const alignedOffset = fc.oneof(
  fc.constantFrom(0, 512, 0x10000, 2 ** 32, 2 ** 53 - 512),
  fc.integer({ min: 0, max: 2 ** 44 - 1 }).map((n) => n * 512),
);

describe('refcount properties', () => {
  test('fillRefcountOnes(from, to) equals a setRefcount loop, for every order and range', () => {
    fc.assert(
      fc.property(
        order,
        fc.integer({ min: 9, max: 12 }),
        fc.nat(),
        fc.nat(),
        (ord, cb, a, b) => {
          const perBlock = refcountsPerBlock(cb, ord);
          const from = Math.min(a, b) % (perBlock + 1);
          const to = from + (Math.max(a, b) % (perBlock - from + 1));
          const expected = new Uint8Array(2 ** cb);
          for (let i = from; i < to; i++) setRefcount(expected, i, ord, 1);
          const actual = new Uint8Array(2 ** cb);
          fillRefcountOnes(actual, from, to, ord);
          assert.deepEqual(actual, expected);
        },
      ),
      { numRuns: 400 },
    );
  });

  test('setRefcount/getRefcount behave like an array of integers', () => {
    fc.assert(
      fc.property(
        order,
        fc.array(fc.tuple(fc.nat({ max: 63 }), fc.double({ min: 0, max: 1, noNaN: true })), { minLength: 1, maxLength: 40 }),
        fc.integer({ min: 0, max: 17 }),
        (ord, writes, byteOffset) => {
          const entries = 64;
          const bytes = (entries * 2 ** ord) / 8;
          const max = Math.min(maxRefcount(ord), Number.MAX_SAFE_INTEGER);
          const block = atOffset(new Uint8Array(bytes), byteOffset);
          const model = new Array<number>(entries).fill(0);
          for (const [index, fraction] of writes) {
            const value = Math.floor(fraction * max);
            setRefcount(block, index, ord, value);
            model[index] = value;
          }
          for (let i = 0; i < entries; i++) assert.equal(getRefcount(block, i, ord), model[i], `entry ${i}`);
        },
      ),
      { numRuns: 300 },
    );
  });
});

/**
 * The digest's closed form (§4.3): for a table of RT clusters the fewest blocks are
 * RB = ceil((M + RT) / (rpb − 1)); the answer is the least RT whose blocks fit in it.
 */
function referenceLayout(other: number, perBlock: number, perTableCluster: number): { table: number; blocks: number } {
  if (other === 0) return { table: 0, blocks: 0 };
  for (let table = 1; ; table++) {
    const blocks = Math.ceil((other + table) / (perBlock - 1));
    if (Math.ceil(blocks / perTableCluster) <= table) return { table, blocks };
  }
}

describe('layout properties', () => {
  test('solveRefcountLayout: blocks cover the total, the table covers the blocks, and one block fewer would not', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 100_000_000 }), clusterBits, order, (other, cb, ord) => {
        const perBlock = refcountsPerBlock(cb, ord);
        const perTableCluster = 2 ** cb / 8;
        const reference = referenceLayout(other, perBlock, perTableCluster);
        if (reference.table * 2 ** cb > 8 * 1024 * 1024) {
          const err = assertQcowError(() => solveRefcountLayout(other, cb, ord), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'refcount table' });
          assert.ok(err instanceof LimitExceededError);
          assert.equal(err.actual, reference.table * 2 ** cb);
          return;
        }
        const layout = solveRefcountLayout(other, cb, ord);
        const { tableClusters: t, blockClusters: b, totalClusters: total } = layout;
        assert.deepEqual([t, b], [reference.table, reference.blocks], 'the least fixed point');
        assert.equal(total, other + t + b);
        assert.ok(b * perBlock >= total, 'the blocks cover every cluster, themselves included');
        assert.equal(t, Math.ceil(b / perTableCluster), 'the table is exactly as long as the blocks need');
        if (b > 0) {
          const fewer = b - 1;
          const fewerTotal = other + Math.ceil(fewer / perTableCluster) + fewer;
          assert.ok(fewer * perBlock < fewerTotal, 'one block fewer would not cover');
        } else {
          assert.equal(other, 0);
        }
      }),
      { numRuns: 1000 },
    );
  });

  test('solveRefcountLayout hits the 8 MiB table limit exactly where the reference does (512 B, 64-bit)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 60_000_000, max: 70_000_000 }), (other) => {
        const reference = referenceLayout(other, 64, 64);
        if (reference.table * 512 > 8 * 1024 * 1024) {
          assert.throws(() => solveRefcountLayout(other, 9, 6), LimitExceededError);
        } else {
          assert.deepEqual(solveRefcountLayout(other, 9, 6), { tableClusters: reference.table, blockClusters: reference.blocks, totalClusters: other + reference.table + reference.blocks });
        }
      }),
      { numRuns: 200 },
    );
  });

  test('imageGeometry: l1_size is the least number of L2 tables covering the size', () => {
    fc.assert(
      fc.property(clusterBits, fc.boolean(), fc.double({ min: 0, max: 1, noNaN: true }), (cb, ext, fraction) => {
        fc.pre(!ext || cb >= 14);
        const size = Math.floor((fraction * maxVirtualSize(cb, ext)) / 512) * 512;
        const g = imageGeometry(size, cb, ext);
        assert.ok(g.l1Size * g.bytesPerL2 >= size);
        assert.ok(size === 0 ? g.l1Size === 0 : (g.l1Size - 1) * g.bytesPerL2 < size);
        assert.ok(g.clusters * g.clusterSize >= size && (g.clusters - 1) * g.clusterSize < Math.max(size, 1));
        assert.ok(g.l1Size <= 4194304, 'within qemu\'s 32 MiB L1 limit');
      }),
      { numRuns: 500 },
    );
  });

  test('checkVirtualSize: accepts exactly the sizes up to maxVirtualSize; a refusal names the smallest cluster size that fits', () => {
    fc.assert(
      fc.property(clusterBits, fc.boolean(), fc.integer({ min: 0, max: 53 }), fc.double({ min: 0, max: 1, noNaN: true }), (cb, ext, exp, fraction) => {
        fc.pre(!ext || cb >= 14);
        const size = Math.min(Number.MAX_SAFE_INTEGER, Math.floor(2 ** exp * (1 + fraction)));
        if (size <= maxVirtualSize(cb, ext)) {
          checkVirtualSize(size, cb, ext);
          return;
        }
        const err = assertQcowError(() => checkVirtualSize(size, cb, ext), { code: 'QCOW_ERR_INVALID_ARGUMENT' });
        const named = /--cluster-size (\d+)/.exec(err.hint ?? '');
        if (!named) {
          assert.ok(size > maxVirtualSize(21, ext), `no hint although 2 MiB clusters fit ${size}`);
          return;
        }
        const fit = Math.log2(Number(named[1]));
        assert.ok(fit > cb && fit <= 21);
        assert.ok(size <= maxVirtualSize(fit, ext));
        for (let smaller = cb; smaller < fit; smaller++) assert.ok(size > maxVirtualSize(smaller, ext));
      }),
      { numRuns: 500 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Tables against a reference model of qcow2_get_cluster_type / the compressed descriptor

interface ModelEntry {
  type: ClusterType;
  hostOffset: number;
  copied: boolean;
  compressedSize: number;
}

function modelL2(entry: bigint, cb: number, dataFile: boolean, extendedL2: boolean): ModelEntry | 'limit' {
  const copied = (entry >> 63n) === 1n;
  if ((entry >> 62n) & 1n) {
    const x = BigInt(62 - (cb - 8));
    const off = entry & ((1n << x) - 1n);
    if (off > MAX_SAFE) return 'limit';
    const nsec = (entry >> x) & ((1n << BigInt(cb - 8)) - 1n);
    const hostOffset = Number(off);
    return { type: 'compressed', hostOffset, copied, compressedSize: (Number(nsec) + 1) * 512 - (hostOffset % 512) };
  }
  const off = entry & OFFSET_MASK;
  if (off > MAX_SAFE) return 'limit';
  const hostOffset = Number(off);
  let type: ClusterType;
  if ((entry & 1n) && !extendedL2) type = off !== 0n ? 'zero-alloc' : 'zero-plain';
  else if (off === 0n) type = dataFile && copied ? 'normal' : 'unallocated';
  else type = 'normal';
  return { type, hostOffset, copied, compressedSize: 0 };
}

/** 64-bit entries built from interesting parts: flags, reserved bits, small and huge offsets. */
const l2Value = fc
  .tuple(
    fc.boolean(), // COPIED
    fc.integer({ min: 0, max: 9 }), // compressed with probability 1/10
    fc.boolean(), // zero flag
    fc.oneof(fc.constant(0n), fc.bigInt(0n, (1n << 56n) - 1n), fc.bigInt(0n, (1n << 40n) - 1n).map((n) => n << 9n)),
    fc.oneof(fc.constant(0n), fc.constantFrom(...[1, 2, 3, 4, 5, 6, 7, 8, 56, 57, 58, 59, 60, 61].map((b) => 1n << BigInt(b)))),
  )
  .map(([copied, c, zero, offset, reserved]) =>
    (copied ? 1n << 63n : 0n) | (c === 0 ? 1n << 62n : 0n) | (zero ? 1n : 0n) | offset | reserved,
  );

describe('table properties', () => {
  test('decodeL2Entry agrees with a reference model of qemu\'s classification', () => {
    fc.assert(
      fc.property(l2Value, fc.bigInt(0n, (1n << 64n) - 1n), clusterBits, fc.boolean(), fc.boolean(), fc.nat({ max: 40 }),
        (value, bitmap, cb, dataFile, extendedL2, pos) => {
          const view = new DataView(new ArrayBuffer(80), 7);
          view.setBigUint64(pos, value);
          view.setBigUint64(pos + 8, bitmap);
          const ctx = { clusterBits: cb, dataFile, extendedL2 };
          const expected = modelL2(value, cb, dataFile, extendedL2);
          if (expected === 'limit') {
            assertQcowError(() => decodeL2Entry(view, pos, ctx), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'L2 entry', offset: pos });
            return;
          }
          const entry = decodeL2Entry(view, pos, ctx);
          assert.equal(entry.type, expected.type);
          assert.equal(entry.hostOffset, expected.hostOffset);
          assert.equal(entry.copied, expected.copied);
          assert.equal(entry.compressedSize, expected.compressedSize);
          assert.equal(entry.allocMask, extendedL2 ? Number(bitmap & 0xffffffffn) : 0);
          assert.equal(entry.zeroMask, extendedL2 ? Number(bitmap >> 32n) : 0);
          if (expected.type !== 'compressed') {
            const reserved = (value & 0x3f000000000001fen) !== 0n || (extendedL2 && (value & 1n) !== 0n);
            assert.equal(entry.reservedBits, reserved);
          }
        }),
      { numRuns: 2000 },
    );
  });

  test('decodeL1Entry agrees with the L1 masks (offset 0x00fffffffffffe00, reserved 0x7f000000000001ff)', () => {
    fc.assert(
      fc.property(l2Value, fc.nat({ max: 40 }), (value, pos) => {
        const view = new DataView(new ArrayBuffer(64), 3);
        view.setBigUint64(pos, value);
        const off = value & OFFSET_MASK;
        if (off > MAX_SAFE) {
          assertQcowError(() => decodeL1Entry(view, pos), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'L1 entry' });
          return;
        }
        assert.deepEqual(decodeL1Entry(view, pos), {
          l2Offset: Number(off),
          copied: value >> 63n === 1n,
          reservedBits: (value & 0x7f000000000001ffn) !== 0n,
        });
      }),
      { numRuns: 1000 },
    );
  });

  test('L1, L2 and refcount-table entries round-trip at any position of any view', () => {
    fc.assert(
      fc.property(alignedOffset, fc.boolean(), fc.boolean(), fc.nat({ max: 48 }), fc.nat({ max: 15 }), (offset, copied, zero, pos, byteOffset) => {
        const view = new DataView(new ArrayBuffer(96), byteOffset, 64);
        encodeL1Entry(view, pos, offset, copied);
        assert.deepEqual(decodeL1Entry(view, pos), { l2Offset: offset, copied, reservedBits: false });
        encodeL2Entry(view, pos, offset, { copied, zero });
        const l2 = decodeL2Entry(view, pos, { clusterBits: 9, dataFile: true, extendedL2: false });
        assert.equal(l2.hostOffset, offset);
        assert.equal(l2.copied, copied);
        assert.equal(l2.reservedBits, false);
        assert.equal(l2.type, zero ? (offset === 0 ? 'zero-plain' : 'zero-alloc') : offset === 0 && !copied ? 'unallocated' : 'normal');
        encodeRefcountTableEntry(view, pos, offset);
        assert.deepEqual(decodeRefcountTableEntry(view, pos), { blockOffset: offset, reservedBits: false });
      }),
      { numRuns: 1000 },
    );
  });

  test('compressed descriptors round-trip: offset exact, size covers the data and ends on a sector', () => {
    fc.assert(
      fc.property(clusterBits, fc.double({ min: 0, max: 1, noNaN: true }), fc.double({ min: 0, max: 1, noNaN: true }), (cb, f1, f2) => {
        const cs = 2 ** cb;
        const maxOffset = Math.min(2 ** (62 - (cb - 8)), 2 ** 53) - 1;
        const offset = Math.floor(f1 * maxOffset);
        const length = 1 + Math.floor(f2 * (cs - 1));
        const view = new DataView(new ArrayBuffer(24), 8);
        encodeCompressedDescriptor(view, 0, offset, length, cb);
        const entry = decodeL2Entry(view, 0, { clusterBits: cb, dataFile: false, extendedL2: false });
        assert.equal(entry.type, 'compressed');
        assert.equal(entry.copied, false);
        assert.equal(entry.hostOffset, offset);
        assert.ok(entry.compressedSize >= length && entry.compressedSize < length + 512);
        assert.equal((offset + entry.compressedSize) % 512, 0);
      }),
      { numRuns: 1000 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Header

const name = fc.oneof(
  fc.string({ minLength: 1, maxLength: 40 }),
  fc.string({ unit: 'grapheme', minLength: 1, maxLength: 8 }),
  fc.stringMatching(/^[a-z0-9._/-]{1,200}$/),
);

const headerSpec: fc.Arbitrary<HeaderSpec> = fc
  .record({
    clusterBits,
    fraction: fc.double({ min: 0, max: 1, noNaN: true }),
    refcountOrder: order,
    l1TableOffsetClusters: fc.nat({ max: 1 << 20 }),
    refcountTableClusters: fc.integer({ min: 1, max: 1 << 14 }),
    dataFileName: fc.option(name, { nil: undefined }),
    raw: fc.boolean(),
    extendedL2: fc.boolean(),
    lazy: fc.boolean(),
    backingFileName: fc.option(name, { nil: undefined }),
    backingFormat: fc.option(fc.stringMatching(/^[a-z0-9]{1,15}$/), { nil: undefined }),
    featureTable: fc.option(fc.boolean(), { nil: undefined }),
  })
  .map((r) => {
    const cs = 2 ** r.clusterBits;
    const ext = r.extendedL2 && r.clusterBits >= 14;
    const size = Math.floor((r.fraction * maxVirtualSize(r.clusterBits, ext)) / 512) * 512;
    const dataFile = r.dataFileName !== undefined;
    const spec: HeaderSpec = {
      clusterBits: r.clusterBits,
      size,
      l1Size: imageGeometry(size, r.clusterBits, ext).l1Size,
      l1TableOffset: (r.l1TableOffsetClusters + 2) * cs,
      refcountTableOffset: cs,
      refcountTableClusters: r.refcountTableClusters,
      refcountOrder: r.refcountOrder,
      incompatibleFeatures: (dataFile ? INCOMPAT_DATA_FILE : 0n) | (ext ? INCOMPAT_EXTL2 : 0n),
      compatibleFeatures: r.lazy ? COMPAT_LAZY_REFCOUNTS : 0n,
      autoclearFeatures: dataFile && r.raw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    };
    if (r.dataFileName !== undefined) spec.dataFileName = r.dataFileName;
    if (r.backingFileName !== undefined) spec.backingFileName = r.backingFileName;
    if (r.backingFormat !== undefined) spec.backingFormat = r.backingFormat;
    if (r.featureTable !== undefined) spec.featureTable = r.featureTable;
    return spec;
  });

function framed(bytes: number): number {
  return 8 + Math.ceil(bytes / 8) * 8;
}

describe('header properties', () => {
  test('encodeHeaderCluster → parseHeader round-trips every spec that fits, at any byteOffset; the rest is refused', () => {
    fc.assert(
      fc.property(headerSpec, fc.nat({ max: 64 }), (spec, byteOffset) => {
        const cs = 2 ** spec.clusterBits;
        const withTable = spec.featureTable ?? cs > 4096;
        const needed = 112
          + (spec.backingFormat !== undefined ? framed(encodeName(spec.backingFormat).length) : 0)
          + (spec.dataFileName !== undefined ? framed(encodeName(spec.dataFileName).length) : 0)
          + (withTable ? framed(384) : 0)
          + 8
          + (spec.backingFileName !== undefined ? encodeName(spec.backingFileName).length : 0);
        if (needed > cs) {
          assert.throws(() => encodeHeaderCluster(spec), InvalidArgumentError);
          return;
        }
        const cluster0 = encodeHeaderCluster(spec);
        const h = parseHeader(byteOffset === 0 ? cluster0 : atOffset(cluster0, byteOffset));
        assert.equal(h.clusterBits, spec.clusterBits);
        assert.equal(h.size, spec.size);
        assert.equal(h.l1Size, spec.l1Size);
        assert.equal(h.l1TableOffset, spec.l1TableOffset);
        assert.equal(h.refcountTableOffset, spec.refcountTableOffset);
        assert.equal(h.refcountTableClusters, spec.refcountTableClusters);
        assert.equal(h.refcountOrder, spec.refcountOrder);
        assert.equal(h.incompatibleFeatures, spec.incompatibleFeatures);
        assert.equal(h.compatibleFeatures, spec.compatibleFeatures ?? 0n);
        assert.equal(h.autoclearFeatures, spec.autoclearFeatures);
        assert.equal(h.dataFileName, spec.dataFileName);
        assert.equal(h.backingFileName, spec.backingFileName);
        assert.equal(h.backingFormat, spec.backingFormat);
        assert.equal(h.featureNames.length, withTable ? 8 : 0);
        assert.ok(cluster0.subarray(needed).every((b) => b === 0), 'nothing written past the names');
      }),
      { numRuns: 300 },
    );
  });

  test('parseHeader on a corrupted header throws only typed errors (never RangeError or TypeError)', () => {
    const base = encodeHeaderCluster({
      clusterBits: 12, size: 1 << 30, l1Size: 2, l1TableOffset: 0x3000, refcountTableOffset: 0x1000, refcountTableClusters: 1,
      refcountOrder: 4, incompatibleFeatures: INCOMPAT_DATA_FILE, autoclearFeatures: 0n, dataFileName: 'disk.data',
      backingFileName: 'base.qcow2', backingFormat: 'qcow2', featureTable: true,
    });
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat({ max: 700 }), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }),
        fc.integer({ min: 0, max: 4096 }),
        (mutations, length) => {
          const bytes = base.slice(0, length);
          for (const [at, value] of mutations) if (at < bytes.length) bytes[at] = value;
          try {
            parseHeader(bytes);
          } catch (err) {
            assert.ok(err instanceof Qcow2StreamError, `unexpected ${String(err)}`);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });

  test('parseHeader on random bytes after a valid magic and version throws only typed errors', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 1024 }), fc.constantFrom(2, 3), (tail, version) => {
        const bytes = new Uint8Array(8 + tail.length);
        new DataView(bytes.buffer).setUint32(0, 0x514649fb);
        new DataView(bytes.buffer).setUint32(4, version);
        bytes.set(tail, 8);
        try {
          parseHeader(bytes);
        } catch (err) {
          assert.ok(err instanceof Qcow2StreamError, `unexpected ${String(err)}`);
        }
      }),
      { numRuns: 1000 },
    );
  });
});
