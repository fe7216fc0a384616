import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  ALL_SUBCLUSTERS,
  decodeCompressedDescriptor,
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  encodeCompressedDescriptor,
  encodeL1Entry,
  encodeL2Entry,
  encodeRefcountTableEntry,
  encodeSubclusterBitmap,
  L1_ENTRY_SIZE,
  l2EntrySize,
  subclusterType,
  SUBCLUSTERS,
  type ClusterType,
  type L2Context,
  type L2Entry,
  type SubclusterType,
} from '../../src/format/index.js';
import { LimitExceededError } from '../../src/errors.js';
import { assertQcowError } from './helpers.js';

/** A DataView over a slice of a larger buffer that starts at byte 5 (so views never align by chance). */
function paddedView(bytes: number): DataView {
  const buf = new ArrayBuffer(bytes + 64);
  new Uint8Array(buf).fill(0xa5);
  return new DataView(buf, 5, bytes + 32);
}

/** One 8-byte entry at position `pos` of a padded view (pos 16 by default: a non-zero index). */
function l2At(value: bigint, pos = 16, bitmap?: bigint): { view: DataView; pos: number } {
  const view = paddedView(64);
  view.setBigUint64(pos, value);
  if (bitmap !== undefined) view.setBigUint64(pos + 8, bitmap);
  return { view, pos };
}

function decodeStd(value: bigint, ctx: Partial<L2Context> = {}): L2Entry {
  const { view, pos } = l2At(value);
  return decodeL2Entry(view, pos, { clusterBits: 16, dataFile: false, extendedL2: false, ...ctx });
}

function decodeExt(value: bigint, bitmap: bigint, ctx: Partial<L2Context> = {}): L2Entry {
  const { view, pos } = l2At(value, 16, bitmap);
  return decodeL2Entry(view, pos, { clusterBits: 16, dataFile: false, extendedL2: true, ...ctx });
}

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

// ---------------------------------------------------------------------------------------------

describe('L1 entries', () => {
  test('entry size is 8 bytes', () => {
    assert.equal(L1_ENTRY_SIZE, 8);
  });

  const offsets = [0, 512, 0x10000, 0x1_0000_0000, 0x1234_5678_9a00, 2 ** 53 - 512];
  for (const offset of offsets) {
    test(`encode → decode round trip at L2 offset 0x${offset.toString(16)} in the middle of a larger buffer`, () => {
      const view = paddedView(64);
      for (const copied of [true, false]) {
        encodeL1Entry(view, 24, offset, copied);
        const raw = view.getBigUint64(24);
        assert.equal(raw, BigInt(offset) | (copied ? COPIED : 0n), 'exact bits');
        assert.deepEqual(decodeL1Entry(view, 24), { l2Offset: offset, copied, reservedBits: false });
        // the neighbours are untouched
        assert.equal(view.getUint32(20), 0xa5a5a5a5);
        assert.equal(view.getUint32(32), 0xa5a5a5a5);
      }
    });
  }

  test('COPIED defaults to true for a table and false for offset 0', () => {
    const view = paddedView(16);
    encodeL1Entry(view, 8, 0x30000);
    assert.equal(view.getBigUint64(8), 0x8000000000030000n);
    encodeL1Entry(view, 8, 0);
    assert.equal(view.getBigUint64(8), 0n);
  });

  const reservedBits = [...Array.from({ length: 9 }, (_, i) => i), ...Array.from({ length: 7 }, (_, i) => 56 + i)];
  for (const bit of reservedBits) {
    test(`reserved bit ${bit} (of 0–8, 56–62) is detected and does not leak into the offset`, () => {
      const { view, pos } = l2At(COPIED | 0x40000n | (1n << BigInt(bit)));
      const entry = decodeL1Entry(view, pos);
      assert.equal(entry.reservedBits, true);
      assert.equal(entry.copied, true);
      assert.equal(entry.l2Offset, 0x40000);
    });
  }

  test('no offset bit (9–52) nor COPIED counts as reserved', () => {
    for (let bit = 9; bit <= 52; bit++) {
      const { view, pos } = l2At(COPIED | (1n << BigInt(bit)));
      const entry = decodeL1Entry(view, pos);
      assert.equal(entry.reservedBits, false, `bit ${bit}`);
      assert.equal(entry.l2Offset, 2 ** bit, `bit ${bit}`);
    }
  });

  for (const bit of [53, 54, 55]) {
    test(`an L2 offset with bit ${bit} set (≥ 2^53) is refused with LimitExceededError`, () => {
      const { view, pos } = l2At(COPIED | (1n << BigInt(bit)));
      const err = assertQcowError(() => decodeL1Entry(view, pos), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'L1 entry', offset: pos });
      assert.ok(err instanceof LimitExceededError);
    });
  }
});

