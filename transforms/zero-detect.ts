/**
 * Zero detection: marks each Block whose bytes are all zero (`block.zero`). Sinks leave such
 * clusters as holes (raw mode) or unallocated (sparse mode). The check runs at memcmp speed;
 * a zero run (Block.count, a hole the source never read) is zero by construction and not checked.
 */

import { Transform } from 'node:stream';
import { BLOCK_STREAM_HIGH_WATER_MARK, type Block } from '../src/block.js';
import { isAllZero } from '../src/io/buffers.js';

/** Sets `block.zero` on every Block and passes it on (the same object, annotated). */
export async function* zeroDetect(blocks: AsyncIterable<Block> | Iterable<Block>): AsyncGenerator<Block> {
  for await (const block of blocks) {
    block.zero = block.count !== undefined || isAllZero(block.data);
    yield block;
  }
}

/** {@link zeroDetect} as an object-mode Transform for `pipeline(...)`. */
export function createZeroDetectStream(): Transform {
  return new Transform({
    objectMode: true,
    highWaterMark: BLOCK_STREAM_HIGH_WATER_MARK,
    transform(block: Block, _encoding, callback) {
      block.zero = block.count !== undefined || isAllZero(block.data);
      callback(null, block);
    },
  });
}
