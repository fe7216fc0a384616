/**
 * Bytes → Blocks: cuts a byte stream into guest clusters. The Blocks do not depend on how the
 * input was chunked. A cluster lying wholly inside one chunk is yielded as a view of that chunk
 * (zero-copy); a cluster spanning chunks is assembled in a fresh buffer. A buffer is never
 * written again once a yielded Block views it, so downstream stages may hold Blocks as long as
 * they like.
 */

import { Transform, type Duplex } from 'node:stream';
import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { flattenBatches, type Block, type BlockBatch } from '../block.js';
import { InputSizeError, InvalidArgumentError, streamError } from '../errors.js';
import { DEFAULT_CLUSTER_BITS } from '../format/index.js';
import { describeValue } from '../internal/arguments.js';

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
    throw new InvalidArgumentError(`Invalid cluster size ${describeValue(clusterSize)}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  const { size } = options;
  if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) throw new InvalidArgumentError(`Invalid input size ${describeValue(size)}`);
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
  throw new InvalidArgumentError(`clusterize expects byte chunks (Uint8Array/Buffer), got ${describeValue(chunk)}`);
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
  const cutter = new ClusterCutter(options);
  try {
    for await (const raw of source) {
      const batch = cutter.push(raw);
      if (batch) yield batch;
    }
  } catch (err) {
    // The source's own error (an HTTP body cut off: 'aborted', ECONNRESET) comes out as ours.
    throw streamError(err, 'input');
  }
  yield cutter.end();
}

/**
 * The state of {@link clusterizeBatches}, one chunk at a time: what a per-item stage (a
 * stream-chain function) needs. `push` each chunk (a batch of the clusters it completes, or
 * undefined), then `end()` for the last batch (the short tail, `inputEnd`). A size mismatch
 * throws an InputSizeError (for excess bytes: after the clusters up to the size were cut).
 */
export class ClusterCutter {
  /** Bytes per cluster. */
  readonly clusterSize: number;
  private readonly size: number | undefined;
  private index = 0;
  private total = 0;
  // A cluster being assembled from several chunks: a fresh buffer each time, because the last
  // one was handed out inside a Block.
  private assembly: Buffer | undefined;
  private filled = 0;
  /** Clusters cut from an excess chunk, handed out before its error. */
  private pendingError: Error | undefined;

  constructor(options: ClusterizeOptions = {}) {
    const { clusterSize, size } = checkOptions(options);
    this.clusterSize = clusterSize;
    this.size = size;
  }

  /** Cuts the next chunk; the batch of the clusters it completes, if any. */
  push(raw: unknown): BlockBatch | undefined {
    if (this.pendingError) throw this.pendingError;
    let chunk = asBytes(raw);
    if (chunk.length === 0) return undefined;
    const { size, clusterSize } = this;
    if (size !== undefined && this.total + chunk.length > size) {
      // Process the bytes up to the declared size, then fail: nothing beyond it is yielded.
      const excess = this.total + chunk.length - size;
      chunk = chunk.subarray(0, chunk.length - excess);
      this.pendingError = inputSizeMismatch(size, size + excess, true);
      const blocks = this.cut(chunk);
      if (blocks.length > 0) return { clusterSize, blocks };
      throw this.pendingError;
    }
    this.total += chunk.length;
    const blocks = this.cut(chunk);
    return blocks.length > 0 ? { clusterSize, blocks } : undefined;
  }

  /** The last batch: the short tail (if any) and `inputEnd`. */
  end(): BlockBatch {
    if (this.pendingError) throw this.pendingError;
    if (this.size !== undefined && this.total !== this.size) throw inputSizeMismatch(this.size, this.total);
    const tail: Block[] = this.filled > 0 && this.assembly ? [{ index: this.index++, data: this.assembly.subarray(0, this.filled) }] : [];
    return { clusterSize: this.clusterSize, blocks: tail, inputEnd: this.total };
  }

  private cut(chunk: Uint8Array): Block[] {
    const { clusterSize } = this;
    const out: Block[] = [];
    let pos = 0;
    if (this.filled > 0 && this.assembly) {
      const n = Math.min(clusterSize - this.filled, chunk.length);
      this.assembly.set(chunk.subarray(0, n), this.filled);
      this.filled += n;
      pos = n;
      if (this.filled < clusterSize) return out;
      const data = this.assembly;
      this.assembly = undefined;
      this.filled = 0;
      out.push({ index: this.index++, data });
    }
    for (; chunk.length - pos >= clusterSize; pos += clusterSize) {
      out.push({ index: this.index++, data: chunk.subarray(pos, pos + clusterSize) });
    }
    if (pos < chunk.length) {
      this.assembly = Buffer.allocUnsafeSlow(clusterSize);
      this.assembly.set(chunk.subarray(pos), 0);
      this.filled = chunk.length - pos;
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
  const cutter = new ClusterCutter(options);
  const pushAll = (stream: Transform, batch: BlockBatch | undefined) => {
    if (batch) for (const block of batch.blocks) stream.push(block);
  };
  // A Transform over the cutter, not Duplex.from(an async generator): on Node 22 such a Duplex
  // never closed once the pipeline around it was destroyed (an HTTP body cut off hung there).
  const stream = new Transform({
    readableObjectMode: true,
    transform(chunk: unknown, _encoding, callback) {
      try {
        pushAll(this, cutter.push(chunk));
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
    flush(callback) {
      try {
        pushAll(this, cutter.end());
        callback();
      } catch (err) {
        callback(err as Error);
      }
    },
  });
  return Object.assign(stream, { clusterSize });
}
