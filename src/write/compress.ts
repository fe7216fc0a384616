/**
 * Compressed clusters for the internal layout: a pool of worker threads (compress-worker.ts,
 * one per core by default) and {@link compressBlocks}, the ordered stage that sets
 * `Block.compressed` on every data cluster that shrinks.
 *
 * Consecutive data blocks go to the workers in batches; batches complete in any order but are
 * yielded in the order they came, and each cluster is compressed on its own, so the output is
 * the same whatever the number of threads.
 */

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { setFlagsFromString } from 'node:v8';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import type { Block } from '../block.js';
import { CompressionUnsupportedError, InvalidArgumentError } from '../errors.js';
import { describeValue } from '../internal/arguments.js';

/** The compression types qcow2 knows: zlib (raw deflate, the default) and zstd. */
export type CompressionType = 'zlib' | 'zstd';

/** True when this Node.js can write zstd (node:zlib has it from 22.15 / 23.8). */
export function canCompressZstd(): boolean {
  return typeof (zlib as unknown as { zstdCompressSync?: unknown }).zstdCompressSync === 'function';
}

/**
 * Throws unless `type` is a compression type this runtime can write: zstd on a Node.js without
 * it is a CompressionUnsupportedError naming the version needed (never a silent zlib).
 */
export function checkCompressionType(type: string): asserts type is CompressionType {
  if (type !== 'zlib' && type !== 'zstd') throw new InvalidArgumentError(`Unknown compression type ${describeValue(type)}: use zlib or zstd`);
  if (type === 'zstd' && !canCompressZstd()) {
    throw new CompressionUnsupportedError(`zstd compression needs Node.js 22.15 or later (node:zlib has no zstd in ${process.version})`, 'runtime', {
      hint: "Use --compression-type zlib (API: compression: 'zlib'), or run on Node.js 22.15+",
    });
  }
}

/** Options of {@link CompressorPool.create}. */
export interface CompressorPoolOptions {
  /** The compression type (checked with {@link checkCompressionType}). */
  type: CompressionType;
  /** Bytes per cluster. */
  clusterSize: number;
  /** Worker threads. Default: one per core (`os.availableParallelism()`). */
  threads?: number;
}

interface Pending {
  resolve: (sizes: Int32Array) => void;
  reject: (err: Error) => void;
}

/** One batch's input and output, shared with the workers and reused. */
interface SharedBuffers {
  input: Uint8Array;
  output: Uint8Array;
}

/** What {@link CompressorPool.compress} gives back. */
export interface CompressedBatch {
  /** Per cluster: its compressed bytes (a view into a reused buffer), or undefined where it did not shrink. */
  results: Array<Uint8Array | undefined>;
  /** Lets the pool reuse the batch's buffers: call once the results are no longer read. */
  release(): void;
}

/**
 * A worker holds one batch at a time: a small young generation makes V8 free each batch's
 * buffers soon after, instead of letting them pile up to the default heap sizes per thread.
 */
const WORKER_LIMITS = { maxYoungGenerationSizeMb: 4, maxOldGenerationSizeMb: 64 };

/**
 * Starts one worker: the built compress-worker.js next to this module ('../write/' resolves
 * from dist/src/write, the library, and from dist/src/cli, the CLI bundle). Run from the
 * TypeScript source (tests, under tsx), it is compress-worker.ts through tsx's require hook:
 * Node 20 applies no --import loader to a worker's entry.
 */
function startWorker(): Worker {
  const built = new URL('../write/compress-worker.js', import.meta.url);
  if (existsSync(fileURLToPath(built))) return new Worker(built, { resourceLimits: WORKER_LIMITS });
  const source = fileURLToPath(new URL('../write/compress-worker.ts', import.meta.url));
  const tsx = createRequire(source).resolve('tsx/cjs/api');
  return new Worker(`require(${JSON.stringify(tsx)}).register(); require(${JSON.stringify(source)});`, { eval: true, resourceLimits: WORKER_LIMITS });
}

/**
 * Pools starting right now. While any is, V8's `--expose-gc` is on, so each new worker's first
 * context can take the `gc` function (see compress-worker.ts); it is off again once every
 * worker has it, so no other context of the process gets a `gc` global.
 */
let startingPools = 0;

