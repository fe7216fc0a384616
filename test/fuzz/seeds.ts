/**
 * Seed images for the reader's fuzzer: small valid images of every kind qemu makes (made by
 * qemu-img and qemu-io in a temporary directory), with the byte ranges of their structures
 * located, so mutations land where a parser can go wrong rather than in guest data.
 */

import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseHeader } from '../../src/format/index.js';
import { img, io } from '../read/fixtures.js';
import { randomBytesAt } from '../helpers/images.js';

/** A named byte range of a seed image (a structure: header, L1 table, an L2 table, …). */
export interface Region {
  name: string;
  start: number;
  length: number;
}

export interface Seed {
  /** File name inside the seed directory (companion files sit next to it). */
  name: string;
  bytes: Buffer;
  clusterSize: number;
  regions: Region[];
}

const OFFSET_MASK = 0x00fffffffffffe00n;

/** Finds the header, extension area, L1, L2, refcount and snapshot structures of `bytes`. */
export function regionsOf(bytes: Buffer): { clusterSize: number; regions: Region[] } {
  const header = parseHeader(bytes.subarray(0, Math.min(bytes.length, 2 * 1024 * 1024)));
  const cs = header.clusterSize;
  const regions: Region[] = [
    { name: 'header', start: 0, length: header.version === 2 ? 72 : header.headerLength },
    { name: 'extensions', start: header.headerLength, length: Math.min(512, cs) - header.headerLength },
  ];
  if (header.backingFileOffset !== 0) regions.push({ name: 'backing name', start: header.backingFileOffset, length: header.backingFileSize });
  if (header.l1Size > 0) regions.push({ name: 'L1 table', start: header.l1TableOffset, length: header.l1Size * 8 });
  for (let i = 0; i < header.l1Size; i++) {
    const l2 = Number(bytes.readBigUInt64BE(header.l1TableOffset + i * 8) & OFFSET_MASK);
    if (l2 !== 0 && l2 + cs <= bytes.length) regions.push({ name: `L2 table ${i}`, start: l2, length: cs });
  }
  regions.push({ name: 'refcount table', start: header.refcountTableOffset, length: Math.min(256, header.refcountTableClusters * cs) });
  const refblock = Number(bytes.readBigUInt64BE(header.refcountTableOffset) & OFFSET_MASK);
  if (refblock !== 0) regions.push({ name: 'refcount block', start: refblock, length: Math.min(512, cs) });
  if (header.nbSnapshots > 0) regions.push({ name: 'snapshot table', start: header.snapshotsOffset, length: 128 });
  return { clusterSize: cs, regions: regions.filter((r) => r.length > 0 && r.start + r.length <= bytes.length) };
}

/**
 * Makes the seeds in `dir`: external data file with the raw bit on and off, internal, zlib and
 * zstd compressed, extended L2 (alone and over a data file), a backing chain, version 2, an
 * internal snapshot, and 512-byte clusters. Clusters are small so the files stay small (fast
 * cases) while still having several L2 tables and refcount entries.
 */
export function makeSeeds(dir: string): Seed[] {
  writeFileSync(join(dir, 'src.raw'), Buffer.concat([randomBytesAt(11, 0, 96 * 1024), Buffer.alloc(64 * 1024), Buffer.alloc(96 * 1024, 0x5a)]));
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k,data_file=ext-raw.data,data_file_raw=on', 'ext-raw.qcow2', '256K');
  io(dir, 'ext-raw.qcow2', 'write -P 0x11 0 20k', 'write -P 0x12 100k 8k', 'write -z 8k 4k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k,data_file=ext.data', 'ext.qcow2', '256K');
  io(dir, 'ext.qcow2', 'write -P 0x21 0 12k', 'write -P 0x22 64k 8k', 'write -z 4k 4k', 'write -z 200k 8k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'int.qcow2', '256K');
  io(dir, 'int.qcow2', 'write -P 0x31 0 16k', 'write -P 0x32 130k 10k', 'write -z 4k 4k', 'discard 8k 4k');
  img(dir, 'convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'zlib.qcow2');
  img(dir, 'convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k,compression_type=zstd', 'src.raw', 'zstd.qcow2');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=16k,extended_l2=on', 'extl2.qcow2', '256K');
  io(dir, 'extl2.qcow2', 'write -P 0x41 0 3k', 'write -P 0x42 20k 1k', 'write -z 40k 2k', 'write -P 0x43 64k 16k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=16k,extended_l2=on,data_file=extl2-ext.data', 'extl2-ext.qcow2', '256K');
  io(dir, 'extl2-ext.qcow2', 'write -P 0x44 0 3k', 'write -z 20k 1k', 'write -P 0x45 64k 16k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'base.qcow2', '256K');
  io(dir, 'base.qcow2', 'write -P 0x51 0 64k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2', '256K');
  io(dir, 'overlay.qcow2', 'write -P 0x52 8k 8k', 'write -z 32k 4k', 'write -P 0x53 128k 4k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k,compat=0.10', 'v2.qcow2', '256K');
  io(dir, 'v2.qcow2', 'write -P 0x61 0 12k', 'write -P 0x62 150k 4k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'snap.qcow2', '256K');
  io(dir, 'snap.qcow2', 'write -P 0x71 0 8k');
  img(dir, 'snapshot', '-c', 's1', 'snap.qcow2');
  io(dir, 'snap.qcow2', 'write -P 0x72 4k 8k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512', 'c512.qcow2', '128K');
  io(dir, 'c512.qcow2', 'write -P 0x81 0 3k', 'write -P 0x82 70k 1k');

  const names = ['ext-raw', 'ext', 'int', 'zlib', 'zstd', 'extl2', 'extl2-ext', 'overlay', 'v2', 'snap', 'c512'];
  return names.map((base) => {
    const name = `${base}.qcow2`;
    const bytes = readFileSync(join(dir, name));
    const { clusterSize, regions } = regionsOf(bytes);
    assert.ok(regions.some((r) => r.name.startsWith('L2 table')), `${name} has an L2 table to mutate`);
    return { name, bytes, clusterSize, regions };
  });
}