describe('standard L2 entries: qemu\'s qcow2_get_cluster_type', () => {
  interface Case {
    name: string;
    value: bigint;
    dataFile: boolean;
    type: ClusterType;
    hostOffset: number;
    copied: boolean;
    reservedBits?: boolean;
  }
  const cases: Case[] = [
    { name: '0 → unallocated', value: 0n, dataFile: false, type: 'unallocated', hostOffset: 0, copied: false },
    { name: '0 with a data file → still unallocated', value: 0n, dataFile: true, type: 'unallocated', hostOffset: 0, copied: false },
    { name: 'COPIED at offset 0 without a data file → unallocated', value: COPIED, dataFile: false, type: 'unallocated', hostOffset: 0, copied: true },
    { name: 'COPIED at offset 0 with a data file → normal at host 0 (pitfall P2)', value: COPIED, dataFile: true, type: 'normal', hostOffset: 0, copied: true },
    { name: 'COPIED | zero flag with a data file → zero-plain (zero flag checked first)', value: COPIED | 1n, dataFile: true, type: 'zero-plain', hostOffset: 0, copied: true },
    { name: 'COPIED | zero flag without a data file → zero-plain', value: COPIED | 1n, dataFile: false, type: 'zero-plain', hostOffset: 0, copied: true },
    { name: 'zero flag alone → zero-plain', value: 1n, dataFile: false, type: 'zero-plain', hostOffset: 0, copied: false },
    { name: 'zero flag + offset → zero-alloc', value: 0x10000n | 1n, dataFile: false, type: 'zero-alloc', hostOffset: 0x10000, copied: false },
    { name: 'COPIED | offset | zero flag, data file → zero-alloc', value: COPIED | 0x10000n | 1n, dataFile: true, type: 'zero-alloc', hostOffset: 0x10000, copied: true },
    { name: 'offset without COPIED → normal', value: 0x20000n, dataFile: false, type: 'normal', hostOffset: 0x20000, copied: false },
    { name: 'offset without COPIED, data file → normal', value: 0x20000n, dataFile: true, type: 'normal', hostOffset: 0x20000, copied: false },
    { name: 'COPIED | offset → normal', value: COPIED | 0x20000n, dataFile: true, type: 'normal', hostOffset: 0x20000, copied: true },
    { name: 'offset above 4 GiB', value: COPIED | 0x1_2345_0000n, dataFile: true, type: 'normal', hostOffset: 0x1_2345_0000, copied: true },
    { name: 'largest safe offset', value: COPIED | BigInt(2 ** 53 - 512), dataFile: true, type: 'normal', hostOffset: 2 ** 53 - 512, copied: true },
    { name: 'reserved bit 1 with offset 0 → unallocated, flagged', value: 0x2n, dataFile: false, type: 'unallocated', hostOffset: 0, copied: false, reservedBits: true },
    { name: 'compressed bit wins over the zero flag', value: COMPRESSED | 0x60000n | 1n, dataFile: false, type: 'compressed', hostOffset: 0x60001, copied: false },
    { name: 'compressed bit wins over COPIED', value: COPIED | COMPRESSED | 0x60000n, dataFile: true, type: 'compressed', hostOffset: 0x60000, copied: true },
  ];
  for (const c of cases) {
    test(c.name, () => {
      const entry = decodeStd(c.value, { dataFile: c.dataFile });
      assert.equal(entry.type, c.type);
      assert.equal(entry.hostOffset, c.hostOffset);
      assert.equal(entry.copied, c.copied);
      assert.equal(entry.reservedBits, c.reservedBits ?? false);
      assert.equal(entry.allocMask, 0);
      assert.equal(entry.zeroMask, 0);
    });
  }

  const reserved = [...Array.from({ length: 8 }, (_, i) => 1 + i), ...Array.from({ length: 6 }, (_, i) => 56 + i)];
  for (const bit of reserved) {
    test(`reserved bit ${bit} (of 1–8, 56–61) is detected without changing type or offset`, () => {
      const entry = decodeStd(COPIED | 0x30000n | (1n << BigInt(bit)), { dataFile: true });
      assert.equal(entry.reservedBits, true);
      assert.equal(entry.type, 'normal');
      assert.equal(entry.hostOffset, 0x30000);
    });
  }

  test('offset bits 9–52, bit 0, COPIED are not reserved', () => {
    for (let bit = 9; bit <= 52; bit++) {
      const entry = decodeStd(1n << BigInt(bit));
      assert.equal(entry.reservedBits, false, `bit ${bit}`);
      assert.equal(entry.hostOffset, 2 ** bit, `bit ${bit}`);
      assert.equal(entry.type, 'normal');
    }
    assert.equal(decodeStd(COPIED | 1n).reservedBits, false);
  });

  for (const bit of [53, 54, 55]) {
    test(`a host offset with bit ${bit} set is refused with LimitExceededError`, () => {
      const { view, pos } = l2At(COPIED | (1n << BigInt(bit)));
      assertQcowError(
        () => decodeL2Entry(view, pos, { clusterBits: 16, dataFile: true, extendedL2: false }),
        { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'L2 entry', offset: pos },
      );
    });
  }

  test('encodeL2Entry writes exactly offset | flags, at a non-zero position, and decodes back', () => {
    const flagsCases = [{}, { copied: true }, { zero: true }, { copied: true, zero: true }] as const;
    for (const offset of [0, 0x10000, 0x2_0000_0000, 2 ** 53 - 512]) {
      for (const flags of flagsCases) {
        const view = paddedView(64);
        encodeL2Entry(view, 40, offset, flags);
        const copied = 'copied' in flags && flags.copied === true;
        const zero = 'zero' in flags && flags.zero === true;
        assert.equal(view.getBigUint64(40), BigInt(offset) | (copied ? COPIED : 0n) | (zero ? 1n : 0n));
        assert.equal(view.getUint32(36), 0xa5a5a5a5, 'byte before untouched');
        assert.equal(view.getUint32(48), 0xa5a5a5a5, 'byte after untouched');
        const entry = decodeL2Entry(view, 40, { clusterBits: 16, dataFile: true, extendedL2: false });
        assert.equal(entry.hostOffset, offset);
        assert.equal(entry.copied, copied);
        assert.equal(entry.reservedBits, false);
      }
    }
  });

  test('l2EntrySize is 8 for standard and 16 for extended entries', () => {
    assert.equal(l2EntrySize(false), 8);
    assert.equal(l2EntrySize(true), 16);
  });
});

