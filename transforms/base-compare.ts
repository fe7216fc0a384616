/**
 * Incremental ingestion: marks `sameAsBase` on blocks whose bytes equal the base image's at the
 * same guest offset, so an overlay whose backing file is the base leaves them unallocated.
 *
 * Against a base image the comparison is byte for byte. Against a manifest it compares
 * XXH64 fingerprints (see manifest.ts for the odds and the caveat about crafted input).
 */

import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { clusterSizeFor, isBatch, type Block, type BlockBatch, type BlockItem } from '../src/block.js';
import { InvalidArgumentError } from '../src/errors.js';
import { isAllZero } from '../src/io/buffers.js';
import type { Hasher } from './fingerprint.js';
import { guestFingerprint, type ManifestReader } from './manifest.js';

/** Random access to the base's guest bytes (a reader's image object fits). */
export interface BaseImage {
  /** The base's virtual size in bytes; beyond it the base reads as zeros. */
  readonly virtualSize: number;
  /** Reads `length` guest bytes at `offset` (within the virtual size). */
  read(offset: number, length: number): Promise<Uint8Array>;
}

/** What a base comparison found. */
export interface BaseCompareStats {
  /** Blocks equal to the base at the same offset. */
  unchanged: number;
  /** Blocks that differ (new or changed data, or zeros over base data). */
  changed: number;
}

/** Options of {@link compareWithBase}. */
export interface CompareWithBaseOptions {
  /** The base image (a reader's DiskImage fits). */
  base: BaseImage;
  /** Bytes per cluster, only for a source of single Blocks (batches carry it). */
  clusterSize?: number;
}

/** Options of {@link compareWithManifest}. */
export interface CompareWithManifestOptions {
  /** The base's manifest (transforms/manifest.ts). */
  manifest: ManifestReader;
  /** The hasher the manifest was made with (`createHasher()`). */
  hasher: Hasher;
  /** Bytes per cluster, only for a source of single Blocks (batches carry it). */
  clusterSize?: number;
}

/**
 * The annotated items, which also carry the live `stats` (and, for code written against the
 * older `{ blocks, stats }` result, `blocks`: the same iterable).
 */
export type BaseCompareStage<T> = AsyncIterableX<T> & {
  /** Counts so far, updated as the blocks flow. */
  readonly stats: BaseCompareStats;
  /** The same items (the older result shape). */
  readonly blocks: AsyncIterableX<T>;
};

/**
 * Annotates `sameAsBase` by reading the base: `compareWithBase(items, { base })`. Past the
 * base's end the base reads as zeros (qemu's rule for a shorter backing file).
 */
export function compareWithBase<T extends BlockItem>(items: AsyncIterable<T> | Iterable<T>, options: CompareWithBaseOptions): BaseCompareStage<T> {
  const { base } = options;
  return markUnchanged('compareWithBase', items, options.clusterSize, async (block, clusterSize) => {
    const offset = block.index * clusterSize;
    const inBase = Math.max(0, Math.min(block.data.length, base.virtualSize - offset));
    if (inBase === 0) return block.zero ?? isAllZero(block.data);
    const baseBytes = await base.read(offset, inBase);
    return (
      Buffer.from(baseBytes.buffer, baseBytes.byteOffset, inBase).equals(Buffer.from(block.data.buffer, block.data.byteOffset, inBase)) &&
      isAllZero(block.data.subarray(inBase))
    );
  });
}

/**
 * Annotates `sameAsBase` by comparing fingerprints with a manifest of the base:
 * `compareWithManifest(items, { manifest, hasher })`.
 */
