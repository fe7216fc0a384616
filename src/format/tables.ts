/**
 * L1 and L2 table entries (spec: "Cluster mapping"), standard and extended, and the refcount
 * table entry. Entries are read as two u32 words so the hot path needs no bigint.
 */

import {
  ENTRY_COMPRESSED_HI,
  ENTRY_COPIED_HI,
  L1_RESERVED_MASK_HI,
  L1_RESERVED_MASK_LO,
  L2_RESERVED_MASK_HI,
  L2_RESERVED_MASK_LO,
  L2_ZERO_FLAG_LO,
  OFFSET_MASK_HI,
  OFFSET_MASK_LO,
  REFTABLE_RESERVED_MASK_LO,
  SUBCLUSTERS_PER_CLUSTER,
} from './constants.js';
import { LimitExceededError } from '../errors.js';

const TWO_POW_32 = 0x1_0000_0000;
const SAFE_HI_LIMIT = 0x20_0000; // offsets with a high word at or above this are ≥ 2^53

function offsetOf(hi: number, lo: number, structure: string, pos: number): number {
  const high = hi & OFFSET_MASK_HI;
  if (high >= SAFE_HI_LIMIT) {
    throw new LimitExceededError(`${structure} at byte ${pos} points beyond 2^53`, { structure, offset: pos });
  }
  return high * TWO_POW_32 + ((lo & OFFSET_MASK_LO) >>> 0);
}

function setOffsetWords(view: DataView, pos: number, hiFlags: number, loFlags: number, offset: number): void {
  view.setUint32(pos, (hiFlags | Math.floor(offset / TWO_POW_32)) >>> 0);
  view.setUint32(pos + 4, ((offset >>> 0) | loFlags) >>> 0);
}

// ---------------------------------------------------------------------------------------------
// L1

/** A decoded L1 entry. */
export interface L1Entry {
  /** Offset of the L2 table in the image file; 0 = no table (the whole range is unallocated). */
  l2Offset: number;
  /** Bit 63: the L2 table's refcount is exactly 1. */
  copied: boolean;
  /** Some reserved bit is set (a corruption `check` reports). */
  reservedBits: boolean;
}

/** Bytes per L1 entry. */
export const L1_ENTRY_SIZE = 8;

/** Decodes the L1 entry at byte `pos`; an offset of 2^53 or more is a LimitExceededError. */
export function decodeL1Entry(view: DataView, pos: number): L1Entry {
  const hi = view.getUint32(pos);
  const lo = view.getUint32(pos + 4);
  return {
    l2Offset: offsetOf(hi, lo, 'L1 entry', pos),
    copied: (hi & ENTRY_COPIED_HI) !== 0,
    reservedBits: (hi & L1_RESERVED_MASK_HI) !== 0 || (lo & L1_RESERVED_MASK_LO) !== 0,
  };
}

/** Writes an L1 entry; a table referenced once is written with COPIED, as qemu's check wants. */
export function encodeL1Entry(view: DataView, pos: number, l2Offset: number, copied = l2Offset !== 0): void {
  setOffsetWords(view, pos, copied ? ENTRY_COPIED_HI : 0, 0, l2Offset);
}

// ---------------------------------------------------------------------------------------------
// L2

/**
 * How qemu classifies a standard entry (qcow2_get_cluster_type):
 * compressed first, then the zero flag, then offset 0 (unallocated — except with a data file
 * and COPIED set, which is guest cluster 0 mapped to host offset 0), else normal.
 */
export type ClusterType = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

/** A decoded L2 entry (standard or extended), classified as qemu does. */
export interface L2Entry {
  /** How the cluster reads: see {@link ClusterType}. */
  type: ClusterType;
  /** Host offset for normal / zero-alloc clusters; for compressed ones, the byte offset of the data. */
  hostOffset: number;
  /** Bit 63: the data cluster's refcount is exactly 1. */
  copied: boolean;
  /** Some reserved bit is set (a corruption `check` reports). */
  reservedBits: boolean;
  /** Compressed clusters only: bytes to read (may overshoot the stream's end). */
  compressedSize: number;
  /** Extended L2 only: subcluster allocation and zero bitmaps (bit x = subcluster x). */
  allocMask: number;
  /** Extended L2 only: the reads-as-zero bitmap (bit x = subcluster x). */
  zeroMask: number;
}

/** What decoding an L2 entry depends on besides its bytes. */
export interface L2Context {
  /** log2 of the cluster size (compressed descriptors depend on it). */
  clusterBits: number;
  /** The image has an external data file (incompatible bit 2). */
  dataFile: boolean;
  /** Entries are extended (16 bytes, with subcluster bitmaps; incompatible bit 4). */
  extendedL2: boolean;
}

/** Bytes per L2 entry: 16 extended, 8 standard. */
export function l2EntrySize(extendedL2: boolean): number {
  return extendedL2 ? 16 : 8;
}

/** Decodes the L2 entry at byte `pos` and classifies it like qemu's qcow2_get_cluster_type. */
export function decodeL2Entry(view: DataView, pos: number, ctx: L2Context): L2Entry {
  const hi = view.getUint32(pos);
  const lo = view.getUint32(pos + 4);
  const copied = (hi & ENTRY_COPIED_HI) !== 0;
  const allocMask = ctx.extendedL2 ? view.getUint32(pos + 12) : 0;
  const zeroMask = ctx.extendedL2 ? view.getUint32(pos + 8) : 0;
  if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
    const { hostOffset, compressedSize } = decodeCompressedDescriptor(hi, lo, ctx.clusterBits, pos);
    return { type: 'compressed', hostOffset, copied, reservedBits: false, compressedSize, allocMask, zeroMask };
  }
  const hostOffset = offsetOf(hi, lo, 'L2 entry', pos);
  const reservedBits =
    (hi & L2_RESERVED_MASK_HI) !== 0 || (lo & L2_RESERVED_MASK_LO) !== 0 || (ctx.extendedL2 && (lo & L2_ZERO_FLAG_LO) !== 0);
  let type: ClusterType;
  if (!ctx.extendedL2 && (lo & L2_ZERO_FLAG_LO) !== 0) type = hostOffset !== 0 ? 'zero-alloc' : 'zero-plain';
  else if (hostOffset === 0 && !(ctx.dataFile && copied)) type = 'unallocated';
  else type = 'normal';
  return { type, hostOffset, copied, reservedBits, compressedSize: 0, allocMask, zeroMask };
}

