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
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import type { Block } from '../block.js';
import { CompressionUnsupportedError, InvalidArgumentError } from '../errors.js';

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
  if (type !== 'zlib' && type !== 'zstd') throw new InvalidArgumentError(`Unknown compression type '${type}': use zlib or zstd`);
  if (type === 'zstd' && !canCompressZstd()) {
    throw new CompressionUnsupportedError(`zstd compression needs Node.js 22.15 or later (node:zlib has no zstd in ${process.version})`, 'runtime', {
      hint: 'Use --compression-type zlib, or run on Node.js 22.15+',
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
  resolve: (result: Array<Uint8Array | undefined>) => void;
  reject: (err: Error) => void;
}

/**
 * Starts one worker: the built compress-worker.js next to this module ('../write/' resolves
 * from dist/src/write, the library, and from dist/src/cli, the CLI bundle). Run from the
 * TypeScript source (tests, under tsx), it is compress-worker.ts through tsx's require hook:
 * Node 20 applies no --import loader to a worker's entry.
 */
function startWorker(): Worker {
  const built = new URL('../write/compress-worker.js', import.meta.url);
  if (existsSync(fileURLToPath(built))) return new Worker(built);
  const source = fileURLToPath(new URL('../write/compress-worker.ts', import.meta.url));
  const tsx = createRequire(source).resolve('tsx/cjs/api');
  return new Worker(`require(${JSON.stringify(tsx)}).register(); require(${JSON.stringify(source)});`, { eval: true });
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

  private constructor(
    /** What the pool was made with. */
    readonly options: CompressorPoolOptions,
  ) {
    this.threads = options.threads ?? Math.max(1, availableParallelism());
    for (let i = 0; i < this.threads; i++) {
      const worker = startWorker();
      worker.unref();
      worker.on('message', (message: { id: number; out?: ArrayBuffer; sizes?: Int32Array; error?: string }) => this.settle(message));
      worker.on('error', (err) => this.fail(err));
      worker.on('exit', (code) => {
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
   * Compresses each cluster of `clusters` on its own; resolves to the compressed bytes of each,
   * or undefined where it would not shrink below a cluster.
   */
  compress(clusters: readonly Uint8Array[]): Promise<Array<Uint8Array | undefined>> {
    if (this.failure) return Promise.reject(this.failure);
    let total = 0;
    for (const c of clusters) total += c.length;
    const data = new Uint8Array(total);
    let at = 0;
    for (const c of clusters) {
      data.set(c, at);
      at += c.length;
    }
    const id = this.nextId++;
    const worker = this.workers[this.nextWorker++ % this.workers.length]!;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage(
        { id, type: this.options.type, clusterSize: this.options.clusterSize, data: data.buffer, lengths: clusters.map((c) => c.length) },
        [data.buffer],
      );
    });
  }

  /** Stops the workers. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.fail(new Error('The compression pool was closed'));
  }

  private settle(message: { id: number; out?: ArrayBuffer; sizes?: Int32Array; error?: string }): void {
    const job = this.pending.get(message.id);
    if (!job) return;
    this.pending.delete(message.id);
    if (message.error !== undefined) {
      job.reject(new CompressionUnsupportedError(`Compression failed: ${message.error}`, 'runtime'));
      return;
    }
    const out = new Uint8Array(message.out!);
    const results: Array<Uint8Array | undefined> = [];
    let pos = 0;
    for (const size of message.sizes!) {
      if (size < 0) results.push(undefined);
      else {
        results.push(out.subarray(pos, pos + size));
        pos += size;
      }
    }
    job.resolve(results);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const job of this.pending.values()) job.reject(err);
    this.pending.clear();
  }
}

/** Options of {@link compressBlocks}. */
export interface CompressBlocksOptions {
  /** Data bytes per batch sent to a worker. Default 1 MiB. */
  batchBytes?: number;
  /** Batches in flight. Default twice the pool's threads. */
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
export async function* compressBlocks(blocks: AsyncIterable<Block>, pool: CompressorPool, options: CompressBlocksOptions = {}): AsyncGenerator<Block> {
  const batchBytes = options.batchBytes ?? 1024 * 1024;
  const inFlight = options.inFlight ?? pool.threads * 2;
  // Each entry: blocks in order, and the compression of those that are storable.
  const queue: Array<{ blocks: Block[]; done: Promise<void> }> = [];
  let current: Block[] = [];
  let currentBytes = 0;
  const dispatch = () => {
    const batch = current;
    current = [];
    currentBytes = 0;
    const targets = batch.filter(storable);
    const done =
      targets.length === 0
        ? Promise.resolve()
        : pool.compress(targets.map((b) => b.data)).then((results) => {
            targets.forEach((block, i) => {
              const compressed = results[i];
              if (compressed) block.compressed = compressed;
            });
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
      await head.done;
      yield* head.blocks;
    }
  }
  if (current.length > 0) dispatch();
  while (queue.length > 0) {
    const head = queue.shift()!;
    await head.done;
    yield* head.blocks;
  }
}
