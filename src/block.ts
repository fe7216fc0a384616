import { zeroBuffer } from './io/buffers.js';
import { InvalidArgumentError } from './errors.js';

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

/**
 * Blocks moving together: one batch per large read (2 MiB: 32 clusters of 64 KiB), so a stage
 * pays its framework cost (a stream hop, an async-iterator step) once per batch and runs a plain
 * loop over the Blocks. Every stage of ours takes batches and single Blocks alike.
 *
 * The batch carries what every stage would otherwise have to be told: the cluster size (the
 * sinks learn it here, so it is given once, at the source) and, on the source's last batch,
 * where the input ended (so a stage that drops trailing zero Blocks cannot shrink the image:
 * the sinks take the image's length from `inputEnd`, and refuse a stream of batches that ends
 * without it).
 */
export interface BlockBatch {
  /** Bytes per cluster of every Block in the batch (the image's last Block may be shorter). */
  readonly clusterSize: number;
  /**
   * The Blocks, in increasing index order. A stage may annotate them, drop some (a missing
   * index is a zero cluster to the sinks) or replace the array; it must not re-slice them.
   */
  blocks: Block[];
  /**
   * Set on the source's last batch only: the input's length in bytes. The sinks end the image
   * here whatever Blocks reached them. Keep it when replacing a last batch.
   */
  readonly inputEnd?: number;
}

/** What flows between stages: batches (our sources) or single Blocks (any other source). */
export type BlockItem = Block | BlockBatch;

/** Whether a pipeline item is a batch rather than a single Block. */
export function isBatch(item: BlockItem): item is BlockBatch {
  return (item as BlockBatch).blocks !== undefined;
}

/** The Blocks of a stream of batches (or Blocks), one at a time. */
export async function* flattenBatches(items: AsyncIterable<BlockItem> | Iterable<BlockItem>): AsyncGenerator<Block> {
  for await (const item of items) {
    if (isBatch(item)) yield* item.blocks;
    else yield item;
  }
}

/** Blocks per batch made by {@link toBatches} from single Blocks that share no read buffer. */
export const MAX_BATCH_BLOCKS = 64;

/** Options of {@link toBatches}. */
export interface ToBatchesOptions {
  /** Bytes per cluster of the Blocks. */
  clusterSize: number;
  /** The input's length when known: the last batch's `inputEnd` (otherwise: the last Block's end). */
  size?: number;
}

/**
 * Single Blocks (a source of someone else's, an NBD or object-store reader) → batches: Blocks
 * cut from the same read buffer go together, up to {@link MAX_BATCH_BLOCKS}; the last batch
 * carries `inputEnd`. A source of batches passes through unchanged. An empty input yields
 * one empty last batch, so the sinks still learn where the input ended.
 */
export async function* toBatches(items: AsyncIterable<BlockItem> | Iterable<BlockItem>, options: ToBatchesOptions): AsyncGenerator<BlockBatch> {
  const { clusterSize } = options;
  let pending: Block[] = [];
  let end = 0;
  let sawEnd = false;
  for await (const item of items) {
    if (isBatch(item)) {
      if (pending.length > 0) yield { clusterSize, blocks: pending };
      pending = [];
      if (item.inputEnd !== undefined) sawEnd = true;
      const last = item.blocks[item.blocks.length - 1];
      if (last) end = blockEnd(last, item.clusterSize);
      yield item;
      continue;
    }
    const previous = pending[pending.length - 1];
    if (previous && (pending.length >= MAX_BATCH_BLOCKS || previous.data.buffer !== item.data.buffer || item.count !== undefined || previous.count !== undefined)) {
      yield { clusterSize, blocks: pending };
      pending = [];
    }
    pending.push(item);
    end = blockEnd(item, clusterSize);
  }
  if (sawEnd && pending.length === 0) return;
  yield { clusterSize, blocks: pending, inputEnd: options.size ?? end };
}

/**
 * A per-Block function made into a per-item one: applied to a Block, or to each Block of a
 * batch (in a plain loop, so a user's function keeps the batched fast path). The item is passed
 * on. The function may return a promise, which is awaited before the next Block.
 */
export function perBlock<T extends BlockItem>(fn: (block: Block, clusterSize: number | undefined) => void | Promise<void>): (item: T) => T | Promise<T> {
  return (item: T) => {
    if (!isBatch(item)) {
      const done = fn(item as Block, undefined);
      return done ? done.then(() => item) : item;
    }
    const { blocks, clusterSize } = item;
    for (let i = 0; i < blocks.length; i++) {
      const done = fn(blocks[i]!, clusterSize);
      if (done) {
        // The rest asynchronously, in order.
        return (async () => {
          await done;
          for (let j = i + 1; j < blocks.length; j++) await fn(blocks[j]!, clusterSize);
          return item;
        })();
      }
    }
    return item;
  };
}

/** The cluster size a stage needs for a Block: its batch's, else the stage's option, else a clear error. */
export function clusterSizeFor(stage: string, fromBatch: number | undefined, fromOptions: number | undefined): number {
  const clusterSize = fromBatch ?? fromOptions;
  if (clusterSize === undefined) {
    throw new InvalidArgumentError(`${stage} got a single Block and no cluster size: give it the source's BlockBatches (they carry it) or pass { clusterSize }`);
  }
  if (fromBatch !== undefined && fromOptions !== undefined && fromBatch !== fromOptions) {
    throw new InvalidArgumentError(`${stage} was given clusterSize ${fromOptions}, but the Blocks reaching it are ${fromBatch}-byte clusters`, {
      hint: 'Leave clusterSize out: the stages and sinks learn it from the batches',
    });
  }
  return clusterSize;
}