export function compareWithManifest<T extends BlockItem>(items: AsyncIterable<T> | Iterable<T>, options: CompareWithManifestOptions): BaseCompareStage<T> {
  const { manifest, hasher } = options;
  const checkClusterSize = (clusterSize: number) => {
    if (2 ** manifest.header.clusterBits !== clusterSize) {
      throw new InvalidArgumentError(
        `The manifest '${manifest.path}' was made with ${2 ** manifest.header.clusterBits}-byte clusters; this image uses ${clusterSize}`,
        { hint: `Convert with --cluster-size ${2 ** manifest.header.clusterBits} (API: clusterSize: ${2 ** manifest.header.clusterBits})` },
      );
    }
  };
  // Refused at once when the cluster size is known up front.
  if (options.clusterSize !== undefined) checkClusterSize(options.clusterSize);
  let checked = options.clusterSize;
  const zeroHashes = new Map<number, bigint>();
  const zeroHash = (length: number) => {
    let hash = zeroHashes.get(length);
    if (hash === undefined) zeroHashes.set(length, (hash = hasher.hash64(new Uint8Array(length))));
    return hash;
  };
  return markUnchanged('compareWithManifest', items, options.clusterSize, async (block, clusterSize) => {
    if (checked !== clusterSize) {
      checkClusterSize(clusterSize);
      checked = clusterSize;
    }
    const expected = await manifest.fingerprintAt(block.index);
    if (expected === undefined) return block.zero ?? isAllZero(block.data);
    const length = Math.ceil(block.data.length / 512) * 512;
    // A cluster cut short by the end of either image only matches one of the same length.
    const baseLength = Math.min(clusterSize, manifest.header.virtualSize - block.index * clusterSize);
    if (baseLength !== length) return false;
    return (block.zero ? zeroHash(length) : guestFingerprint(block, hasher)) === expected;
  });
}

/** A base comparison one batch at a time: what a per-item stage (a stream-chain function) calls. */
export interface BaseComparer {
  /** Annotates the batch's Blocks (zero runs expanded to single Blocks) and gives it back. */
  compareBatch(batch: BlockBatch): Promise<BlockBatch>;
  /** Counts so far. */
  readonly stats: BaseCompareStats;
}

/** {@link compareWithBase} one batch at a time. */
export function createBaseComparer(options: CompareWithBaseOptions): BaseComparer {
  return (compareWithBase([], options) as unknown as { comparer: BaseComparer }).comparer;
}

/** {@link compareWithManifest} one batch at a time. */
export function createManifestComparer(options: CompareWithManifestOptions): BaseComparer {
  return (compareWithManifest([], options) as unknown as { comparer: BaseComparer }).comparer;
}

/**
 * Sets `sameAsBase` where `isSame` says so, and counts. Zero runs are expanded: each of their
 * clusters is compared on its own (the base may hold data anywhere under a hole of ours).
 */
function markUnchanged<T extends BlockItem>(
  stage: string,
  items: AsyncIterable<T> | Iterable<T>,
  clusterSizeOption: number | undefined,
  isSame: (block: Block, clusterSize: number) => Promise<boolean>,
): BaseCompareStage<T> & { comparer: BaseComparer } {
  const stats: BaseCompareStats = { unchanged: 0, changed: 0 };
  const mark = async (block: Block, clusterSize: number) => {
    if (await isSame(block, clusterSize)) {
      block.sameAsBase = true;
      stats.unchanged++;
    } else stats.changed++;
  };
  const compareBatch = async (batch: BlockBatch): Promise<BlockBatch> => {
    const clusterSize = clusterSizeFor(stage, batch.clusterSize, clusterSizeOption);
    const blocks: Block[] = [];
    for (const run of batch.blocks) {
      for (const block of expandRun(run)) {
        await mark(block, clusterSize);
        blocks.push(block);
      }
    }
    batch.blocks = blocks;
    return batch;
  };
  async function* run(): AsyncGenerator<T> {
    for await (const item of items) {
      if (isBatch(item)) {
        yield (await compareBatch(item)) as T;
        continue;
      }
      const clusterSize = clusterSizeFor(stage, undefined, clusterSizeOption);
      for (const block of expandRun(item as Block)) {
        await mark(block, clusterSize);
        yield block as T;
      }
    }
  }
  const out = from(run());
  return Object.assign(out, { stats, blocks: out, comparer: { compareBatch, stats } });
}

/** A zero run as single zero Blocks; any other Block as itself. */
function* expandRun(block: Block): Generator<Block> {
  if (block.count === undefined) {
    yield block;
    return;
  }
  for (let i = 0; i < block.count; i++) yield { index: block.index + i, data: block.data, zero: true };
}