function exposeGcWhileStarting(): () => void {
  // Run with --expose-gc already: every context has gc, and turning the flag off would undo that.
  if (typeof (globalThis as { gc?: unknown }).gc === 'function') return () => {};
  if (startingPools++ === 0) setFlagsFromString('--expose-gc');
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (--startingPools === 0) setFlagsFromString('--no-expose-gc');
  };
}

/** Worker threads that compress batches of clusters; `close()` when done. */
export class CompressorPool {
  /** Worker threads in the pool. */
  readonly threads: number;
  private readonly workers: Worker[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private nextWorker = 0;
  private failure: Error | undefined;
  private readonly free: SharedBuffers[] = [];

  private constructor(
    /** What the pool was made with. */
    readonly options: CompressorPoolOptions,
  ) {
    this.threads = options.threads ?? Math.max(1, availableParallelism());
    const release = exposeGcWhileStarting();
    let starting = this.threads;
    const started = () => {
      if (--starting === 0) release();
    };
    for (let i = 0; i < this.threads; i++) {
      const worker = startWorker();
      worker.unref();
      let ready = false;
      worker.on('message', (message: { id: number; sizes?: Int32Array; error?: string } | { ready: true }) => {
        if ('ready' in message) {
          ready = true;
          started();
        } else this.settle(message);
      });
      worker.on('error', (err) => this.fail(err));
      worker.on('exit', (code) => {
        if (!ready) started();
        ready = true;
        if (code !== 0 && !this.closed) this.fail(new Error(`A compression worker exited with code ${code}`));
      });
      this.workers.push(worker);
    }
  }

  private closed = false;

  /** Starts the workers, after checking the type and thread count. */
  static create(options: CompressorPoolOptions): CompressorPool {
    checkCompressionType(options.type);
    if (options.threads !== undefined && (!Number.isSafeInteger(options.threads) || options.threads < 1)) {
      throw new InvalidArgumentError(`Invalid compression thread count ${options.threads}: it must be a positive whole number`);
    }
    return new CompressorPool(options);
  }

  /**
   * Compresses each cluster of `clusters` on its own: the compressed bytes of each, or
   * undefined where it would not shrink below a cluster. The results live in buffers the pool
   * reuses once `release()` is called.
   */
  async compress(clusters: readonly Uint8Array[]): Promise<CompressedBatch> {
    if (this.failure) throw this.failure;
    let total = 0;
    for (const c of clusters) total += c.length;
    const buffers = this.take(total);
    let at = 0;
    for (const c of clusters) {
      buffers.input.set(c, at);
      at += c.length;
    }
    const id = this.nextId++;
    const worker = this.workers[this.nextWorker++ % this.workers.length]!;
    let sizes: Int32Array;
    try {
      sizes = await new Promise<Int32Array>((resolve, reject) => {
        this.pending.set(id, { resolve, reject });
        worker.postMessage({
          id,
          type: this.options.type,
          clusterSize: this.options.clusterSize,
          input: buffers.input.buffer,
          output: buffers.output.buffer,
          lengths: clusters.map((c) => c.length),
        });
      });
    } catch (err) {
      this.free.push(buffers);
      throw err;
    }
    const results: Array<Uint8Array | undefined> = [];
    let pos = 0;
    for (const size of sizes) {
      if (size < 0) results.push(undefined);
      else {
        results.push(buffers.output.subarray(pos, pos + size));
        pos += size;
      }
    }
    let released = false;
    return {
      results,
      release: () => {
        if (!released) this.free.push(buffers);
        released = true;
      },
    };
  }

  /** Shared buffers for a batch of `bytes` (the output holds one more cluster: a short last one may grow). */
  private take(bytes: number): SharedBuffers {
    const index = this.free.findIndex((b) => b.input.length >= bytes);
    if (index >= 0) return this.free.splice(index, 1)[0]!;
    const size = Math.max(bytes, BATCH_BYTES + this.options.clusterSize);
    return { input: new Uint8Array(new SharedArrayBuffer(size)), output: new Uint8Array(new SharedArrayBuffer(size + this.options.clusterSize)) };
  }

  /** Stops the workers. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.fail(new Error('The compression pool was closed'));
  }

  private settle(message: { id: number; sizes?: Int32Array; error?: string }): void {
    const job = this.pending.get(message.id);
    if (!job) return;
    this.pending.delete(message.id);
    if (message.error !== undefined) {
      job.reject(new CompressionUnsupportedError(`Compression failed: ${message.error}`, 'runtime'));
      return;
    }
    job.resolve(message.sizes!);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const job of this.pending.values()) job.reject(err);
    this.pending.clear();
  }
}

/** Data bytes per batch sent to a worker, by default. */
const BATCH_BYTES = 1024 * 1024;

/** Options of {@link compressBlocks}. */
export interface CompressBlocksOptions {
  /** The workers (from `CompressorPool.create`), injected as `fingerprintBlocks` takes its hasher. */
  pool: CompressorPool;
  /** Data bytes per batch sent to a worker. Default 1 MiB. */
  batchBytes?: number;
  /** Batches in flight. Default: one more than the pool has threads. */
  inFlight?: number;
}

/** Whether a block's bytes get stored, so are worth compressing. */
function storable(block: Block): boolean {
  return block.count === undefined && !block.zero && !block.sameAsBase;
}

/**
 * Sets `compressed` on every block that will be stored (not zero, not unchanged from a base)
 * and shrinks, compressing batches on the pool while later blocks are read. Blocks come out in
 * the order they went in; memory is `inFlight` batches.
 */
export async function* compressBlocks(blocks: AsyncIterable<Block>, options: CompressBlocksOptions): AsyncGenerator<Block> {
  const { pool } = options;
  const batchBytes = options.batchBytes ?? BATCH_BYTES;
  const inFlight = options.inFlight ?? pool.threads + 1;
  // Each entry: blocks in order, and the compression of those that are storable.
  const queue: Array<{ blocks: Block[]; done: Promise<(() => void) | undefined> }> = [];
  let current: Block[] = [];
  let currentBytes = 0;
  const dispatch = () => {
    const batch = current;
    current = [];
    currentBytes = 0;
    const targets = batch.filter(storable);
    const done =
      targets.length === 0
        ? Promise.resolve(undefined)
        : pool.compress(targets.map((b) => b.data)).then(({ results, release }) => {
            targets.forEach((block, i) => {
              const compressed = results[i];
              if (compressed) block.compressed = compressed;
            });
            return release;
          });
    // Handled when awaited in order; avoid an unhandled rejection meanwhile.
    done.catch(() => {});
    queue.push({ blocks: batch, done });
  };
  for await (const block of blocks) {
    current.push(block);
    if (storable(block)) currentBytes += block.data.length;
    // A batch also closes after many blocks that are not stored: they pin their read buffers.
    if (currentBytes >= batchBytes || current.length >= 1024) dispatch();
    while (queue.length >= inFlight) {
      const head = queue.shift()!;
      const release = await head.done;
      // Each block is handled before the next is asked for: after the last, the batch's
      // compressed bytes (views into the pool's reused buffers) are no longer read.
      yield* head.blocks;
      release?.();
    }
  }
  if (current.length > 0) dispatch();
  while (queue.length > 0) {
    const head = queue.shift()!;
    const release = await head.done;
    yield* head.blocks;
    release?.();
  }
}

/**
 * Sets `compressed` on every block of one batch that will be stored and shrinks: the batch is
 * split across the pool's threads and awaited (the per-batch form of {@link compressBlocks},
 * for a stage list that handles one batch at a time). The compressed bytes are views into the
 * pool's reused buffers: call the returned function once the sink has taken them.
 */
export async function compressBatch(blocks: readonly Block[], pool: CompressorPool): Promise<() => void> {
  const targets = blocks.filter(storable);
  if (targets.length === 0) return () => {};
  const parts = Math.min(pool.threads, targets.length);
  const per = Math.ceil(targets.length / parts);
  const chunks: Block[][] = [];
  for (let i = 0; i < targets.length; i += per) chunks.push(targets.slice(i, i + per));
  const settled = await Promise.allSettled(chunks.map((chunk) => pool.compress(chunk.map((b) => b.data))));
  const releases: Array<() => void> = [];
  let failure: unknown;
  let failed = false;
  settled.forEach((result, k) => {
    if (result.status === 'rejected') {
      if (!failed) failure = result.reason;
      failed = true;
      return;
    }
    releases.push(result.value.release);
    result.value.results.forEach((compressed, i) => {
      if (compressed) chunks[k]![i]!.compressed = compressed;
    });
  });
  const release = () => {
    for (const r of releases) r();
  };
  if (failed) {
    release();
    throw failure;
  }
  return release;
}