describe('extended L2 entries', () => {
  test('the zero flag (bit 0) is unused: it does not make a cluster zero, and is flagged as reserved', () => {
    const entry = decodeExt(COPIED | 0x10000n | 1n, 0xffffffffn, { dataFile: true });
    assert.equal(entry.type, 'normal');
    assert.equal(entry.reservedBits, true);
    const unalloc = decodeExt(1n, 0n);
    assert.equal(unalloc.type, 'unallocated');
    assert.equal(unalloc.reservedBits, true);
  });

  test('the bitmap is read from the second 8 bytes: high word = zero bits, low word = alloc bits', () => {
    const entry = decodeExt(COPIED | 0x10000n, 0x12345678_9abcdef0n, { dataFile: true });
    assert.equal(entry.zeroMask, 0x12345678);
    assert.equal(entry.allocMask, 0x9abcdef0);
  });

  test('encodeSubclusterBitmap writes zero mask then alloc mask, after the 8-byte entry', () => {
    const view = paddedView(64);
    encodeL2Entry(view, 16, 0x10000, { copied: true });
    encodeSubclusterBitmap(view, 16, ALL_SUBCLUSTERS, 0);
    assert.equal(view.getBigUint64(24), 0x00000000ffffffffn);
    encodeSubclusterBitmap(view, 16, 0x3, 0xfffffffc);
    assert.equal(view.getBigUint64(24), 0xfffffffc_00000003n);
    assert.equal(view.getUint32(32), 0xa5a5a5a5, 'the next entry is untouched');
    const entry = decodeL2Entry(view, 16, { clusterBits: 16, dataFile: true, extendedL2: true });
    assert.equal(entry.allocMask, 0x3);
    assert.equal(entry.zeroMask, 0xfffffffc);
  });

  test('SUBCLUSTERS is 32 and ALL_SUBCLUSTERS is 32 ones', () => {
    assert.equal(SUBCLUSTERS, 32);
    assert.equal(ALL_SUBCLUSTERS, 0xffffffff);
  });

  describe('subclusterType: every alloc/zero combination for the subcluster itself', () => {
    // (alloc, zero) → type, with a normal host entry and with an unallocated entry
    const normal: [number, number, SubclusterType][] = [
      [0, 0, 'unallocated'],
      [0, 1, 'zero'],
      [1, 0, 'data'],
      [1, 1, 'invalid'],
    ];
    const unallocated: [number, number, SubclusterType][] = [
      [0, 0, 'unallocated'],
      [0, 1, 'zero'],
      [1, 0, 'invalid'],
      [1, 1, 'invalid'],
    ];
    for (const index of [0, 1, 17, 31]) {
      for (const [alloc, zero, expected] of normal) {
        test(`normal entry, subcluster ${index}: alloc ${alloc}, zero ${zero} → ${expected}`, () => {
          const bit = BigInt(2 ** index);
          const entry = decodeExt(COPIED | 0x10000n, (zero ? bit << 32n : 0n) | (alloc ? bit : 0n), { dataFile: true });
          assert.equal(entry.type, 'normal');
          assert.equal(subclusterType(entry, index), expected);
        });
      }
      for (const [alloc, zero, expected] of unallocated) {
        test(`unallocated entry, subcluster ${index}: alloc ${alloc}, zero ${zero} → ${expected}`, () => {
          const bit = BigInt(2 ** index);
          const entry = decodeExt(0n, (zero ? bit << 32n : 0n) | (alloc ? bit : 0n), { dataFile: true });
          assert.equal(entry.type, 'unallocated');
          assert.equal(subclusterType(entry, index), expected);
        });
      }
    }

    test('a data-file entry at host 0 with COPIED is normal, so its alloc bits are data', () => {
      const entry = decodeExt(COPIED, 0xffffffffn, { dataFile: true });
      assert.equal(entry.type, 'normal');
      assert.equal(subclusterType(entry, 0), 'data');
    });

    test('compressed entry with an all-zero bitmap → data for every subcluster', () => {
      const entry = decodeExt(COMPRESSED | 0x60000n, 0n);
      assert.equal(entry.type, 'compressed');
      for (let i = 0; i < 32; i++) assert.equal(subclusterType(entry, i), 'data');
    });

    for (const bitmap of [1n, 1n << 32n, 0x80000000n, 0xffffffffffffffffn]) {
      test(`compressed entry with bitmap 0x${bitmap.toString(16)} → invalid for every subcluster`, () => {
        const entry = decodeExt(COMPRESSED | 0x60000n, bitmap);
        for (let i = 0; i < 32; i++) assert.equal(subclusterType(entry, i), 'invalid', `subcluster ${i}`);
      });
    }
  });

  describe('subclusterType: qemu\'s whole-bitmap checks (qcow2_get_subcluster_type checks the whole entry)', () => {
    test('normal entry with alloc+zero set on subcluster 0 → invalid also for subcluster 1',
      () => {
        const entry = decodeExt(COPIED | 0x10000n, (1n << 32n) | 1n | 2n, { dataFile: true });
        assert.equal(subclusterType(entry, 0), 'invalid');
        assert.equal(subclusterType(entry, 1), 'invalid');
        assert.equal(subclusterType(entry, 5), 'invalid');
      });

    test('unallocated entry with any alloc bit set → invalid for every subcluster',
      () => {
        const entry = decodeExt(0n, 1n << 7n);
        assert.equal(subclusterType(entry, 7), 'invalid');
        assert.equal(subclusterType(entry, 0), 'invalid');
        assert.equal(subclusterType(entry, 31), 'invalid');
      });
  });

  describe('qemu\'s extended-L2 entries after partial writes (digest §3.4, 64 KiB clusters, data file)', () => {
    const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);
    const cases: { entry: bigint; bitmap: bigint; meaning: string; expect: (i: number) => SubclusterType }[] = [
      { entry: 0x8000000000000000n, bitmap: 0x3n, meaning: 'first 4 KiB written at guest 0', expect: (i) => (i < 2 ? 'data' : 'unallocated') },
      { entry: 0x8000000000010000n, bitmap: 0x3f0n, meaning: '12 KiB written at +8 KiB', expect: (i) => (i >= 4 && i <= 9 ? 'data' : 'unallocated') },
      { entry: 0x0n, bitmap: 0xff00000000n, meaning: 'zero-write over unallocated space', expect: (i) => (i < 8 ? 'zero' : 'unallocated') },
      { entry: 0x8000000000030000n, bitmap: 0x1fffffffen, meaning: 'zero-write of subcluster 0 over data', expect: (i) => (i === 0 ? 'zero' : 'data') },
    ];
    for (const c of cases) {
      test(`entry 0x${c.entry.toString(16)} bitmap 0x${c.bitmap.toString(16)}: ${c.meaning}`, () => {
        const entry = decodeExt(c.entry, c.bitmap, { dataFile: true });
        assert.equal(entry.hostOffset, Number(c.entry & 0x00fffffffffffe00n));
        assert.equal(entry.reservedBits, false);
        assert.deepEqual(range(0, 32).map((i) => subclusterType(entry, i)), range(0, 32).map(c.expect));
      });
    }
  });
});

