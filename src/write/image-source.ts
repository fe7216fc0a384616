/**
 * Blocks from an opened image (any format the readers open: qcow2 with its chain, VMDK, VHD…):
 * the one way a non-raw input feeds the pipeline. The image's extents decide what is read:
 * runs of whole clusters with no data in any layer become zero runs (Block.count) without a
 * read, and data is read in large pieces (up to READ_SIZE) through the image, cut into cluster
 * views, one read queued ahead of the consumer.
 */

import { zeroRun, type Block } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { allocIoBuffer } from '../io/buffers.js';
import { MIN_SKIPPED_HOLE } from '../io/extents.js';
import type { DiskImage } from '../read/image.js';
import { MAX_ZERO_RUN_BYTES, READ_SIZE, type BufferPool, type Segment } from './sources.js';

/** Options of {@link imageBlocks}. */
export interface ImageBlockOptions {
  /** Bytes per output cluster (a power of two from 512 to 2 MiB). */
  clusterSize: number;
  /** Recycle read buffers through this pool (every Block must then be released once). */
  pool?: BufferPool;
}

/**
 * The stretches of `image` in order, on cluster boundaries: reads of at most READ_SIZE where
 * any byte of a cluster is data, holes of whole clusters with none. A hole shorter than
 * MIN_SKIPPED_HOLE is read instead (a read of zeros costs less than splitting a large read),
 * and the short last cluster is always read.
 */
export async function* imageSegments(image: DiskImage, clusterSize: number): AsyncGenerator<Segment> {
  const size = image.virtualSize;
  const lastWhole = size - (size % clusterSize);
  const minHole = Math.max(clusterSize, MIN_SKIPPED_HOLE);
  /** Bytes before `decided` are planned; [readFrom, decided) is data still to yield as reads. */
  let decided = 0;
  let readFrom = 0;
  function* reads(): Generator<Segment> {
    for (; readFrom < decided; readFrom += READ_SIZE) yield { start: readFrom, length: Math.min(READ_SIZE, decided - readFrom), hole: false };
    readFrom = decided;
  }
  for await (const extent of image.extents()) {
    const end = extent.start + extent.length;
    if (extent.kind === 'data') {
      decided = Math.max(decided, Math.min(size, Math.ceil(end / clusterSize) * clusterSize));
      continue;
    }
    // Whole clusters up to the extent's end hold no data; a cluster it ends inside may still get
    // some from the next extent.
    const holeEnd = Math.min(lastWhole, Math.floor(end / clusterSize) * clusterSize);
    if (holeEnd - decided >= minHole) {
      yield* reads();
      yield { start: decided, length: holeEnd - decided, hole: true };
      decided = holeEnd;
      readFrom = holeEnd;
    } else if (holeEnd > decided) {
      decided = holeEnd;
    }
  }
  decided = size;
  yield* reads();
}

/** A planned stretch and, for a read, its buffer and the read in progress. */
interface Slot {
  segment: Segment;
  buffer: Uint8Array | undefined;
  /** The pooled buffer `buffer` is the start of (whole: the pool recycles it). */
  pooled: Buffer | undefined;
  done: Promise<void>;
}

/**
 * Reads `image` into Blocks of `clusterSize` bytes (the last may be short), numbered from 0;
 * clusters no layer holds data for come as zero runs. The caller keeps ownership of the image.
 */
export async function* imageBlocks(image: DiskImage, options: ImageBlockOptions): AsyncGenerator<Block> {
  const { clusterSize, pool } = options;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > READ_SIZE) {
    throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  if (pool && pool.bufferSize !== READ_SIZE) throw new InvalidArgumentError(`imageBlocks: the pool's buffers must hold ${READ_SIZE} bytes`);
  const segments = imageSegments(image, clusterSize);
  const start = (segment: Segment): Slot => {
    if (segment.hole) return { segment, buffer: undefined, pooled: undefined, done: Promise.resolve() };
    const pooled = pool?.acquire();
    const buffer = (pooled ?? allocIoBuffer(segment.length)).subarray(0, segment.length);
    const done = image.readInto(buffer, segment.start);
    // Awaited below in order; a failure surfaces there, not as an unhandled rejection.
    done.catch(() => {});
    return { segment, buffer, pooled, done };
  };
  const next = async (): Promise<Slot | undefined> => {
    const result = await segments.next();
    return result.done ? undefined : start(result.value);
  };
  let ahead: Slot | undefined;
  let current = await next();
  try {
    while (current) {
      // The next read runs while the consumer writes this one's blocks.
      ahead = await next();
      await current.done;
      const { segment, buffer } = current;
      let index = segment.start / clusterSize;
      if (!buffer) {
        const runEnd = index + segment.length / clusterSize;
        const maxRun = MAX_ZERO_RUN_BYTES / clusterSize;
        while (index < runEnd) {
          const count = Math.min(maxRun, runEnd - index);
          yield zeroRun(index, count, clusterSize);
          index += count;
        }
      } else {
        if (pool && current.pooled) pool.lease(current.pooled, Math.ceil(segment.length / clusterSize));
        for (let off = 0; off < segment.length; off += clusterSize) {
          yield { index: index++, data: buffer.subarray(off, Math.min(segment.length, off + clusterSize)) };
        }
      }
      current = ahead;
      ahead = undefined;
    }
  } finally {
    // The consumer may stop early: let the read in flight settle before the image is closed.
    await current?.done.catch(() => {});
    await ahead?.done.catch(() => {});
  }
}
