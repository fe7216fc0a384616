/**
 * Helpers for the writer tests: chunking inputs, collecting outputs in memory, and decoding a
 * written metadata file with the codec (header, L1, L2, refcounts) to assert on its bytes.
 */

import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { createHash } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import type { Block } from '../../src/block.js';
import {
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  getRefcount,
  parseHeader,
  refcountsPerBlock,
  viewOf,
  type ClusterType,
  type ParsedHeader,
} from '../../src/format/index.js';
import { isAllZero } from '../../src/io/buffers.js';
import { NO_NATIVE_ENV } from '../../src/io/extents.js';
import { qemuCheck, qemuCompare, qemuInfo } from '../helpers/qemu.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export async function collect<T>(source: AsyncIterable<T> | Iterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of source) out.push(item);
  return out;
}

/** Splits `bytes` into chunks whose lengths cycle through `pattern` (views, no copies). */
export function* chunksOf(bytes: Uint8Array, pattern: readonly number[]): Generator<Uint8Array> {
  let pos = 0;
  for (let i = 0; pos < bytes.length; i++) {
    const n = pattern[i % pattern.length]!;
    yield bytes.subarray(pos, pos + n);
    pos += n;
  }
}

/** Blocks reduced to comparable values: index and a copy of the bytes. */
export function blockSnapshot(blocks: readonly Block[]): Array<{ index: number; data: Buffer }> {
  return blocks.map((b) => ({ index: b.index, data: Buffer.from(b.data) }));
}

/** A Writable that keeps everything written to it. */
export class MemoryWritable extends Writable {
  private readonly chunks: Buffer[] = [];
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.chunks.push(Buffer.from(chunk));
    callback();
  }
  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

export interface DecodedImage {
  header: ParsedHeader;
  /** Per guest cluster: the L2 entry's type and host offset ('absent' when its L2 table is not allocated). */
  entries: Array<{ type: ClusterType | 'absent'; hostOffset: number; copied: boolean }>;
  /** Refcount of every cluster of the file. */
  refcounts: number[];
  /** Clusters referenced by the metadata structures (header, reftable, refblocks, L1, L2s). */
  referenced: Set<number>;
}

/** Decodes a data-file image's metadata from its bytes and asserts its internal consistency. */
export function decodeImage(bytes: Uint8Array): DecodedImage {
  const header = parseHeader(bytes.subarray(0, Math.min(bytes.length, 2 * MiB)));
  const cs = header.clusterSize;
  assert.equal(bytes.length % cs, 0, 'the metadata file is whole clusters');
  const view = viewOf(bytes);
  const referenced = new Set<number>([0]);
  const addRange = (offset: number, clusters: number) => {
    for (let i = 0; i < clusters; i++) {
      const c = offset / cs + i;
      assert.ok(!referenced.has(c), `cluster ${c} referenced twice`);
      referenced.add(c);
    }
  };
  addRange(header.refcountTableOffset, header.refcountTableClusters);
  const refcounts = new Array<number>(bytes.length / cs).fill(0);
  const perBlock = refcountsPerBlock(header.clusterBits, header.refcountOrder);
  for (let i = 0; i < (header.refcountTableClusters * cs) / 8; i++) {
    const entry = decodeRefcountTableEntry(view, header.refcountTableOffset + i * 8);
    if (entry.blockOffset === 0) continue;
    addRange(entry.blockOffset, 1);
    const block = bytes.subarray(entry.blockOffset, entry.blockOffset + cs);
    // Entries up to a little past the end of the file one by one, then the rest must be zero bytes.
    const checked = Math.min(perBlock, Math.max(0, refcounts.length - i * perBlock) + 64);
    for (let k = 0; k < checked; k++) {
      const cluster = i * perBlock + k;
      const value = getRefcount(block, k, header.refcountOrder);
      if (cluster < refcounts.length) refcounts[cluster] = value;
      else assert.equal(value, 0, `refcount beyond the end of the file for cluster ${cluster}`);
    }
    const restByte = Math.ceil((checked * 2 ** header.refcountOrder) / 8);
    assert.ok(isAllZero(block.subarray(restByte)), 'no refcounts beyond the end of the file');
  }
  const l1Clusters = Math.ceil((header.l1Size * 8) / cs);
  if (header.l1Size > 0) addRange(header.l1TableOffset, l1Clusters);
  const l2Entries = cs / 8;
  const clusters = Math.ceil(header.size / cs);
  const entries: DecodedImage['entries'] = [];
  for (let t = 0; t < header.l1Size; t++) {
    const l1 = decodeL1Entry(view, header.l1TableOffset + t * 8);
    assert.equal(l1.reservedBits, false);
    if (l1.l2Offset !== 0) {
      assert.equal(l1.copied, true, `L1 entry ${t} has COPIED`);
      addRange(l1.l2Offset, 1);
    }
    for (let e = 0; e < l2Entries && t * l2Entries + e < clusters; e++) {
      if (l1.l2Offset === 0) {
        entries.push({ type: 'absent', hostOffset: 0, copied: false });
        continue;
      }
      const entry = decodeL2Entry(view, l1.l2Offset + e * 8, { clusterBits: header.clusterBits, extendedL2: false, dataFile: true });
      assert.equal(entry.reservedBits, false);
      entries.push({ type: entry.type, hostOffset: entry.hostOffset, copied: entry.copied });
    }
  }
  return { header, entries, refcounts, referenced };
}

/** Asserts every cluster of the file has refcount 1 exactly when a structure uses it (pitfalls P4, P8). */
export function assertRefcountsExact(image: DecodedImage): void {
  image.refcounts.forEach((value, cluster) => {
    assert.equal(value, image.referenced.has(cluster) ? 1 : 0, `refcount of cluster ${cluster}`);
  });
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** qemu-img check clean and compare identical, run in `cwd` (relative data-file names). */
export function assertQemuAgrees(raw: string, image: string, cwd: string): void {
  const check = qemuCheck(image, cwd);
  assert.equal(check.code, 0, `qemu-img check ${image}: ${check.stdout}${check.stderr}`);
  const compare = qemuCompare(raw, image, cwd);
  assert.equal(compare.code, 0, `qemu-img compare ${raw} ${image}: ${compare.stdout}${compare.stderr}`);
}

/** qemu-img info's data-file-raw flag and virtual size. */
export function qemuFacts(image: string, cwd: string): { virtualSize: number; dataFileRaw: boolean; dataFile: string } {
  const info = qemuInfo(image, cwd) as { 'virtual-size': number; 'format-specific': { data: { 'data-file-raw': boolean; 'data-file': string } } };
  return {
    virtualSize: info['virtual-size'],
    dataFileRaw: info['format-specific'].data['data-file-raw'],
    dataFile: info['format-specific'].data['data-file'],
  };
}

/** Allocated bytes of a file (st_blocks × 512). */
export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

/** Runs `fn` with the native probe switched off, as QCOW2_STREAM_NO_NATIVE=1 does. */
export async function withoutNative<T>(fn: () => Promise<T> | T): Promise<T> {
  const saved = process.env[NO_NATIVE_ENV];
  process.env[NO_NATIVE_ENV] = '1';
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  }
}
