import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  buildL1Table,
  buildRefcountBlock,
  buildRefcountTable,
  checkClusterBits,
  checkVirtualSize,
  decodeL1Entry,
  decodeRefcountTableEntry,
  getRefcount,
  imageGeometry,
  maxVirtualSize,
  planMetadata,
  refcountsPerBlock,
  roundUpToSector,
  solveRefcountLayout,
  viewOf,
  type MetadataPlan,
} from '../../src/format/index.js';
import { InvalidArgumentError, LimitExceededError } from '../../src/errors.js';
import { assertQcowError, GiB, KiB, MiB, PiB, TiB } from './helpers.js';

function fullPlan(size: number, clusterBits: number, refcountOrder: number, extraClusters = 0): MetadataPlan {
  const geometry = imageGeometry(size, clusterBits);
  return planMetadata({ geometry, refcountOrder, l2Tables: geometry.l1Size, extraClusters });
}

describe('imageGeometry', () => {
  const cases: { size: number; cb: number; l1Size: number; clusters: number; l2Entries: number }[] = [
    { size: 4 * MiB, cb: 16, l1Size: 1, clusters: 64, l2Entries: 8192 },
    { size: 100 * GiB, cb: 16, l1Size: 200, clusters: 1638400, l2Entries: 8192 },
    { size: 1 * TiB, cb: 16, l1Size: 2048, clusters: 16777216, l2Entries: 8192 },
    { size: 10 * MiB, cb: 9, l1Size: 320, clusters: 20480, l2Entries: 64 },
    { size: 256 * MiB, cb: 9, l1Size: 8192, clusters: 524288, l2Entries: 64 },
    { size: 4 * MiB + 512, cb: 16, l1Size: 1, clusters: 65, l2Entries: 8192 },
    { size: 512 * MiB, cb: 16, l1Size: 1, clusters: 8192, l2Entries: 8192 },
    { size: 512 * MiB + 512, cb: 16, l1Size: 2, clusters: 8193, l2Entries: 8192 },
    { size: 0, cb: 16, l1Size: 0, clusters: 0, l2Entries: 8192 },
    { size: 2 * PiB, cb: 16, l1Size: 4194304, clusters: 2 ** 35, l2Entries: 8192 },
    { size: 3 * GiB, cb: 21, l1Size: 1, clusters: 1536, l2Entries: 262144 },
  ];
  for (const c of cases) {
    test(`${c.size} bytes at ${2 ** c.cb}-byte clusters → l1_size ${c.l1Size}`, () => {
      const g = imageGeometry(c.size, c.cb);
      assert.deepEqual(g, {
        clusterBits: c.cb,
        clusterSize: 2 ** c.cb,
        size: c.size,
        clusters: c.clusters,
        extendedL2: false,
        l2EntrySize: 8,
        l2Entries: c.l2Entries,
        l1Size: c.l1Size,
        bytesPerL2: 2 ** c.cb * c.l2Entries,
      });
    });
  }

  test('extended L2 halves the entries per table and doubles l1_size', () => {
    const g = imageGeometry(1 * GiB, 16, true);
    assert.equal(g.extendedL2, true);
    assert.equal(g.l2EntrySize, 16);
    assert.equal(g.l2Entries, 4096);
    assert.equal(g.bytesPerL2, 256 * MiB);
    assert.equal(g.l1Size, 4);
    assert.equal(imageGeometry(1 * GiB, 16).l1Size, 2);
  });
});

