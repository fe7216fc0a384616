/**
 * Geometry (how guest offsets map onto L1/L2 tables) and the metadata layout a writer emits:
 *
 *   cluster 0            header + extensions
 *   [1, 1+RT)            refcount table
 *   [1+RT, 1+RT+RB)      refcount blocks
 *   next L1C clusters    L1 table
 *   next NL2 clusters    L2 tables, in L1-index order
 *
 * Refcount structures count themselves, so RT and RB are a fixed point (spec: "Host cluster
 * management"; qemu's qcow2_refcount_metadata_size). Every cluster of the file has refcount 1.
 */

import { MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS } from './constants.js';
import { divCeil, viewOf } from './bytes.js';
import { encodeL1Entry, encodeRefcountTableEntry, l2EntrySize, L1_ENTRY_SIZE } from './tables.js';
import { fillRefcountOnes, refcountsPerBlock } from './refcount.js';
import { InvalidArgumentError, LimitExceededError } from '../errors.js';

/** How a virtual size maps onto clusters and L1/L2 tables at one cluster size. */
export interface Geometry {
  /** log2 of the cluster size. */
  clusterBits: number;
  /** Bytes per cluster. */
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  /** Guest clusters: ceil(size / clusterSize); the last may be partial. */
  clusters: number;
  /** Extended L2 entries (subclusters). */
  extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntrySize: number;
  /** Entries per L2 table. */
  l2Entries: number;
  /** L1 entries the size needs (qemu's size_to_l1). */
  l1Size: number;
  /** Guest bytes covered by one L2 table. */
  bytesPerL2: number;
}

/** The geometry of an image of `size` bytes with 2^`clusterBits`-byte clusters. */
export function imageGeometry(size: number, clusterBits: number, extendedL2 = false): Geometry {
  const clusterSize = 2 ** clusterBits;
  const entrySize = l2EntrySize(extendedL2);
  const l2Entries = clusterSize / entrySize;
  const bytesPerL2 = clusterSize * l2Entries;
  return {
    clusterBits,
    clusterSize,
    size,
    clusters: divCeil(size, clusterSize),
    extendedL2,
    l2EntrySize: entrySize,
    l2Entries,
    l1Size: divCeil(size, bytesPerL2),
    bytesPerL2,
  };
}

/** The largest virtual size the 32 MiB L1 limit allows at a cluster size. */
export function maxVirtualSize(clusterBits: number, extendedL2 = false): number {
  const clusterSize = 2 ** clusterBits;
  return Math.min(MAX_L1_ENTRIES * (clusterSize / l2EntrySize(extendedL2)) * clusterSize, Number.MAX_SAFE_INTEGER - 511);
}

/** qemu rounds a virtual size up to whole 512-byte sectors (digest pitfall P6). */
export function roundUpToSector(size: number): number {
  return Math.ceil(size / 512) * 512;
}

/** Throws InvalidArgumentError for a size the cluster size cannot address; names one that can. */
export function checkVirtualSize(size: number, clusterBits: number, extendedL2 = false): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new InvalidArgumentError(`Invalid virtual size ${size}`);
  }
  const limit = maxVirtualSize(clusterBits, extendedL2);
  if (size > limit) {
    let fit: number | undefined;
    for (let bits = clusterBits + 1; bits <= MAX_CLUSTER_BITS && fit === undefined; bits++) {
      if (size <= maxVirtualSize(bits, extendedL2)) fit = bits;
    }
    throw new InvalidArgumentError(
      `A virtual size of ${size} bytes is too large for ${2 ** clusterBits}-byte clusters (at most ${limit} bytes)`,
      { hint: fit === undefined ? 'No cluster size can address this size' : `Use --cluster-size ${2 ** fit} (API: clusterSize: ${2 ** fit}) or larger` },
    );
  }
}

/** Throws InvalidArgumentError unless `clusterBits` is an integer from 9 (512 B) to 21 (2 MiB). */
export function checkClusterBits(clusterBits: number): void {
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new InvalidArgumentError(`The cluster size must be a power of two from 512 bytes to 2 MiB`);
  }
}

/** How many clusters the refcount structures take, themselves included. */
export interface RefcountLayout {
  /** Clusters of the refcount table. */
  tableClusters: number;
  /** Refcount blocks. */
  blockClusters: number;
  /** All clusters of the file: the other ones plus table plus blocks. */
  totalClusters: number;
}

/**
 * Solves for the refcount table and block counts that cover `otherClusters` clusters plus
 * themselves. Converges in a few rounds: each block covers many clusters.
 */
export function solveRefcountLayout(otherClusters: number, clusterBits: number, refcountOrder: number): RefcountLayout {
  const perBlock = refcountsPerBlock(clusterBits, refcountOrder);
  const perTableCluster = 2 ** clusterBits / 8;
  let table = 0;
  let blocks = 0;
  for (;;) {
    const nextBlocks = divCeil(otherClusters + table + blocks, perBlock);
    const nextTable = divCeil(nextBlocks, perTableCluster);
    if (nextBlocks === blocks && nextTable === table) break;
    blocks = nextBlocks;
    table = nextTable;
  }
  if (table * 2 ** clusterBits > MAX_REFTABLE_BYTES) {
    throw new LimitExceededError(
      `The refcount table would need ${table} clusters, above qemu's 8 MiB limit; use larger clusters or wider refcounts`,
      { structure: 'refcount table', limit: MAX_REFTABLE_BYTES, actual: table * 2 ** clusterBits },
    );
  }
  return { tableClusters: table, blockClusters: blocks, totalClusters: otherClusters + table + blocks };
}

