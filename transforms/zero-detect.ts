/**
 * Zero detection: marks each Block whose bytes are all zero (`block.zero`). Sinks leave such
 * clusters as holes (raw mode) or unallocated (sparse mode). The check runs at memcmp speed;
 * a zero run (Block.count, a hole the source never read) is zero by construction and not checked.
 *
 * Takes batches (one loop per batch, see BlockBatch) and single Blocks alike. The sinks run the
 * same check on any Block that reaches them without `zero` set, so a pipeline that leaves this
 * stage out still stores zero clusters as holes; placing it early lets the stages in between
 * (base compare, manifest, a user's own) see the flag.
 */

import { Transform } from 'node:stream';
import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { map } from '@reactivex/ix-esnext-esm/asynciterable/operators';
import { BLOCK_STREAM_HIGH_WATER_MARK, isBatch, type Block, type BlockItem } from '../src/block.js';
import { isAllZero } from '../src/io/buffers.js';

/** Sets `zero` on one Block: true for a zero run or all-zero bytes. */
export function markZero(block: Block): Block {
  block.zero = block.count !== undefined || isAllZero(block.data);
  return block;
}

/** Sets `zero` on a Block, or on every Block of a batch; returns the same item (for a chain of per-item functions). */
export function detectZeros<T extends BlockItem>(item: T): T {
  if (isBatch(item)) for (const block of item.blocks) markZero(block);
  else markZero(item as Block);
  return item;
}

/** Sets `block.zero` on every Block (of every batch) and passes the items on, the same objects, annotated. */
export function zeroDetect<T extends BlockItem>(items: AsyncIterable<T> | Iterable<T>): AsyncIterableX<T> {
  return from(items).pipe(map(detectZeros));
}

/** {@link zeroDetect} as an object-mode Transform for `pipeline(...)` (Blocks or batches). */
export function createZeroDetectStream(): Transform {
  return new Transform({
    objectMode: true,
    highWaterMark: BLOCK_STREAM_HIGH_WATER_MARK,
    transform(item: BlockItem, _encoding, callback) {
      callback(null, detectZeros(item));
    },
  });
}
