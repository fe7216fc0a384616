/**
 * Incremental ingestion: marks `sameAsBase` on blocks whose bytes equal the base image's at the
 * same guest offset, so an overlay whose backing file is the base leaves them unallocated.
 *
 * Against a base image the comparison is byte for byte. Against a manifest it compares
 * XXH64 fingerprints (see manifest.ts for the odds and the caveat about crafted input).
 */

import { expandZeroRuns, type Block } from '../src/block.js';
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

/**
 * Annotates `sameAsBase` by reading the base. Past the base's end the base reads as zeros
 * (qemu's rule for a shorter backing file).
 */
export function compareWithBase(
  blocks: AsyncIterable<Block>,
  base: BaseImage,
  clusterSize: number,
): {
  /** The blocks, annotated. */
  blocks: AsyncGenerator<Block>;
  /** Counts so far, updated as the blocks flow. */
  stats: BaseCompareStats;
} {
  return markUnchanged(blocks, async (block) => {
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

/** Annotates `sameAsBase` by comparing fingerprints with a manifest of the base. */
export function compareWithManifest(
  blocks: AsyncIterable<Block>,
  manifest: ManifestReader,
  hasher: Hasher,
  clusterBits: number,
): {
  /** The blocks, annotated. */
  blocks: AsyncGenerator<Block>;
  /** Counts so far, updated as the blocks flow. */
  stats: BaseCompareStats;
} {
  if (manifest.header.clusterBits !== clusterBits) {
    throw new InvalidArgumentError(
      `The manifest '${manifest.path}' was made with ${2 ** manifest.header.clusterBits}-byte clusters; this image uses ${2 ** clusterBits}`,
      { hint: `Convert with --cluster-size ${2 ** manifest.header.clusterBits}` },
    );
  }
  const zeroHashes = new Map<number, bigint>();
  const zeroHash = (length: number) => {
    let hash = zeroHashes.get(length);
    if (hash === undefined) zeroHashes.set(length, (hash = hasher.hash64(new Uint8Array(length))));
    return hash;
  };
  const clusterSize = 2 ** clusterBits;
  return markUnchanged(blocks, async (block) => {
    const expected = await manifest.fingerprintAt(block.index);
    if (expected === undefined) return block.zero ?? isAllZero(block.data);
    const length = Math.ceil(block.data.length / 512) * 512;
    // A cluster cut short by the end of either image only matches one of the same length.
    const baseLength = Math.min(clusterSize, manifest.header.virtualSize - block.index * clusterSize);
    if (baseLength !== length) return false;
    return (block.zero ? zeroHash(length) : guestFingerprint(block, hasher)) === expected;
  });
}

/**
 * Sets `sameAsBase` where `isSame` says so, and counts. Zero runs are expanded: each of their
 * clusters is compared on its own (the base may hold data anywhere under a hole of ours).
 */
function markUnchanged(
  blocks: AsyncIterable<Block>,
  isSame: (block: Block) => Promise<boolean>,
): { blocks: AsyncGenerator<Block>; stats: BaseCompareStats } {
  const stats: BaseCompareStats = { unchanged: 0, changed: 0 };
  async function* run(): AsyncGenerator<Block> {
    for await (const block of expandZeroRuns(blocks)) {
      if (await isSame(block)) {
        block.sameAsBase = true;
        stats.unchanged++;
      } else stats.changed++;
      yield block;
    }
  }
  return { blocks: run(), stats };
}