/** Where every metadata structure of a written image lives. Offsets are bytes in the metadata file. */
export interface MetadataPlan {
  /** The image's geometry. */
  geometry: Geometry;
  /** log2 of the refcount width in bits. */
  refcountOrder: number;
  /** Offset of the refcount table (cluster 1). */
  refcountTableOffset: number;
  /** Clusters of the refcount table. */
  refcountTableClusters: number;
  /** Offset of the first refcount block; the blocks are contiguous. */
  refcountBlocksOffset: number;
  /** Refcount blocks. */
  refcountBlockClusters: number;
  /** Offset of the L1 table. */
  l1Offset: number;
  /** Clusters of the L1 table. */
  l1Clusters: number;
  /** Offset of the first L2 table; table k (k-th present one) is at l2Offset + k·cs. */
  l2Offset: number;
  /** L2 tables written. */
  l2Tables: number;
  /** Metadata clusters before any data cluster an internal image appends. */
  metadataClusters: number;
  /** Clusters whose refcount is 1 (every cluster of a data-file image's metadata file). */
  totalClusters: number;
}

/** What {@link planMetadata} lays out. */
export interface PlanOptions {
  /** The image's geometry. */
  geometry: Geometry;
  /** log2 of the refcount width in bits. */
  refcountOrder: number;
  /** How many L2 tables will be written (all l1Size of them, or only the non-empty ones). */
  l2Tables: number;
  /**
   * Extra clusters after the L2 tables that also need refcounts (data clusters of an image
   * without a data file). Default 0.
   */
  extraClusters?: number;
}

/**
 * Lays out the metadata of a written image (see the module comment): header, refcount table and
 * blocks (sized to cover themselves), L1, then the L2 tables.
 */
export function planMetadata(options: PlanOptions): MetadataPlan {
  const { geometry, refcountOrder, l2Tables } = options;
  const cs = geometry.clusterSize;
  const l1Clusters = divCeil(geometry.l1Size * L1_ENTRY_SIZE, cs);
  const other = 1 + l1Clusters + l2Tables + (options.extraClusters ?? 0);
  const refs = solveRefcountLayout(other, geometry.clusterBits, refcountOrder);
  const refcountTableOffset = cs;
  const refcountBlocksOffset = refcountTableOffset + refs.tableClusters * cs;
  const l1Offset = refcountBlocksOffset + refs.blockClusters * cs;
  const l2Offset = l1Offset + l1Clusters * cs;
  return {
    geometry,
    refcountOrder,
    refcountTableOffset,
    refcountTableClusters: refs.tableClusters,
    refcountBlocksOffset,
    refcountBlockClusters: refs.blockClusters,
    l1Offset,
    l1Clusters,
    l2Offset,
    l2Tables,
    metadataClusters: l2Offset / cs + l2Tables,
    totalClusters: refs.totalClusters,
  };
}

/** The refcount table: one entry per refcount block, the rest zero. */
export function buildRefcountTable(plan: MetadataPlan): Uint8Array {
  const cs = plan.geometry.clusterSize;
  const out = new Uint8Array(plan.refcountTableClusters * cs);
  const view = viewOf(out);
  for (let i = 0; i < plan.refcountBlockClusters; i++) {
    encodeRefcountTableEntry(view, i * 8, plan.refcountBlocksOffset + i * cs);
  }
  return out;
}

/**
 * Refcount block `index`: 1 for every cluster in [0, totalClusters) it covers, 0 after. */
export function buildRefcountBlock(plan: MetadataPlan, index: number): Uint8Array {
  const cs = plan.geometry.clusterSize;
  const perBlock = refcountsPerBlock(plan.geometry.clusterBits, plan.refcountOrder);
  const out = new Uint8Array(cs);
  const first = index * perBlock;
  const end = Math.min(plan.totalClusters, first + perBlock);
  if (end > first) fillRefcountOnes(out, 0, end - first, plan.refcountOrder);
  return out;
}

/**
 * The L1 table (L1C whole clusters). `hasTable(i)` says whether L1 entry i has an L2 table; the
 * tables are numbered in L1 order, so the k-th present one sits at l2Offset + k·cs.
 */
export function buildL1Table(plan: MetadataPlan, hasTable: (l1Index: number) => boolean = () => true): Uint8Array {
  const cs = plan.geometry.clusterSize;
  const out = new Uint8Array(plan.l1Clusters * cs);
  const view = viewOf(out);
  let k = 0;
  for (let i = 0; i < plan.geometry.l1Size; i++) {
    if (!hasTable(i)) continue;
    if (k >= plan.l2Tables) throw new RangeError('buildL1Table: more tables present than the plan holds');
    encodeL1Entry(view, i * L1_ENTRY_SIZE, plan.l2Offset + k * cs);
    k++;
  }
  return out;
}
