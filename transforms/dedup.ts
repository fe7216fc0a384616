/**
 * Within-image deduplication.
 *
 * A fingerprint match is only a candidate: XXH64 over 2^27 distinct clusters (8 TiB at 64 KiB)
 * collides with probability ≈ 1 in 2,048, and guest data is untrusted, so every match is
 * confirmed by comparing bytes before a cluster is shared. A collision therefore costs one
 * extra read, never data.
 *
 * {@link Deduplicator} is the shared decision logic (lookup, confirm, insert, share-count
 * limit). The {@link dedupBlocks} stage uses it to annotate `duplicateOf` (an earlier guest
 * cluster) in any pipeline; the internal sink uses it with host clusters as values.
 */

import { Transform } from 'node:stream';
import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { map } from '@reactivex/ix-esnext-esm/asynciterable/operators';
import { isBatch, type Block, type BlockItem } from '../src/block.js';
import { FingerprintIndex, type FingerprintIndexOptions } from './fingerprint-index.js';
import type { Hasher } from './fingerprint.js';

/** What a deduplicator saw and decided. */
export interface DedupStats {
  /** Non-zero clusters looked at. */
  clusters: number;
  /** Clusters found equal to an earlier one (confirmed byte for byte). */
  duplicates: number;
  /** Fingerprint matches whose bytes differed (hash collisions). */
  collisions: number;
  /** Clusters not indexed because the index was full. */
  notIndexed: number;
  /** Matches not shared because the share count hit `maxShares` (a new copy was started). */
  shareLimitHits: number;
}

/** Options of a {@link Deduplicator}; the index options size its {@link FingerprintIndex}. */
export interface DeduplicatorOptions extends FingerprintIndexOptions {
  /** Fingerprints blocks (XXH64, from `createHasher()`). */
  hasher: Hasher;
  /**
   * Reads back the bytes stored under `value` to confirm a fingerprint match. They are compared
   * at once, so a reused scratch buffer is fine.
   */
  readBack: (value: number, length: number) => Promise<Uint8Array>;
  /** How many blocks may share one value (e.g. the refcount limit). Default unlimited. */
  maxShares?: number;
  /**
   * Whether the value may take one more share, besides `maxShares` (e.g. a compressed cluster
   * whose host cluster's refcount, summed over the clusters packed in it, is at the limit).
   * A value refused here is replaced by the next copy, as after a share-limit hit.
   */
  canShare?: (value: number) => boolean;
  /**
   * Called when a value stops being the dedup target for its content (a new copy replaced it
   * after the share limit), with the number of blocks that share it: its final count.
   */
  onRetire?: (value: number, count: number) => void;
}

/** What {@link Deduplicator.lookup} found: an earlier copy to share, or new content. */
export type DedupDecision =
  | {
      /** The block equals an earlier one (confirmed byte for byte). */
      kind: 'duplicate';
      /** The value the earlier copy was remembered under. */
      value: number;
    }
  | {
      /** New content (or not shareable): store the block and {@link Deduplicator.remember} it. */
      kind: 'unique';
    };

/**
 * The dedup decision shared by the internal sink and the dedup stage: fingerprint a block, look
 * it up, confirm a match byte for byte (`readBack`), and keep share counts under `maxShares`.
 */
export class Deduplicator {
  /** The fingerprint → value index. */
  readonly index: FingerprintIndex;
  /** What was seen and decided so far. */
  readonly stats: DedupStats = { clusters: 0, duplicates: 0, collisions: 0, notIndexed: 0, shareLimitHits: 0 };
  private readonly hasher: Hasher;
  private readonly readBack: DeduplicatorOptions['readBack'];
  private readonly maxShares: number;
  private readonly onRetire: ((value: number, count: number) => void) | undefined;
  private readonly canShare: ((value: number) => boolean) | undefined;

  constructor(options: DeduplicatorOptions) {
    this.index = new FingerprintIndex(options);
    this.hasher = options.hasher;
    this.readBack = options.readBack;
    this.maxShares = options.maxShares ?? 0xffffffff;
    this.onRetire = options.onRetire;
    this.canShare = options.canShare;
  }