/** Flags of an L2 entry to write. */
export interface L2EntryFlags {
  /** Set COPIED (bit 63): the cluster's refcount is exactly 1. */
  copied?: boolean;
  /** Set the zero flag (bit 0): the cluster reads as zeros. */
  zero?: boolean;
}

/** Writes a standard L2 entry (or the first word of an extended one). */
export function encodeL2Entry(view: DataView, pos: number, hostOffset: number, flags: L2EntryFlags = {}): void {
  setOffsetWords(view, pos, flags.copied ? ENTRY_COPIED_HI : 0, flags.zero ? L2_ZERO_FLAG_LO : 0, hostOffset);
}

/** Writes the subcluster bitmap of an extended L2 entry (second 8 bytes). */
export function encodeSubclusterBitmap(view: DataView, pos: number, allocMask: number, zeroMask: number): void {
  view.setUint32(pos + 8, zeroMask >>> 0);
  view.setUint32(pos + 12, allocMask >>> 0);
}

/** All 32 subclusters allocated. */
export const ALL_SUBCLUSTERS = 0xffffffff;

/**
 * Extended L2, per subcluster (qcow2_get_subcluster_type). Returns 'invalid' where the spec
 * calls the combination a corruption.
 */
export type SubclusterType = 'data' | 'zero' | 'unallocated' | 'invalid';

/** How subcluster `index` (0–31) of an extended L2 entry reads, like qemu's qcow2_get_subcluster_type. */
export function subclusterType(entry: L2Entry, index: number): SubclusterType {
  if (entry.type === 'compressed') return entry.allocMask === 0 && entry.zeroMask === 0 ? 'data' : 'invalid';
  // Like qemu, validity is a property of the whole entry, not of the subcluster asked about.
  if (entry.type === 'unallocated' && entry.allocMask !== 0) return 'invalid';
  if ((entry.allocMask & entry.zeroMask) !== 0) return 'invalid';
  const bit = 1 << index;
  if ((entry.allocMask & bit) !== 0) return 'data';
  return (entry.zeroMask & bit) !== 0 ? 'zero' : 'unallocated';
}

/** Subclusters per cluster with extended L2 entries (32). */
export const SUBCLUSTERS = SUBCLUSTERS_PER_CLUSTER;

/**
 * Compressed cluster descriptor (spec: "Compressed Clusters Descriptor"):
 * x = 62 − (cluster_bits − 8); bits 0..x−1 host byte offset; bits x..61 additional sectors.
 */
export function decodeCompressedDescriptor(
  hi: number,
  lo: number,
  clusterBits: number,
  pos = 0,
): {
  /** Byte offset of the compressed data in the image file (not cluster-aligned). */
  hostOffset: number;
  /** Bytes to read: up to the end of the last sector the descriptor counts. */
  compressedSize: number;
} {
  const x = 62 - (clusterBits - 8);
  const value = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
  const offset = value & ((1n << BigInt(x)) - 1n);
  const sectors = Number((value >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n));
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new LimitExceededError(`Compressed L2 entry at byte ${pos} points beyond 2^53`, { structure: 'L2 entry', offset: pos });
  }
  const hostOffset = Number(offset);
  return { hostOffset, compressedSize: (sectors + 1) * 512 - (hostOffset % 512) };
}

/** Builds a compressed descriptor (used by tests that craft images). */
export function encodeCompressedDescriptor(view: DataView, pos: number, hostOffset: number, byteLength: number, clusterBits: number): void {
  const x = 62 - (clusterBits - 8);
  const sectors = Math.ceil(((hostOffset % 512) + byteLength) / 512) - 1;
  const value = (1n << 62n) | (BigInt(sectors) << BigInt(x)) | BigInt(hostOffset);
  view.setBigUint64(pos, value);
}

// ---------------------------------------------------------------------------------------------
// Refcount table

/** A decoded refcount-table entry. */
export interface RefcountTableEntry {
  /** Offset of the refcount block in the image file; 0 = no block (those clusters are free). */
  blockOffset: number;
  /** Some reserved bit (0–8) is set (a corruption `check` reports). */
  reservedBits: boolean;
}

/** Decodes the refcount-table entry at byte `pos`. */
export function decodeRefcountTableEntry(view: DataView, pos: number): RefcountTableEntry {
  const hi = view.getUint32(pos);
  const lo = view.getUint32(pos + 4);
  if (hi >= SAFE_HI_LIMIT) {
    throw new LimitExceededError(`Refcount table entry at byte ${pos} points beyond 2^53`, { structure: 'refcount table', offset: pos });
  }
  return { blockOffset: hi * TWO_POW_32 + ((lo & ~REFTABLE_RESERVED_MASK_LO) >>> 0), reservedBits: (lo & REFTABLE_RESERVED_MASK_LO) !== 0 };
}

/** Writes a refcount-table entry pointing at the refcount block at `blockOffset`. */
export function encodeRefcountTableEntry(view: DataView, pos: number, blockOffset: number): void {
  setOffsetWords(view, pos, 0, 0, blockOffset);
}