describe('compressed cluster descriptors', () => {
  const qemuEntries = [
    { value: 0x4000000000060000n, offset: 0x60000, sectors: 1 },
    { value: 0x4400000000060058n, offset: 0x60058, sectors: 17 },
    { value: 0x4000000000062162n, offset: 0x62162, sectors: 1 },
  ];
  for (const { value, offset, sectors } of qemuEntries) {
    const size = sectors * 512 - (offset % 512);
    test(`qemu entry 0x${value.toString(16)} at cluster_bits 16 → offset 0x${offset.toString(16)}, ${sectors} sector(s), ${size} bytes`, () => {
      const entry = decodeStd(value);
      assert.equal(entry.type, 'compressed');
      assert.equal(entry.hostOffset, offset);
      assert.equal(entry.compressedSize, size);
      assert.equal(entry.copied, false);
      const hi = Number(value >> 32n);
      const lo = Number(value & 0xffffffffn);
      assert.deepEqual(decodeCompressedDescriptor(hi, lo, 16), { hostOffset: offset, compressedSize: size });
    });
  }

  test('0x4000000000060000 is 512 bytes; 0x4400000000060058 is 17 × 512 − 0x58 = 8616 bytes', () => {
    assert.equal(decodeStd(0x4000000000060000n).compressedSize, 512);
    assert.equal(decodeStd(0x4400000000060058n).compressedSize, 8616);
  });

  test('encodeCompressedDescriptor reproduces qemu\'s entries', () => {
    const view = paddedView(8);
    encodeCompressedDescriptor(view, 0, 0x60058, 8616, 16);
    assert.equal(view.getBigUint64(0), 0x4400000000060058n);
    encodeCompressedDescriptor(view, 0, 0x60000, 300, 16);
    assert.equal(view.getBigUint64(0), 0x4000000000060000n);
    encodeCompressedDescriptor(view, 0, 0x62162, 158, 16);
    assert.equal(view.getBigUint64(0), 0x4000000000062162n);
  });

  test('the bit split depends on cluster_bits: x = 62 − (cluster_bits − 8)', () => {
    // one additional sector at each cluster size: the count's lowest bit is bit x
    for (const cb of [9, 12, 16, 21]) {
      const x = 62 - (cb - 8);
      const entry = decodeStd(COMPRESSED | (1n << BigInt(x)) | 0x1000n, { clusterBits: cb });
      assert.equal(entry.hostOffset, 0x1000, `cluster_bits ${cb}`);
      assert.equal(entry.compressedSize, 1024, `cluster_bits ${cb}`);
      // the highest count bit (61) is a count bit, never an offset bit
      const top = decodeStd(COMPRESSED | (1n << 61n), { clusterBits: cb });
      assert.equal(top.hostOffset, 0, `cluster_bits ${cb}`);
      assert.equal(top.compressedSize, (2 ** (cb - 9) + 1) * 512, `cluster_bits ${cb}`);
    }
  });

  for (const cb of [9, 16, 21]) {
    test(`encode → decode round trip at cluster_bits ${cb}`, () => {
      const cs = 2 ** cb;
      const x = 62 - (cb - 8);
      const maxOffset = Math.min(2 ** x, 2 ** 53) - 1;
      const offsets = [0, 1, 511, 512, 0x60058, 0x1_0000_0001, maxOffset - cs, maxOffset];
      const lengths = [1, 2, 511, 512, 513, cs - 1, cs];
      for (const offset of offsets) {
        for (const length of lengths) {
          const view = paddedView(32);
          encodeCompressedDescriptor(view, 8, offset, length, cb);
          assert.equal(view.getUint32(4), 0xa5a5a5a5);
          assert.equal(view.getUint32(16), 0xa5a5a5a5);
          const entry = decodeL2Entry(view, 8, { clusterBits: cb, dataFile: false, extendedL2: false });
          assert.equal(entry.type, 'compressed');
          assert.equal(entry.hostOffset, offset, `offset ${offset} length ${length}`);
          assert.ok(entry.compressedSize >= length, `size ${entry.compressedSize} covers ${length}`);
          assert.ok(entry.compressedSize < length + 512, `size ${entry.compressedSize} overshoots by less than a sector`);
          assert.equal((entry.hostOffset + entry.compressedSize) % 512, 0, 'ends on a sector boundary');
        }
      }
    });
  }

  test('a compressed offset ≥ 2^53 is refused (cluster_bits 9 leaves 61 offset bits)', () => {
    const { view, pos } = l2At(COMPRESSED | (1n << 53n));
    assertQcowError(
      () => decodeL2Entry(view, pos, { clusterBits: 9, dataFile: false, extendedL2: false }),
      { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'L2 entry', offset: pos },
    );
    assertQcowError(() => decodeCompressedDescriptor(0x40200000, 0, 16), { code: 'QCOW_ERR_LIMIT_EXCEEDED' });
    assert.equal(decodeCompressedDescriptor(0x401fffff, 0xffffffff, 16).hostOffset, 2 ** 53 - 1);
  });
});

