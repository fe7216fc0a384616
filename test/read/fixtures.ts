/**
 * Images for the reader's tests, made by qemu-img and qemu-io in the test's own directory, and
 * small tools to patch them (the codec locates the structures; the patch is plain byte writes).
 */

import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { parseHeader, type ParsedHeader } from '../../src/format/index.js';
import { qemuImg, qemuIo } from '../helpers/qemu.js';

/** Runs qemu-img in `dir` (relative data-file names resolve against qemu's CWD) and asserts success. */
export function img(dir: string, ...args: string[]): string {
  const result = qemuImg(args, dir);
  assert.equal(result.code, 0, `qemu-img ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

/** Runs qemu-io commands on an image in `dir` and asserts that none failed. */
export function io(dir: string, image: string, ...commands: string[]): void {
  const args = commands.flatMap((c) => ['-c', c]);
  const result = qemuIo([...args, image], dir);
  assert.equal(result.code, 0, `qemu-io failed: ${result.stderr}${result.stdout}`);
  assert.doesNotMatch(result.stdout, /failed|error/i, `qemu-io reported: ${result.stdout}`);
}

/** The raw bytes qemu reads from an image: `qemu-img convert -O raw`, run in `dir`. */
export function qemuRaw(dir: string, image: string, options: string[] = []): Buffer {
  const out = `${image}.qemu.raw`;
  img(dir, 'convert', ...options, '-O', 'raw', image, out);
  return readFileSync(join(dir, out));
}

export function readHeaderOf(path: string): ParsedHeader {
  const bytes = readFileSync(path);
  return parseHeader(bytes.subarray(0, Math.min(bytes.length, 2 * 1024 * 1024)));
}

/** Reads a big-endian u64 from a file as a bigint. */
export function readU64(path: string, offset: number): bigint {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(8);
    readSync(fd, buf, 0, 8, offset);
    return buf.readBigUInt64BE(0);
  } finally {
    closeSync(fd);
  }
}

export function writeBytes(path: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function writeU64(path: string, offset: number, value: bigint): void {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64BE(BigInt.asUintN(64, value));
  writeBytes(path, offset, buf);
}

export function writeU32(path: string, offset: number, value: number): void {
  const buf = Buffer.alloc(4);
  buf.writeUInt32BE(value >>> 0);
  writeBytes(path, offset, buf);
}

const OFFSET_MASK = 0x00fffffffffffe00n;

/** Where the structures of an image are: L1 entry i, its L2 table, the first refcount block. */
export function locate(path: string): {
  header: ParsedHeader;
  l1EntryOffset: (i: number) => number;
  l2TableOffset: (i: number) => number;
  l2EntryOffset: (guestCluster: number) => number;
  refblockOffset: number;
} {
  const header = readHeaderOf(path);
  const entrySize = (header.incompatibleFeatures & 0x10n) !== 0n ? 16 : 8;
  const l2Entries = header.clusterSize / entrySize;
  const l1EntryOffset = (i: number) => header.l1TableOffset + i * 8;
  const l2TableOffset = (i: number) => Number(readU64(path, l1EntryOffset(i)) & OFFSET_MASK);
  return {
    header,
    l1EntryOffset,
    l2TableOffset,
    l2EntryOffset: (g: number) => {
      const table = l2TableOffset(Math.floor(g / l2Entries));
      assert.notEqual(table, 0, `guest cluster ${g} has no L2 table`);
      return table + (g % l2Entries) * entrySize;
    },
    refblockOffset: Number(readU64(path, header.refcountTableOffset) & OFFSET_MASK),
  };
}

/** Sets the 16-bit refcount of host cluster `cluster` (images made with refcount_bits=16). */
export function setRefcount16(path: string, cluster: number, value: number): void {
  const { refblockOffset } = locate(path);
  const buf = Buffer.alloc(2);
  buf.writeUInt16BE(value);
  writeBytes(path, refblockOffset + cluster * 2, buf);
}

/** A compressible, deterministic pattern qemu-io can write with -P (a byte value). */
export const PATTERNS = [0x11, 0x5a, 0xab, 0xcd, 0xef] as const;

/** Replaces a name stored in cluster 0 (data file or backing) by another of the same length. */
export function replaceStoredName(path: string, oldName: string, newName: string): void {
  const oldBytes = Buffer.from(oldName);
  const newBytes = Buffer.from(newName);
  assert.equal(newBytes.length, oldBytes.length, 'replacement names must keep the length');
  const head = readFileSync(path).subarray(0, 65536);
  const at = head.indexOf(oldBytes);
  assert.ok(at > 0, `'${oldName}' not found in the header of ${path}`);
  writeBytes(path, at, newBytes);
}
