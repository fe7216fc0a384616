/**
 * qemu-img as an oracle for the codec: complete metadata files built only from the format
 * functions must pass `qemu-img check` and read back (through qemu) exactly as the data file,
 * and where qemu's own layout is the same, must be byte-identical to what `qemu-img create` makes.
 */

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import {
  ALL_SUBCLUSTERS,
  AUTOCLEAR_DATA_FILE_RAW,
  buildL1Table,
  buildRefcountBlock,
  buildRefcountTable,
  encodeHeaderCluster,
  encodeL2Entry,
  encodeSubclusterBitmap,
  imageGeometry,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  parseHeader,
  planMetadata,
  setRefcount,
  viewOf,
  type HeaderSpec,
} from '../../src/format/index.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { KiB, MiB, toHex } from './helpers.js';

interface ImageCase {
  size: number;
  clusterBits: number;
  refcountOrder: number;
  extendedL2?: boolean;
  /** Allocate only the clusters holding data (and only the L2 tables they need); no raw bit. */
  sparse?: boolean;
  /** Extended L2: leave every subcluster bitmap 0, as qemu's metadata preallocation does. */
  zeroBitmaps?: boolean;
  /** Break the image on purpose (negative controls). */
  damage?: 'cluster0-without-copied' | 'refcount-of-l1-zero';
}

interface Extent {
  offset: number;
  bytes: Uint8Array;
}

/** Non-zero bytes in guest cluster 0, somewhere in the middle, and at the very end of the disk. */
function dataExtents(size: number, clusterSize: number): Extent[] {
  const fill = (n: number, seed: number) => Uint8Array.from({ length: n }, (_, i) => ((i * 131 + seed * 17) % 255) + 1);
  const middle = Math.floor(size / 2 / clusterSize) * clusterSize + 100;
  return [
    { offset: 0, bytes: fill(1000, 1) },
    { offset: middle, bytes: fill(3000, 2) },
    { offset: size - 700, bytes: fill(700, 3) },
  ];
}

function writeDataFile(path: string, size: number, extents: readonly Extent[]): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const e of extents) writeSync(fd, e.bytes, 0, e.bytes.length, e.offset);
  } finally {
    closeSync(fd);
  }
}

/** Builds the whole metadata file with the codec only (the layout of digest Appendix A). */
function buildMetadata(c: ImageCase, dataFileName: string, extents: readonly Extent[]): Uint8Array {
  const ext = c.extendedL2 ?? false;
  const g = imageGeometry(c.size, c.clusterBits, ext);
  const cs = g.clusterSize;

  const allocated = new Set<number>();
  if (c.sparse) {
    for (const e of extents) {
      for (let cl = Math.floor(e.offset / cs); cl * cs < e.offset + e.bytes.length; cl++) allocated.add(cl);
    }
  }
  const isAllocated = (cluster: number) => !c.sparse || allocated.has(cluster);
  const hasTable = (l1Index: number) => {
    if (!c.sparse) return true;
    for (const cl of allocated) if (Math.floor(cl / g.l2Entries) === l1Index) return true;
    return false;
  };
  const tables: number[] = [];
  for (let i = 0; i < g.l1Size; i++) if (hasTable(i)) tables.push(i);

  const plan = planMetadata({ geometry: g, refcountOrder: c.refcountOrder, l2Tables: tables.length });
  const spec: HeaderSpec = {
    clusterBits: c.clusterBits,
    size: c.size,
    l1Size: g.l1Size,
    l1TableOffset: plan.l1Offset,
    refcountTableOffset: plan.refcountTableOffset,
    refcountTableClusters: plan.refcountTableClusters,
    refcountOrder: c.refcountOrder,
    incompatibleFeatures: INCOMPAT_DATA_FILE | (ext ? INCOMPAT_EXTL2 : 0n),
    autoclearFeatures: c.sparse ? 0n : AUTOCLEAR_DATA_FILE_RAW,
    dataFileName,
  };

  const out = new Uint8Array(plan.metadataClusters * cs);
  out.set(encodeHeaderCluster(spec), 0);
  out.set(buildRefcountTable(plan), plan.refcountTableOffset);
  for (let i = 0; i < plan.refcountBlockClusters; i++) out.set(buildRefcountBlock(plan, i), plan.refcountBlocksOffset + i * cs);
  out.set(buildL1Table(plan, hasTable), plan.l1Offset);
  const view = viewOf(out);
  tables.forEach((l1Index, k) => {
    const tableOffset = plan.l2Offset + k * cs;
    for (let e = 0; e < g.l2Entries; e++) {
      const cluster = l1Index * g.l2Entries + e;
      if (cluster >= g.clusters) break;
      if (!isAllocated(cluster)) continue;
      const pos = tableOffset + e * g.l2EntrySize;
      encodeL2Entry(view, pos, cluster * cs, { copied: true });
      if (ext && !c.zeroBitmaps) encodeSubclusterBitmap(view, pos, ALL_SUBCLUSTERS, 0);
    }
  });

  if (c.damage === 'cluster0-without-copied') {
    // guest cluster 0 at host 0 without COPIED is "unallocated" (pitfall P2): reads as zeros
    encodeL2Entry(view, plan.l2Offset, 0, { copied: false });
  } else if (c.damage === 'refcount-of-l1-zero') {
    // clear the refcount of the L1 table's cluster (covered by the first block)
    const block = out.subarray(plan.refcountBlocksOffset, plan.refcountBlocksOffset + cs);
    setRefcount(block, plan.l1Offset / cs, c.refcountOrder, 0);
  }
  return out;
}