describe('maxVirtualSize / checkVirtualSize / checkClusterBits / roundUpToSector', () => {
  test('the 32 MiB L1 limit: 128 GiB at 512 B, 2 PiB at 64 KiB, capped below 2^53 at 2 MiB', () => {
    assert.equal(maxVirtualSize(9), 128 * GiB);
    assert.equal(maxVirtualSize(12), 8 * TiB);
    assert.equal(maxVirtualSize(16), 2 * PiB);
    assert.equal(maxVirtualSize(21), Number.MAX_SAFE_INTEGER - 511);
    assert.equal(maxVirtualSize(21) % 512, 0, 'the cap is a whole number of sectors');
  });

  test('extended L2 halves the limit', () => {
    assert.equal(maxVirtualSize(14, true), maxVirtualSize(14) / 2);
    assert.equal(maxVirtualSize(16, true), 1 * PiB);
  });

  test('the limit grows with the cluster size and never exceeds MAX_SAFE_INTEGER', () => {
    for (let cb = 9; cb <= 21; cb++) {
      assert.ok(maxVirtualSize(cb) <= Number.MAX_SAFE_INTEGER);
      if (cb > 9) assert.ok(maxVirtualSize(cb) >= maxVirtualSize(cb - 1));
      // at the limit, l1_size is at most 4,194,304 entries (32 MiB)
      if (maxVirtualSize(cb) < Number.MAX_SAFE_INTEGER - 511) assert.equal(imageGeometry(maxVirtualSize(cb), cb).l1Size, 4194304);
    }
  });

  test('sizes up to the limit are accepted', () => {
    for (const [size, cb] of [[0, 9], [512, 9], [128 * GiB, 9], [2 * PiB, 16], [Number.MAX_SAFE_INTEGER - 511, 21]] as const) {
      assert.doesNotThrow(() => checkVirtualSize(size, cb), `${size} at ${cb}`);
    }
  });

  const tooLarge: { size: number; cb: number; extendedL2?: boolean; hint: string }[] = [
    { size: 128 * GiB + 512, cb: 9, hint: 'Use --cluster-size 1024 (API: clusterSize: 1024) or larger' },
    { size: 1 * PiB, cb: 9, hint: 'Use --cluster-size 65536 (API: clusterSize: 65536) or larger' },
    { size: 2 * PiB + 512, cb: 16, hint: 'Use --cluster-size 131072 (API: clusterSize: 131072) or larger' },
    { size: 2 ** 46 + 512, cb: 14, extendedL2: true, hint: 'Use --cluster-size 32768 (API: clusterSize: 32768) or larger' },
    { size: Number.MAX_SAFE_INTEGER, cb: 21, hint: 'No cluster size can address this size' },
  ];
  for (const c of tooLarge) {
    test(`${c.size} bytes at ${2 ** c.cb}-byte clusters${c.extendedL2 ? ' (extended L2)' : ''} is refused; hint: ${c.hint}`, () => {
      const err = assertQcowError(() => checkVirtualSize(c.size, c.cb, c.extendedL2), { code: 'QCOW_ERR_INVALID_ARGUMENT', message: /too large/ });
      assert.ok(err instanceof InvalidArgumentError);
      assert.equal(err.hint, c.hint);
      const named = /--cluster-size (\d+)/.exec(c.hint);
      if (named) {
        const bits = Math.log2(Number(named[1]));
        assert.doesNotThrow(() => checkVirtualSize(c.size, bits, c.extendedL2), 'the suggested cluster size fits');
        assert.throws(() => checkVirtualSize(c.size, bits - 1, c.extendedL2), 'the next smaller one does not');
      }
    });
  }

  for (const size of [-1, -512, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
    test(`virtual size ${size} is refused as invalid`, () => {
      assertQcowError(() => checkVirtualSize(size, 16), { code: 'QCOW_ERR_INVALID_ARGUMENT', message: /Invalid virtual size/ });
    });
  }

  test('checkClusterBits accepts 9..21 and refuses the rest', () => {
    for (let cb = 9; cb <= 21; cb++) assert.doesNotThrow(() => checkClusterBits(cb));
    for (const cb of [0, 8, 22, 64, 16.5, Number.NaN]) {
      assertQcowError(() => checkClusterBits(cb), { code: 'QCOW_ERR_INVALID_ARGUMENT' });
    }
  });

  test('roundUpToSector rounds up to whole 512-byte sectors (pitfall P6)', () => {
    const cases: [number, number][] = [[0, 0], [1, 512], [511, 512], [512, 512], [513, 1024], [1000, 1024], [8389842, 8390144]];
    for (const [size, expected] of cases) assert.equal(roundUpToSector(size), expected, `${size}`);
  });
});

describe('solveRefcountLayout', () => {
  const cases: { name: string; other: number; cb: number; order: number; table: number; blocks: number; total: number }[] = [
    { name: 'nothing to count', other: 0, cb: 16, order: 4, table: 0, blocks: 0, total: 0 },
    { name: 'header only', other: 1, cb: 16, order: 4, table: 1, blocks: 1, total: 3 },
    { name: 'qemu 4 MiB image: hdr + L1 + L2', other: 3, cb: 16, order: 4, table: 1, blocks: 1, total: 5 },
    { name: '1 TiB fully preallocated, 64 KiB, 16-bit (M = 2050)', other: 2050, cb: 16, order: 4, table: 1, blocks: 1, total: 2052 },
    { name: '256 MiB at 512 B, 64-bit refcounts (M = 8321)', other: 8321, cb: 9, order: 6, table: 3, blocks: 133, total: 8457 },
    { name: '10 MiB at 512 B, 16-bit (qemu made 329 clusters)', other: 326, cb: 9, order: 4, table: 1, blocks: 2, total: 329 },
    { name: 'a block exactly full: 32766 + itself + table', other: 32766, cb: 16, order: 4, table: 1, blocks: 1, total: 32768 },
    { name: 'one more cluster needs a second block', other: 32767, cb: 16, order: 4, table: 1, blocks: 2, total: 32770 },
    { name: '1-bit refcounts at 512 B', other: 10000, cb: 9, order: 0, table: 1, blocks: 3, total: 10004 },
  ];
  for (const c of cases) {
    test(`${c.name} → RT ${c.table}, RB ${c.blocks}, total ${c.total}`, () => {
      assert.deepEqual(solveRefcountLayout(c.other, c.cb, c.order), { tableClusters: c.table, blockClusters: c.blocks, totalClusters: c.total });
    });
  }

  test('a refcount table of exactly 8 MiB is accepted; one cluster more is LimitExceededError', () => {
    // 512 B clusters, 64-bit refcounts: 64 refcounts per block, 64 entries per table cluster.
    // 16384 table clusters (8 MiB) → 1,048,576 blocks → 67,108,864 clusters in all.
    const maxOther = 67108864 - 16384 - 1048576;
    assert.deepEqual(solveRefcountLayout(maxOther, 9, 6), { tableClusters: 16384, blockClusters: 1048576, totalClusters: 67108864 });
    const err = assertQcowError(() => solveRefcountLayout(maxOther + 1, 9, 6), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'refcount table' });
    assert.ok(err instanceof LimitExceededError);
    assert.equal(err.limit, 8 * MiB);
    assert.equal(err.actual, 16385 * 512);
  });
});

