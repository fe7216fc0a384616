import { zeroBuffer } from './io/buffers.js';

/**
 * The one record that flows between pipeline stages: a guest cluster and what the transforms
 * learned about it. Transforms annotate blocks; they never re-slice them.
 */
export interface Block {
  /** Guest cluster index: the block covers guest bytes [index·clusterSize, +data.length). */
  readonly index: number;
  /**
   * The cluster's bytes. Exactly clusterSize long, except the last cluster of an image, which
   * may be shorter. Often a view into a larger read buffer: do not keep it past the sink.
   */
  readonly data: Uint8Array;
  /** Set by zero-detect: every byte is zero. */
  zero?: boolean;
  /** Set by dedup: a fingerprint of `data` (xxhash64). */
  fingerprint?: bigint;
  /** Set by dedup: an earlier guest cluster of this image holds the same bytes. */
  duplicateOf?: number;
  /** Set by dedup against a base image: the base holds the same bytes at the same offset. */
  sameAsBase?: boolean;
  /**
   * Set by compressBlocks: the cluster compressed (raw deflate or one zstd frame, of the
   * cluster zero-padded to full size), when that is smaller than a cluster. A view into a
   * buffer the compressor reuses once the Blocks after this one's batch are asked for: a sink
   * copies it (or writes it) before it asks for the next Block.
   */
  compressed?: Uint8Array;
  /**
   * A run of zero clusters: when set (≥ 1) the Block stands for `count` consecutive whole
   * clusters [index, index + count), all zero — typically a hole the source never read. `zero`
   * is true and `data` is one shared all-zero cluster standing for each of them. Only sources
   * asked for runs produce them (BlockSourceOptions.zeroRuns); our stages handle a run in O(1)
   * (or O(L2 tables)), or expand it with {@link expandZeroRuns}. A stage that ignores `count`
   * sees one zero cluster and then a gap in the indexes, which the sinks also read as zeros.
   */
  readonly count?: number;
}

/** One past the last guest byte a Block covers. */
export function blockEnd(block: Block, clusterSize: number): number {
  return (block.index + (block.count ?? 1) - 1) * clusterSize + block.data.length;
}

/** A Block standing for `count` zero clusters from `index` (see {@link Block.count}). */
export function zeroRun(index: number, count: number, clusterSize: number): Block {
  return { index, count, data: zeroBuffer(clusterSize), zero: true };
}

/** The same Blocks, one cluster each: every zero run becomes `count` single zero Blocks. */
export async function* expandZeroRuns(blocks: AsyncIterable<Block> | Iterable<Block>): AsyncGenerator<Block> {
  for await (const block of blocks) {
    if (block.count === undefined) {
      yield block;
      continue;
    }
    for (let i = 0; i < block.count; i++) yield { index: block.index + i, data: block.data, zero: true };
  }
}

/** Stream options shared by every Block stage (object mode; a bounded queue of blocks). */
export const BLOCK_STREAM_HIGH_WATER_MARK = 32;