function describeCase(c: ImageCase): string {
  return `${c.size} bytes, ${2 ** c.clusterBits}-byte clusters, ${2 ** c.refcountOrder}-bit refcounts`
    + `${c.extendedL2 ? `, extended L2${c.zeroBitmaps ? ' (bitmaps 0)' : ''}` : ''}${c.sparse ? ', sparse' : ', raw (every entry allocated)'}`;
}

function writeCase(dir: string, c: ImageCase): void {
  const g = imageGeometry(c.size, c.clusterBits, c.extendedL2 ?? false);
  const extents = dataExtents(c.size, g.clusterSize);
  writeDataFile(join(dir, 'disk.data'), c.size, extents);
  writeFileSync(join(dir, 'disk.qcow2'), buildMetadata(c, 'disk.data', extents));
}

describe('qemu-img check and compare accept images built with the codec', () => {
  const cases: ImageCase[] = [
    { size: 4 * MiB + 1536, clusterBits: 16, refcountOrder: 4 },
    { size: 10 * MiB, clusterBits: 9, refcountOrder: 0 },
    { size: 16 * MiB + 512, clusterBits: 9, refcountOrder: 4 },
    { size: 256 * MiB, clusterBits: 9, refcountOrder: 6 },
    { size: 5 * MiB + 512, clusterBits: 12, refcountOrder: 2, sparse: true },
    { size: 40 * MiB + 2048, clusterBits: 10, refcountOrder: 1, sparse: true },
    { size: 3 * MiB + 4096, clusterBits: 21, refcountOrder: 5 },
    { size: 6 * MiB + 1536, clusterBits: 14, refcountOrder: 3, extendedL2: true },
    { size: 1 * MiB, clusterBits: 16, refcountOrder: 6, extendedL2: true, sparse: true },
  ];

  for (const c of cases) {
    test(describeCase(c), (t) => {
      if (!needQemu(t)) return;
      const dir = tempDir(t, 'qcow2-format-oracle-');
      writeCase(dir, c);

      const check = qemuImg(['check', 'disk.qcow2'], dir);
      assert.equal(check.code, 0, `qemu-img check:\n${check.stdout}${check.stderr}`);
      assert.match(check.stdout, /No errors were found on the image/);

      const compare = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'disk.data', 'disk.qcow2'], dir);
      assert.equal(compare.code, 0, `qemu-img compare:\n${compare.stdout}${compare.stderr}`);
      assert.match(compare.stdout, /Images are identical/);
    });
  }

  test('negative control: guest cluster 0 written without COPIED reads as zeros, so compare fails at offset 0', (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t, 'qcow2-format-oracle-');
    writeCase(dir, { size: 4 * MiB, clusterBits: 16, refcountOrder: 4, damage: 'cluster0-without-copied' });
    const compare = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'disk.data', 'disk.qcow2'], dir);
    assert.equal(compare.code, 1, `${compare.stdout}${compare.stderr}`);
    assert.match(compare.stdout, /Content mismatch at offset 0!/);
  });

  test('negative control: a used cluster with refcount 0 makes check report corruption (exit 2)', (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t, 'qcow2-format-oracle-');
    writeCase(dir, { size: 4 * MiB, clusterBits: 16, refcountOrder: 4, damage: 'refcount-of-l1-zero' });
    const check = qemuImg(['check', 'disk.qcow2'], dir);
    assert.equal(check.code, 2, `${check.stdout}${check.stderr}`);
  });
});