describe('planMetadata', () => {
  test('1 TiB fully preallocated, 64 KiB clusters, 16-bit: 2052 clusters (134,479,872 bytes), like qemu', () => {
    const plan = fullPlan(1 * TiB, 16, 4);
    assert.equal(plan.l1Clusters, 1);
    assert.equal(plan.l2Tables, 2048);
    assert.equal(plan.refcountBlockClusters, 1);
    assert.equal(plan.refcountTableClusters, 1);
    assert.equal(plan.totalClusters, 2052);
    assert.equal(plan.metadataClusters, 2052);
    assert.equal(plan.totalClusters * 65536, 134479872);
    assert.equal(plan.refcountTableOffset, 0x10000);
    assert.equal(plan.refcountBlocksOffset, 0x20000);
    assert.equal(plan.l1Offset, 0x30000);
    assert.equal(plan.l2Offset, 0x40000);
  });

  test('512 B clusters, refcount_order 6, 256 MiB fully preallocated: RT 3, RB 133, L1C 128, NL2 8192, total 8457', () => {
    const plan = fullPlan(256 * MiB, 9, 6);
    assert.equal(plan.refcountTableClusters, 3);
    assert.equal(plan.refcountBlockClusters, 133);
    assert.equal(plan.l1Clusters, 128);
    assert.equal(plan.l2Tables, 8192);
    assert.equal(plan.totalClusters, 8457);
    assert.equal(plan.metadataClusters, 8457);
    assert.equal(plan.refcountTableOffset, 512);
    assert.equal(plan.refcountBlocksOffset, 4 * 512);
    assert.equal(plan.l1Offset, (4 + 133) * 512);
    assert.equal(plan.l2Offset, (4 + 133 + 128) * 512);
  });

  test('qemu\'s 4 MiB data-file image: hdr(0), reftable(1), refblock(2), L1(3), L2(4)', () => {
    const plan = fullPlan(4 * MiB, 16, 4);
    assert.deepEqual(
      [plan.refcountTableOffset, plan.refcountBlocksOffset, plan.l1Offset, plan.l2Offset, plan.totalClusters],
      [0x10000, 0x20000, 0x30000, 0x40000, 5],
    );
  });

  test('qemu\'s 100 GiB raw-bit image has 204 clusters', () => {
    assert.equal(fullPlan(100 * GiB, 16, 4).totalClusters, 204);
  });

  test('qemu\'s 10 MiB image at 512 B clusters has 329 clusters (its order differs, the count does not)', () => {
    const plan = fullPlan(10 * MiB, 9, 4);
    assert.equal(plan.totalClusters, 329);
    assert.equal(plan.l1Clusters, 5);
    assert.equal(plan.refcountBlockClusters, 2);
  });

  test('extra clusters after the L2 tables are counted in totalClusters but not in metadataClusters', () => {
    const plan = fullPlan(4 * MiB, 16, 4, 64);
    assert.equal(plan.metadataClusters, 5);
    assert.equal(plan.totalClusters, 69);
    const plan2 = fullPlan(4 * MiB, 9, 0, 100000);
    assert.equal(plan2.totalClusters, plan2.metadataClusters + 100000);
    assert.equal(plan2.refcountBlockClusters, Math.ceil(plan2.totalClusters / refcountsPerBlock(9, 0)));
  });

  test('a sparse plan (no L2 tables) and an empty image', () => {
    const g = imageGeometry(64 * MiB, 16);
    const sparse = planMetadata({ geometry: g, refcountOrder: 4, l2Tables: 0 });
    assert.equal(sparse.totalClusters, 4);
    assert.equal(sparse.l2Offset, sparse.l1Offset + 65536);
    const empty = planMetadata({ geometry: imageGeometry(0, 16), refcountOrder: 4, l2Tables: 0 });
    assert.equal(empty.l1Clusters, 0);
    assert.equal(empty.totalClusters, 3);
  });

  test('L1 spanning several clusters: l1_size 320 at 512 B is 5 clusters; 65 entries need 2', () => {
    assert.equal(fullPlan(10 * MiB, 9, 4).l1Clusters, 5);
    assert.equal(fullPlan(65 * 32 * KiB, 9, 4).l1Clusters, 2);
    assert.equal(fullPlan(64 * 32 * KiB, 9, 4).l1Clusters, 1);
  });
});

