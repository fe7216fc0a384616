/**
 * Bytes → Blocks: cuts a byte stream into guest clusters. The Blocks do not depend on how the
 * input was chunked. A cluster lying wholly inside one chunk is yielded as a view of that chunk
 * (zero-copy); a cluster spanning chunks is assembled in a fresh buffer. A buffer is never
 * written again once a yielded Block views it, so downstream stages may hold Blocks as long as
 * they like.
 */

import { Duplex } from 'node:stream';
import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { flattenBatches, type Block, type BlockBatch } from '../block.js';
import { InputSizeError, InvalidArgumentError } from '../errors.js';
import { DEFAULT_CLUSTER_BITS } from '../format/index.js';

export interface ClusterizeOptions {
  /** Bytes per cluster (a power of two, 512..2 MiB). Default 65536. */
  clusterSize?: number;
  /**
   * The number of bytes the input must hold. More or fewer raise InputSizeError (more: as soon
   * as the excess arrives, before any Block beyond the size is yielded).
   */
  size?: number;
}

function checkOptions(options: ClusterizeOptions): { clusterSize: number; size: number | undefined } {
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  const { size } = options;
  if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) throw new InvalidArgumentError(`Invalid input size ${size}`);
  return { clusterSize, size };
}

/** The error for an input whose length is not the declared size. */
export function inputSizeMismatch(expected: number, actual: number, atLeast = false): InputSizeError {
  const got = atLeast ? `more than ${expected}` : `${actual}`;
  return new InputSizeError(`The input holds ${got} bytes, but its size was given as ${expected}`, expected, actual, {
    hint: 'Give the exact input size (--size, or `size` in the API), or leave it out to accept any length',
  });
}

/**
 * A regular file that got shorter while it was read: an error, never zeros in place of the lost
 * part (the file's size when it was opened is what the image was sized for).
 */
export function inputShrank(expected: number, actual: number, name = 'the input'): InputSizeError {
  return new InputSizeError(`The input file ${name === 'the input' ? '' : `'${name}' `}shrank while it was read: it held ${expected} bytes when opened, ${actual} now`, expected, actual, {
    hint: 'Convert a file nothing else is writing to (a snapshot or a copy)',
  });
}

function asBytes(chunk: unknown): Uint8Array {
  if (chunk instanceof Uint8Array) return chunk;
  throw new InvalidArgumentError(`clusterize expects byte chunks (Uint8Array/Buffer), got ${typeof chunk === 'string' ? 'a string' : typeof chunk}`);
}

/**
 * Cuts `source` into Blocks of `clusterSize` bytes (the last may be shorter), numbered from 0.
 * An empty input yields nothing.
 */
export function clusterize(source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, options: ClusterizeOptions = {}): AsyncIterableX<Block> {
  return from(flattenBatches(clusterizeBatches(source, options)));
}

/**
 * {@link clusterize} a chunk at a time: one {@link BlockBatch} per input chunk (the clusters
 * it completes), then a last batch with the short tail, if any, and `inputEnd`.
 */
export function clusterizeBatches(source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, options: ClusterizeOptions = {}): AsyncIterableX<BlockBatch> {
  return from(cutBatches(source, options));
}

async function* cutBatches(source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, options: ClusterizeOptions): AsyncGenerator<BlockBatch> {
  const { clusterSize, size } = checkOptions(options);
  let index = 0;
  let total = 0;
  // A cluster being assembled from several chunks: a fresh buffer each time, because the last
  // one was handed out inside a Block.
  let assembly: Buffer | undefined;
  let filled = 0;

  for await (const raw of source) {
    let chunk = asBytes(raw);
    if (chunk.length === 0) continue;
    if (size !== undefined && total + chunk.length > size) {
      // Process the bytes up to the declared size, then fail: nothing beyond it is yielded.
      const excess = total + chunk.length - size;
      chunk = chunk.subarray(0, chunk.length - excess);
      const blocks = cut(chunk);
      if (blocks.length > 0) yield { clusterSize, blocks };
      throw inputSizeMismatch(size, size + excess, true);
    }
    total += chunk.length;
    const blocks = cut(chunk);
    if (blocks.length > 0) yield { clusterSize, blocks };
  }
  if (size !== undefined && total !== size) throw inputSizeMismatch(size, total);
  const tail: Block[] = filled > 0 && assembly ? [{ index: index++, data: assembly.subarray(0, filled) }] : [];
  yield { clusterSize, blocks: tail, inputEnd: total };

  function cut(chunk: Uint8Array): Block[] {
    const out: Block[] = [];
    let pos = 0;
    if (filled > 0 && assembly) {
      const n = Math.min(clusterSize - filled, chunk.length);
      assembly.set(chunk.subarray(0, n), filled);
      filled += n;
      pos = n;
      if (filled < clusterSize) return out;
      const data = assembly;
      assembly = undefined;
      filled = 0;
      out.push({ index: index++, data });
    }
    for (; chunk.length - pos >= clusterSize; pos += clusterSize) {
      out.push({ index: index++, data: chunk.subarray(pos, pos + clusterSize) });
    }
    if (pos < chunk.length) {
      assembly = Buffer.allocUnsafeSlow(clusterSize);
      assembly.set(chunk.subarray(pos), 0);
      filled = chunk.length - pos;
    }
    return out;
  }
}

/** A Duplex from bytes to Blocks that tells the cluster size it cuts, so later stages can use the same. */
export interface ClusterizeStream extends Duplex {
  /** Bytes per Block (the last may be shorter): pass it on as the sink's `clusterSize`. */
  readonly clusterSize: number;
}

/**
 * {@link clusterize} as a Duplex for `pipeline(...)`: bytes in (a byte stream such as
 * `fs.createReadStream`), Blocks out (object mode). Its `clusterSize` is what the sink needs:
 * `createExternalSink({ clusterSize: clusterizer.clusterSize, … })`.
 */
export function createClusterizeStream(options: ClusterizeOptions = {}): ClusterizeStream {
  const { clusterSize } = checkOptions(options);
  const stream = Duplex.from(async function* (source: AsyncIterable<Uint8Array>) {
    yield* clusterize(source, options);
  });
  return Object.assign(stream, { clusterSize });
}