describe('fully preallocated raw images are byte-identical to qemu-img create', () => {
  const cases: ImageCase[] = [
    { size: 4 * MiB, clusterBits: 16, refcountOrder: 4 },
    { size: 4 * MiB + 1536, clusterBits: 16, refcountOrder: 4 },
    { size: 64 * MiB, clusterBits: 16, refcountOrder: 6 },
    { size: 64 * MiB, clusterBits: 16, refcountOrder: 0 },
    { size: 64 * MiB, clusterBits: 12, refcountOrder: 4 },
    { size: 2 * MiB, clusterBits: 12, refcountOrder: 3 },
    { size: 3 * MiB, clusterBits: 21, refcountOrder: 4 },
    // qemu preallocates extended L2 entries with bitmap 0 (pitfall P15)
    { size: 8 * MiB, clusterBits: 14, refcountOrder: 4, extendedL2: true, zeroBitmaps: true },
  ];
  for (const c of cases) {
    test(describeCase(c), (t) => {
      if (!needQemu(t)) return;
      const dir = tempDir(t, 'qcow2-format-oracle-');
      const options = `data_file=q.data,data_file_raw=on,cluster_size=${2 ** c.clusterBits},refcount_bits=${2 ** c.refcountOrder}`
        + (c.extendedL2 ? ',extended_l2=on' : '');
      const created = qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, 'q.qcow2', String(c.size)], dir);
      assert.equal(created.code, 0, created.stderr);
      const theirs = readFileSync(join(dir, 'q.qcow2'));
      // qemu preallocates every L2 entry as guest offset | COPIED: so do we (no data needed)
      const ours = buildMetadata(c, 'q.data', []);
      assert.equal(ours.length, theirs.length, 'file length');
      const diff = ours.findIndex((b, i) => b !== theirs[i]);
      assert.equal(diff, -1, `first difference at byte 0x${diff.toString(16)}`);
    });
  }
});

describe('cluster 0 of qemu-made images: parseHeader → encodeHeaderCluster gives back the same bytes', () => {
  const cases: { name: string; options: string; size: number; needsBase?: boolean }[] = [
    { name: 'data file, raw (the digest §2.2 image)', options: 'data_file=conv.data,data_file_raw=on', size: 4 * MiB },
    { name: 'data file with a backing file and format', options: 'data_file=d.data,backing_file=base.raw,backing_fmt=raw', size: 4 * MiB, needsBase: true },
    { name: 'backing file only', options: 'backing_file=base.raw,backing_fmt=raw', size: 4 * MiB, needsBase: true },
    { name: '512-byte clusters (no feature table)', options: 'cluster_size=512,data_file=s.data,data_file_raw=on', size: 1 * MiB },
    { name: '4 KiB clusters (still no feature table)', options: 'cluster_size=4096,data_file=s.data', size: 10 * MiB },
    { name: '8 KiB clusters (feature table)', options: 'cluster_size=8192,data_file=s.data', size: 10 * MiB },
    { name: 'lazy refcounts, 1-bit refcounts', options: 'lazy_refcounts=on,refcount_bits=1', size: 10 * MiB },
    { name: '2 MiB clusters, 64-bit refcounts, a long data-file name', options: `cluster_size=2M,refcount_bits=64,data_file=${'long-name-'.repeat(20)}.data`, size: 100 * MiB },
  ];
  for (const c of cases) {
    test(c.name, (t) => {
      if (!needQemu(t)) return;
      const dir = tempDir(t, 'qcow2-format-oracle-');
      if (c.needsBase) writeFileSync(join(dir, 'base.raw'), new Uint8Array(64 * KiB));
      const created = qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.options, 'img.qcow2', String(c.size)], dir);
      assert.equal(created.code, 0, created.stderr);
      const file = readFileSync(join(dir, 'img.qcow2'));
      const clusterSize = 2 ** new DataView(file.buffer, file.byteOffset).getUint32(20);
      const cluster0 = new Uint8Array(file.buffer, file.byteOffset, clusterSize);
      const h = parseHeader(cluster0);
      const spec: HeaderSpec = {
        clusterBits: h.clusterBits,
        size: h.size,
        l1Size: h.l1Size,
        l1TableOffset: h.l1TableOffset,
        refcountTableOffset: h.refcountTableOffset,
        refcountTableClusters: h.refcountTableClusters,
        refcountOrder: h.refcountOrder,
        incompatibleFeatures: h.incompatibleFeatures,
        compatibleFeatures: h.compatibleFeatures,
        autoclearFeatures: h.autoclearFeatures,
      };
      if (h.dataFileName !== undefined) spec.dataFileName = h.dataFileName;
      if (h.backingFileName !== undefined) spec.backingFileName = h.backingFileName;
      if (h.backingFormat !== undefined) spec.backingFormat = h.backingFormat;
      const ours = encodeHeaderCluster(spec);
      assert.equal(toHex(ours.subarray(0, 1024)), toHex(cluster0.subarray(0, 1024)), 'the first KiB, where every difference would be');
      assert.equal(ours.findIndex((b, i) => b !== cluster0[i]), -1, 'the whole cluster');
    });
  }
});