describe('buildRefcountTable / buildRefcountBlock / buildL1Table', () => {
  const plans: [string, MetadataPlan][] = [
    ['4 MiB, 64 KiB, order 4', fullPlan(4 * MiB, 16, 4)],
    ['256 MiB, 512 B, order 6 (3 table clusters, 133 blocks)', fullPlan(256 * MiB, 9, 6)],
    ['10 MiB, 512 B, order 0', fullPlan(10 * MiB, 9, 0)],
    ['20 MiB, 1 KiB, order 2', fullPlan(20 * MiB, 10, 2)],
    ['8 MiB, 4 KiB, order 5, with 1000 extra clusters', fullPlan(8 * MiB, 12, 5, 1000)],
  ];

  for (const [name, plan] of plans) {
    const cs = plan.geometry.clusterSize;

    test(`${name}: the refcount table points at each block in order, the rest is 0`, () => {
      const table = buildRefcountTable(plan);
      assert.equal(table.length, plan.refcountTableClusters * cs);
      const view = viewOf(table);
      for (let i = 0; i < table.length / 8; i++) {
        const entry = decodeRefcountTableEntry(view, i * 8);
        assert.equal(entry.reservedBits, false);
        assert.equal(entry.blockOffset, i < plan.refcountBlockClusters ? plan.refcountBlocksOffset + i * cs : 0, `entry ${i}`);
      }
    });

    test(`${name}: the blocks hold 1 for clusters [0, total) and 0 after`, () => {
      const perBlock = refcountsPerBlock(plan.geometry.clusterBits, plan.refcountOrder);
      let ones = 0;
      for (let b = 0; b <= plan.refcountBlockClusters; b++) {
        // one index past the last block: a block that covers nothing is all zero
        const block = buildRefcountBlock(plan, b);
        assert.equal(block.length, cs);
        for (let i = 0; i < perBlock; i++) {
          const cluster = b * perBlock + i;
          const value = getRefcount(block, i, plan.refcountOrder);
          if (value !== (cluster < plan.totalClusters ? 1 : 0)) assert.fail(`cluster ${cluster} (block ${b}, entry ${i}) has refcount ${value}`);
          ones += value;
        }
      }
      assert.equal(ones, plan.totalClusters);
      assert.ok(plan.refcountBlockClusters * perBlock >= plan.totalClusters, 'the blocks cover every cluster');
    });

    test(`${name}: the L1 table points at consecutive L2 tables with COPIED, padded with zeros`, () => {
      const l1 = buildL1Table(plan);
      assert.equal(l1.length, plan.l1Clusters * cs);
      const view = viewOf(l1);
      for (let i = 0; i < l1.length / 8; i++) {
        const entry = decodeL1Entry(view, i * 8);
        if (i < plan.geometry.l1Size) {
          assert.deepEqual(entry, { l2Offset: plan.l2Offset + i * cs, copied: true, reservedBits: false }, `entry ${i}`);
        } else {
          assert.deepEqual(entry, { l2Offset: 0, copied: false, reservedBits: false }, `entry ${i}`);
        }
      }
    });
  }

  test('a sparse L1 numbers the present tables in L1 order', () => {
    const g = imageGeometry(10 * MiB, 9);
    const present = (i: number) => i % 3 === 0 || i === g.l1Size - 1;
    let count = 0;
    for (let i = 0; i < g.l1Size; i++) if (present(i)) count++;
    const plan = planMetadata({ geometry: g, refcountOrder: 4, l2Tables: count });
    const view = viewOf(buildL1Table(plan, present));
    let k = 0;
    for (let i = 0; i < g.l1Size; i++) {
      const entry = decodeL1Entry(view, i * 8);
      if (present(i)) {
        assert.deepEqual(entry, { l2Offset: plan.l2Offset + k * 512, copied: true, reservedBits: false }, `entry ${i}`);
        k++;
      } else {
        assert.equal(entry.l2Offset, 0, `entry ${i}`);
        assert.equal(entry.copied, false, `entry ${i}`);
      }
    }
    assert.equal(k, count);
    assert.equal(plan.metadataClusters, plan.l2Offset / 512 + count);
  });

  test('buildL1Table refuses more present tables than the plan holds', () => {
    const g = imageGeometry(10 * MiB, 9);
    const plan = planMetadata({ geometry: g, refcountOrder: 4, l2Tables: 3 });
    assert.throws(() => buildL1Table(plan), RangeError);
    assert.doesNotThrow(() => buildL1Table(plan, (i) => i < 3));
  });
});