  /**
   * Decides whether `block` (non-zero) duplicates stored content. On 'duplicate' the share
   * count of that value has been incremented. On 'unique' the caller must store the block and
   * then call {@link remember} with where it stored it.
   */
  async lookup(block: Block): Promise<DedupDecision> {
    this.stats.clusters++;
    const fingerprint = (block.fingerprint ??= this.hasher.hash64(block.data));
    const slot = this.index.find(fingerprint);
    if (slot < 0) return { kind: 'unique' };
    const value = this.index.valueAt(slot);
    const stored = await this.readBack(value, block.data.length);
    if (!sameBytes(stored, block.data)) {
      this.stats.collisions++;
      return { kind: 'unique' };
    }
    const count = this.index.countAt(slot);
    if (count >= this.maxShares || (this.canShare && !this.canShare(value))) {
      this.stats.shareLimitHits++;
      return { kind: 'unique' };
    }
    this.index.setAt(slot, value, count + 1);
    this.stats.duplicates++;
    return { kind: 'duplicate', value };
  }

  /**
   * Records that a unique block is now stored under `value`. When its fingerprint is already
   * indexed (a collision or a share-limit hit), the newer copy replaces the old one as the
   * target for later duplicates.
   */
  remember(block: Block, value: number): void {
    const fingerprint = (block.fingerprint ??= this.hasher.hash64(block.data));
    const slot = this.index.find(fingerprint);
    if (slot >= 0) {
      // Keep the older target after a collision (its content is as likely to recur); restart
      // the count after a share-limit hit so the new copy takes the next duplicates.
      const count = this.index.countAt(slot);
      if (count >= this.maxShares || (this.canShare && !this.canShare(this.index.valueAt(slot)))) {
        this.onRetire?.(this.index.valueAt(slot), count);
        this.index.setAt(slot, value, 1);
      }
      return;
    }
    if (!this.index.insert(fingerprint, value)) this.stats.notIndexed++;
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

/** Within one image a block's own index is where later duplicates find it. */
async function annotate(dedup: Deduplicator, block: Block): Promise<void> {
  if (block.zero) return;
  const decision = await dedup.lookup(block);
  if (decision.kind === 'duplicate') block.duplicateOf = decision.value;
  else dedup.remember(block, block.index);
}

/** Options of the dedup stage ({@link dedupBlocks}, {@link createDedupStream}). */
export interface DedupStageOptions extends FingerprintIndexOptions {
  /** Fingerprints blocks (XXH64, from `createHasher()`). */
  hasher: Hasher;
  /** Reads guest cluster `index` (e.g. from a seekable input) to confirm a match. */
  readCluster: (index: number, length: number) => Promise<Uint8Array>;
}

/** The annotated items, with the live `stats` (and `blocks`, the same iterable, for the older result shape). */
export type DedupStage<T> = AsyncIterableX<T> & {
  /** Counts so far, updated as the blocks flow. */
  readonly stats: DedupStats;
  /** The same items (the older `{ blocks, stats }` result shape). */
  readonly blocks: AsyncIterableX<T>;
};

/**
 * Annotates `duplicateOf` on every non-zero block whose bytes equal an earlier block's, and
 * `fingerprint` on every non-zero block, over Blocks or batches. The result is the annotated
 * items, with the live stats on it: `const out = dedupBlocks(items, options); … out.stats`.
 */
export function dedupBlocks<T extends BlockItem>(items: AsyncIterable<T> | Iterable<T>, options: DedupStageOptions): DedupStage<T> {
  const dedup = new Deduplicator({ ...options, readBack: options.readCluster });
  const out = from(items).pipe(
    map(async (item: T) => {
      if (!isBatch(item)) await annotate(dedup, item as Block);
      else for (const block of item.blocks) await annotate(dedup, block);
      return item;
    }),
  );
  return Object.assign(out, { stats: dedup.stats, blocks: out });
}

/** {@link dedupBlocks} as a Node stream of Blocks; `stats` is on the returned stream. */
export function createDedupStream(options: DedupStageOptions): Transform & {
  /** Counts so far, updated as the blocks flow. */
  stats: DedupStats;
} {
  const dedup = new Deduplicator({ ...options, readBack: options.readCluster });
  const stream = new Transform({
    objectMode: true,
    highWaterMark: 32,
    transform(item: BlockItem, _encoding, done) {
      const work = isBatch(item) ? (async () => { for (const block of item.blocks) await annotate(dedup, block); })() : annotate(dedup, item);
      work.then(() => done(null, item), (err: unknown) => done(err as Error));
    },
  });
  return Object.assign(stream, { stats: dedup.stats });
}