describe('refcount table entries', () => {
  for (const offset of [0, 0x10000, 0x20000, 0x1_0000_0000, 2 ** 53 - 512]) {
    test(`encode → decode round trip at block offset 0x${offset.toString(16)} (non-zero position)`, () => {
      const view = paddedView(64);
      encodeRefcountTableEntry(view, 32, offset);
      assert.equal(view.getBigUint64(32), BigInt(offset));
      assert.equal(view.getUint32(28), 0xa5a5a5a5);
      assert.equal(view.getUint32(40), 0xa5a5a5a5);
      assert.deepEqual(decodeRefcountTableEntry(view, 32), { blockOffset: offset, reservedBits: false });
    });
  }

  for (let bit = 0; bit <= 8; bit++) {
    test(`reserved bit ${bit} is detected and masked out of the offset`, () => {
      const { view, pos } = l2At(0x20000n | (1n << BigInt(bit)));
      assert.deepEqual(decodeRefcountTableEntry(view, pos), { blockOffset: 0x20000, reservedBits: true });
    });
  }

  for (const bit of [53, 56, 63]) {
    test(`an offset with bit ${bit} set (≥ 2^53) is refused`, () => {
      const { view, pos } = l2At((1n << BigInt(bit)) | 0x20000n);
      assertQcowError(() => decodeRefcountTableEntry(view, pos), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'refcount table', offset: pos });
    });
  }
});
