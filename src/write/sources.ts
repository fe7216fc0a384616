/**
 * Block sources that read descriptors directly: large reads (2 MiB) into page-friendly buffers
 * (allocIoBuffer), each cut into zero-copy cluster views. Each read gets a fresh buffer, so a
 * Block stays valid for as long as anyone holds it. Reads run ahead of the consumer (one at a
 * time, a few buffers deep), so reading overlaps the downstream work and the sink's writes.
 *
 * Regular files are read positionally; pipes, FIFOs and devices sequentially (each buffer is
 * filled completely before it is cut, so even a pipe's 64 KiB chunks give whole clusters).
 * With `zeroRuns`, a regular file's holes (found with lseek SEEK_DATA/SEEK_HOLE where the
 * optional native probe is built) are never read: each becomes one zero-run Block.
 */

import { closeSync, constants, createReadStream, fstatSync, openSync, read as fsRead } from 'node:fs';
import { stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { BLOCK_STREAM_HIGH_WATER_MARK, flattenBatches, zeroRun, type Block, type BlockBatch } from '../block.js';
import { fileError, InvalidArgumentError } from '../errors.js';
import { DEFAULT_CLUSTER_BITS } from '../format/index.js';
import { allocIoBuffer } from '../io/buffers.js';
import { dataExtents, MIN_SKIPPED_HOLE, type DataExtent } from '../io/extents.js';
import { kindOf, openForRead, type OpenedFile } from '../io/files.js';
import { nativePipeIoAvailable, nativePipeReader } from '../io/pipe.js';
import { inputShrank, inputSizeMismatch } from './clusterize.js';

/** Bytes per read: a multiple of every cluster size (512 B .. 2 MiB). */
export const READ_SIZE = 2 * 1024 * 1024;

/** Reads into `buffer[offset, offset+length)`; `position` null reads sequentially. Returns bytes read (0 at EOF). */
export type ReadFn = (buffer: Uint8Array, offset: number, length: number, position: number | null) => Promise<number>;

/** A readable descriptor as the sources see it. */
export interface ReadTarget {
  /** Reads bytes; see {@link ReadFn}. */
  read: ReadFn;
  /** Name for messages. */
  name: string;
  /** True for regular files: read positionally from offset 0. */
  positional: boolean;
  /** The descriptor of a regular file: lets a source ask where its holes are (src/io/extents.ts). */
  fd?: number;
}

/**
 * Read buffers that are reused once every Block cut from them has been released. Only for
 * chains whose every stage is known to release Blocks exactly once when done with them (as
 * convert() does through the sink's `onBlockDone`); a buffer whose Blocks are never released
 * is simply left to the garbage collector, so forgetting a release costs memory, not data.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];
  /** Blocks still out, per buffer in use. */
  private readonly outstanding = new Map<ArrayBufferLike, { buffer: Buffer; count: number }>();

  constructor(
    /** Bytes per buffer (readBlocks needs {@link READ_SIZE}). */
    readonly bufferSize: number = READ_SIZE,
    private readonly maxFree = 8,
  ) {}

  /** A buffer for the next read: a recycled one when available. */
  acquire(): Buffer {
    return this.free.pop() ?? allocIoBuffer(this.bufferSize);
  }

  /** Records that `count` Blocks view `buffer`; with 0 it is free again at once. */
  lease(buffer: Buffer, count: number): void {
    if (count === 0) this.recycle(buffer);
    else this.outstanding.set(buffer.buffer, { buffer, count });
  }

  /** Releases one Block viewing a pooled buffer; other views are ignored. */
  release(view: Uint8Array): void {
    const entry = this.outstanding.get(view.buffer);
    if (!entry) return;
    if (--entry.count === 0) {
      this.outstanding.delete(view.buffer);
      this.recycle(entry.buffer);
    }
  }

  private recycle(buffer: Buffer): void {
    if (this.free.length < this.maxFree) this.free.push(buffer);
  }
}

/** Options of {@link readBlocks} and {@link createFileBlockSource}. */
export interface BlockSourceOptions {
  /** Bytes per cluster. Default 65536. */
  clusterSize?: number;
  /**
   * Bytes to read. For a positional source this is required and the file must hold at least
   * this many. For a sequential source it is the exact length expected (InputSizeError when
   * the stream is shorter or longer); undefined reads to EOF.
   */
  size?: number;
  /**
   * Recycle read buffers through this pool: every Block must then be released
   * (`pool.release(block.data)`) exactly once when no stage needs its bytes any more.
   * Default: a fresh buffer per read, which needs no cooperation.
   */
  pool?: BufferPool;
  /**
   * Yield the holes of a regular file as zero runs (Blocks with `count`, see Block.count)
   * without reading them, where the extent probe can find them (src/io/extents.ts). Only for
   * consumers that handle runs, as every stage of ours does. Default false: one Block per cluster.
   */
  zeroRuns?: boolean;
}

/** Options of {@link fileHandleTarget}. */
export interface FileHandleTargetOptions {
  /** The file's name, for messages. */
  name: string;
  /**
   * Positional reads (a regular file or block device, read at any offset: the native data
   * mover and hole probes may use its descriptor). Default true; false for a pipe or socket.
   */
  positional?: boolean;
}

/** A ReadTarget over an open FileHandle. */
export function fileHandleTarget(handle: FileHandle, options: FileHandleTargetOptions): ReadTarget {
  const { name, positional = true } = options;
  return {
    name,
    positional,
    ...(positional ? { fd: handle.fd } : {}),
    read: async (buffer, offset, length, position) => {
      try {
        return (await handle.read(buffer, offset, length, position)).bytesRead;
      } catch (err) {
        throw fileError(err, 'read', name);
      }
    },
  };
}

/**
 * A ReadTarget over a Node Readable (a pipe, socket or device), read sequentially.
 *
 * Pipes are read through the event loop (epoll), never with a blocking read() on the thread
 * pool: a thread blocked on a quiet pipe can never be cancelled, and process exit waits for it
 * (Ctrl-C would then hang). `close` destroys the stream and wakes a pending read.
 */
export function readableTarget(stream: Readable, name: string): ReadTarget & { close(): void } {
  let failure: unknown;
  let finished = false;
  stream.on('error', (err) => {
    failure ??= err;
  });
  stream.on('end', () => (finished = true));
  stream.on('close', () => (finished = true));
  const wake = () =>
    new Promise<void>((resolve) => {
      const done = () => {
        stream.off('readable', done).off('end', done).off('error', done).off('close', done);
        resolve();
      };
      stream.on('readable', done).on('end', done).on('error', done).on('close', done);
    });
  return {
    name,
    positional: false,
    read: async (buffer, offset, length) => {
      for (;;) {
        if (failure) throw fileError(failure, 'read', name);
        const chunk = stream.read() as Buffer | null;
        if (chunk !== null) {
          const n = Math.min(chunk.length, length);
          buffer.set(chunk.subarray(0, n), offset);
          if (n < chunk.length) stream.unshift(chunk.subarray(n));
          return n;
        }
        if (finished || stream.readableEnded || stream.destroyed) return 0;
        await wake();
      }
    },
    close: () => stream.destroy(),
  };
}

async function fill(target: ReadTarget, buffer: Uint8Array, length: number, position: number | null): Promise<number> {
  let done = 0;
  while (done < length) {
    const n = await target.read(buffer, done, length - done, position === null ? null : position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

const ignore = (): void => {};

/**
 * Reads queued ahead of the consumer (in flight or done), 2 MiB each. They go on while the
 * consumer waits for the sink's write, so reading and writing overlap instead of taking turns;
 * a deeper queue only lets the bytes go cold in the CPU cache before they are written.
 */
const READ_AHEAD = 2;

/** Reads of a regular file in flight at once (a stream is read one at a time); 2 gained nothing. */
const READS_IN_FLIGHT = 1;

/**
 * The longest zero run yielded: a hole is cut into runs of this many bytes, so a consumer still
 * hears of progress (and checks for an abort) every 32 MiB, like on data. 2048 Blocks for 64 GiB.
 */
export const MAX_ZERO_RUN_BYTES = 32 * 1024 * 1024;

/** A stretch of the input in order: bytes to read, or a hole of whole clusters (not read). */
export interface Segment {
  start: number;
  length: number;
  hole: boolean;
}

/**
 * The segments of a regular file of `size` bytes: reads of at most READ_SIZE and, when `fd` is
 * given and the probe finds them, holes of at least MIN_SKIPPED_HOLE. Every segment edge falls
 * on a cluster boundary (or the end), so a read never splits a cluster and a hole is whole
 * clusters; the short last cluster is always read.
 */
export function* fileSegments(fd: number | undefined, size: number, clusterSize: number, name?: string): Generator<Segment> {
  const minHole = Math.max(clusterSize, MIN_SKIPPED_HOLE);
  /** Everything before `planned` has been yielded; [planned, readTo) is data still to read. */
  let planned = 0;
  let readTo = 0;
  function* readsUpTo(end: number): Generator<Segment> {
    for (; planned < end; planned += READ_SIZE) yield { start: planned, length: Math.min(READ_SIZE, end - planned), hole: false };
    planned = end;
  }
  // Past the file's end the probe sees a hole, but reading there must fail (InputSizeError):
  // only the file's own bytes are probed.
  const probed = fd === undefined ? 0 : Math.min(size, fstatSync(fd).size);
  const extents: Iterable<DataExtent> = fd === undefined ? [] : dataExtents(fd, 0, probed);
  const unprobed: DataExtent[] = probed < size ? [{ start: probed, end: size }] : [];
  const lastWhole = size - (size % clusterSize);
  const shortTail: DataExtent[] = lastWhole < size ? [{ start: lastWhole, end: size }] : [];
  for (const iterable of [extents, unprobed, shortTail]) {
    for (const extent of iterable) {
      const start = Math.floor(extent.start / clusterSize) * clusterSize;
      const end = Math.min(size, Math.ceil(extent.end / clusterSize) * clusterSize);
      if (start - readTo >= minHole) {
        yield* readsUpTo(readTo);
        yield { start: readTo, length: start - readTo, hole: true };
        planned = start;
      }
      readTo = Math.max(readTo, end);
    }
  }
  if (size - readTo >= minHole) {
    yield* readsUpTo(readTo);
    yield { start: readTo, length: size - readTo, hole: true };
  } else {
    yield* readsUpTo(size);
  }
  // The probe sees a file cut short as one long hole: a plan made from it would convert the
  // lost part as zeros. Reads past the new end come back short and fail on their own; the holes
  // planned meanwhile are caught here, once the whole plan is made.
  if (fd !== undefined) {
    const now = fstatSync(fd).size;
    if (now < size) throw inputShrank(size, now, name);
  }
}

/** Sequential reads of READ_SIZE: up to `size` when known, else until the stream ends. */
function* streamSegments(size: number | undefined): Generator<Segment> {
  for (let start = 0; size === undefined || start < size; start += READ_SIZE) {
    yield { start, length: size === undefined ? READ_SIZE : Math.min(READ_SIZE, size - start), hole: false };
  }
}

/** A segment in the read-ahead queue. Reads may finish in any order; the queue keeps input order. */
interface Slot {
  segment: Segment;
  /** The buffer being read into; undefined for a hole. */
  buffer: Buffer | undefined;
  /** Bytes read once the read finished (a hole: 0 at once); fewer than asked means the input ended. */
  length: number | undefined;
  error?: { cause: unknown };
}

/**
 * Reads `target` into Blocks of `clusterSize` bytes (the last may be short), numbered from 0,
 * as an ix AsyncIterableX (so `.pipe(filter(…), map(…))` works on it).
 * With `zeroRuns`, the holes of a regular file come as zero runs (see Block.count) instead.
 * The caller keeps ownership of the descriptor (closes it after the generator ends).
 */
export function readBlocks(target: ReadTarget, options: BlockSourceOptions = {}): AsyncIterableX<Block> {
  return from(flattenBatches(readBatches(target, options)));
}

/**
 * {@link readBlocks} a read at a time: one {@link BlockBatch} per read (the cluster views of
 * one buffer) or per hole (its zero runs), then an empty batch carrying `inputEnd`. This is
 * what convert() and the stream stages move: framework cost per batch, not per cluster.
 */
export function readBatches(target: ReadTarget, options: BlockSourceOptions = {}): AsyncIterableX<BlockBatch> {
  return from(batchesOf(target, options));
}

async function* batchesOf(target: ReadTarget, options: BlockSourceOptions): AsyncGenerator<BlockBatch> {
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > READ_SIZE) {
    throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  const { size, pool } = options;
  if (pool && pool.bufferSize !== READ_SIZE) throw new InvalidArgumentError(`readBlocks: the pool's buffers must hold ${READ_SIZE} bytes`);
  if (target.positional && size === undefined) throw new InvalidArgumentError('readBlocks: a positional source needs its size');

  const segments = target.positional
    ? fileSegments(options.zeroRuns ? target.fd : undefined, size!, clusterSize, target.name)
    : streamSegments(size);
  // A stream is read in order, so one read at a time; a file may have several in flight.
  const maxInFlight = target.positional ? READS_IN_FLIGHT : 1;

  // The read-ahead queue, in input order; pump() tops it up, the loop below drains it.
  const queue: Slot[] = [];
  const inFlight = new Set<Promise<void>>();
  let exhausted = false;
  let stopped = false;
  let wakeConsumer: (() => void) | undefined;
  const wake = () => {
    const resolve = wakeConsumer;
    wakeConsumer = undefined;
    resolve?.();
  };
  const readsQueued = () => queue.reduce((n, slot) => n + (slot.buffer ? 1 : 0), 0);

  const pump = (): void => {
    while (!exhausted && !stopped && inFlight.size < maxInFlight && readsQueued() < READ_AHEAD) {
      let next: IteratorResult<Segment>;
      try {
        next = segments.next();
      } catch (cause) {
        // Queued like a failed read, so it surfaces in order (pump also runs from read callbacks).
        queue.push({ segment: { start: 0, length: 0, hole: true }, buffer: undefined, length: 0, error: { cause } });
        exhausted = true;
        break;
      }
      if (next.done) {
        exhausted = true;
        break;
      }
      const segment = next.value;
      if (segment.hole) {
        queue.push({ segment, buffer: undefined, length: 0 });
        continue;
      }
      const slot: Slot = { segment, buffer: pool ? pool.acquire() : allocIoBuffer(segment.length), length: undefined };
      queue.push(slot);
      const reading: Promise<void> = fill(target, slot.buffer!, segment.length, target.positional ? segment.start : null)
        .then(
          (length) => {
            slot.length = length;
            // A short read is the end of the input: nothing after it is read.
            if (length < segment.length) exhausted = true;
          },
          (cause: unknown) => {
            slot.error = { cause };
            exhausted = true;
          },
        )
        .finally(() => {
          inFlight.delete(reading);
          wake();
          pump();
        });
      inFlight.add(reading);
    }
  };

  let index = 0;
  /** One past the last input byte yielded. */
  let end = 0;
  try {
    for (;;) {
      pump();
      const slot = queue[0];
      if (!slot || (slot.length === undefined && !slot.error)) {
        if (!slot && exhausted && inFlight.size === 0) break;
        await new Promise<void>((resolve) => (wakeConsumer = resolve));
        continue;
      }
      queue.shift();
      if (slot.error) throw slot.error.cause;
      const { segment, buffer } = slot;
      const length = slot.length!;
      if (!buffer) {
        const runEnd = index + segment.length / clusterSize;
        const maxRun = MAX_ZERO_RUN_BYTES / clusterSize;
        const runs: Block[] = [];
        while (index < runEnd) {
          const count = Math.min(maxRun, runEnd - index);
          runs.push(zeroRun(index, count, clusterSize));
          index += count;
        }
        end = segment.start + segment.length;
        yield { clusterSize, blocks: runs };
        continue;
      }
      pool?.lease(buffer, Math.ceil(length / clusterSize));
      const blocks: Block[] = new Array<Block>(Math.ceil(length / clusterSize));
      for (let off = 0, i = 0; off < length; off += clusterSize, i++) {
        blocks[i] = { index: index++, data: buffer.subarray(off, Math.min(length, off + clusterSize)) };
      }
      end = segment.start + length;
      if (blocks.length > 0) yield { clusterSize, blocks };
      if (length < segment.length) {
        if (target.positional) throw inputShrank(size!, segment.start + length, target.name);
        if (size !== undefined) throw inputSizeMismatch(size, segment.start + length);
        break;
      }
    }
    if (size !== undefined && !target.positional) {
      // A stream must end exactly at the declared size.
      const probe = Buffer.allocUnsafe(1);
      if ((await target.read(probe, 0, 1, null)) > 0) throw inputSizeMismatch(size, size + 1, true);
    }
    yield { clusterSize, blocks: [], inputEnd: end };
  } finally {
    // The consumer may stop early; let outstanding reads settle before the caller closes the file.
    stopped = true;
    await Promise.all(inFlight);
  }
}

/** An input opened for reading blocks: the source and what we learned about it. */
export interface OpenedInput {
  /** Name for messages ('-' is standard input). */
  name: string;
  /** The input's length when known (regular files, or the declared size). */
  size: number | undefined;
  /** What the input is: a regular file gets positional reads and a known size. */
  kind: OpenedFile['kind'];
  /** The opened file, for identity checks (undefined for a raw descriptor). */
  file: OpenedFile | undefined;
  target: ReadTarget;
  close(): Promise<void>;
}

/**
 * Opens a path (or '-' for standard input) as a block input. Regular files are read
 * positionally with their size; anything else is read sequentially. A declared `size` that
 * differs from a regular file's size is refused here, before anything is written.
 */
export async function openInput(path: string, declaredSize?: number): Promise<OpenedInput> {
  const name = path === '-' ? 'standard input' : path;
  let kind: OpenedFile['kind'];
  try {
    kind = kindOf(path === '-' ? fstatSync(0) : await stat(path));
  } catch (err) {
    throw fileError(err, 'open', path);
  }
  if (kind === 'file') {
    // Reopening /dev/stdin gives `< file` its own handle with a size and positional reads.
    const file = await openForRead(path === '-' ? '/dev/stdin' : path);
    if (declaredSize !== undefined && declaredSize !== file.size) {
      await file.handle.close().catch(ignore);
      throw inputSizeMismatch(declaredSize, file.size);
    }
    return {
      name,
      size: file.size,
      kind,
      file,
      target: fileHandleTarget(file.handle, { name }),
      close: async () => {
        await file.handle.close().catch(ignore);
      },
    };
  }
  if (kind === 'directory') throw fileError(Object.assign(new Error('is a directory'), { code: 'EISDIR' }), 'open', path);
  // node:tty (and node:net below) load only for the inputs that need them: a file input
  // starts faster without them. Not import(): the command is a CommonJS bundle run from a code
  // cache (src/cli/launch.cjs), where a dynamic import has no loader.
  if (path === '-' && process.getBuiltinModule('node:tty').isatty(0)) {
    throw new InvalidArgumentError('Standard input is a terminal, not a raw image', {
      hint: "Pipe an image in (… | qcow2-stream convert - OUT) or name the input file (API: input: 'disk.raw' or a Readable)",
    });
  }
  const target = nativeTarget(path, kind, name) ?? (await eventLoopTarget(path, kind, name));
  return {
    name,
    size: declaredSize,
    kind,
    file: undefined,
    target,
    close: async () => target.close(),
  };
}

/**
 * A pipe, FIFO or socket read through the addon's cancellable full-buffer reads (src/io/pipe.ts):
 * one trip per 2 MiB buffer, off the main thread, and a pending read ends the moment close()
 * is called. Undefined without the addon, where {@link eventLoopTarget} serves the same bytes.
 */
function nativeTarget(path: string, kind: OpenedFile['kind'], name: string): (ReadTarget & { close(): void }) | undefined {
  if (!nativePipeIoAvailable() || (kind !== 'pipe' && kind !== 'socket')) return undefined;
  let fd: number;
  let ownsFd = true;
  if (path === '-') {
    // A pipe is reopened (our own open file description); a socket cannot be, so fd 0 is read
    // as it is (process.stdin is then never touched).
    const reopened = kind === 'pipe' ? openNonBlocking('/dev/stdin') : undefined;
    fd = reopened ?? 0;
    ownsFd = reopened !== undefined;
  } else {
    if (kind !== 'pipe') return undefined;
    try {
      // Opening a FIFO waits for its writer, as `cat fifo` does.
      fd = openSync(path, 'r');
    } catch (err) {
      throw fileError(err, 'open', path);
    }
  }
  const reader = nativePipeReader(fd, name, { ownsFd });
  if (!reader) {
    if (ownsFd) closeSync(fd);
    return undefined;
  }
  return {
    name,
    positional: false,
    read: (buffer, offset, length) => reader.read(buffer, offset, length),
    close: () => void reader.close(),
  };
}

/** A non-regular input read through the event loop: a reopened non-blocking stdin pipe, or a stream. */
async function eventLoopTarget(path: string, kind: OpenedFile['kind'], name: string): Promise<ReadTarget & { close(): void }> {
  const fd = path === '-' && kind === 'pipe' ? openNonBlocking('/dev/stdin') : undefined;
  return fd === undefined ? readableTarget(await streamFor(path, kind), name) : nonBlockingTarget(fd, name);
}

/**
 * A pipe on standard input reopened with O_NONBLOCK: a new open file description of the same
 * pipe, so the flag is ours alone. Reads then never block a thread-pool thread (a quiet pipe
 * answers EAGAIN at once), yet go straight into our large pooled buffers — no per-chunk
 * Buffers as a stream would allocate. Undefined where the reopen is impossible.
 */
function openNonBlocking(path: string): number | undefined {
  try {
    return openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
}

/** A ReadTarget over a non-blocking descriptor: EAGAIN waits a moment and retries. */
function nonBlockingTarget(fd: number, name: string): ReadTarget & { close(): void } {
  const readOnce = (buffer: Uint8Array, offset: number, length: number) =>
    new Promise<number>((resolve, reject) => {
      fsRead(fd, buffer, offset, length, null, (err, bytesRead) => (err ? reject(err) : resolve(bytesRead)));
    });
  let closed = false;
  // Closing while a read is in the thread pool could hand the descriptor number to another
  // file before that read runs: close only once it has come back.
  let inflight: Promise<unknown> = Promise.resolve();
  return {
    name,
    positional: false,
    read: async (buffer, offset, length) => {
      // An empty pipe usually refills within microseconds: retry on the next turn of the event
      // loop first, then back off to timers so a stalled writer costs no CPU.
      for (let attempt = 0; ; attempt++) {
        if (closed) return 0;
        const reading = readOnce(buffer, offset, length);
        inflight = reading.catch(() => {});
        try {
          return await reading;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw fileError(err, 'read', name);
          await new Promise((resolve) => (attempt < 8 ? setImmediate(resolve) : setTimeout(resolve, Math.min(2 ** (attempt - 8), 20))));
        }
      }
    },
    close: () => {
      if (closed) return;
      closed = true;
      void inflight.then(() => closeSync(fd));
    },
  };
}

/** An event-driven stream over a non-regular input (see {@link readableTarget} for why). */
async function streamFor(path: string, kind: OpenedFile['kind']): Promise<Readable> {
  if (path === '-') return process.stdin;
  if (kind === 'pipe' || kind === 'socket') {
    const { Socket } = process.getBuiltinModule('node:net');
    // Opening a FIFO waits for its writer, as `cat fifo` does; reads then go through epoll.
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (err) {
      throw fileError(err, 'open', path);
    }
    return new Socket({ fd, readable: true, writable: false });
  }
  // Character devices (/dev/zero…) never leave a read hanging.
  return createReadStream(path, { highWaterMark: READ_SIZE });
}

/** A Readable of Blocks that tells the cluster size it cuts, so later stages can use the same. */
export interface BlockSourceStream extends Readable {
  /** Bytes per Block (the last may be shorter): pass it on as the sink's `clusterSize`. */
  readonly clusterSize: number;
}

/**
 * A Readable of Blocks from a file path (or '-' for standard input), for `pipeline(...)`.
 * The file is opened on the first read and closed at the end or on destroy. Its `clusterSize`
 * is what the sink needs: `createExternalSink({ clusterSize: source.clusterSize, … })`.
 */
export function createFileBlockSource(path: string, options: BlockSourceOptions = {}): BlockSourceStream {
  async function* blocks(): AsyncGenerator<Block> {
    const input = await openInput(path, options.size);
    try {
      yield* readBlocks(input.target, input.size === undefined ? { ...options } : { ...options, size: input.size });
    } finally {
      await input.close();
    }
  }
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  return Object.assign(Readable.from(blocks(), { objectMode: true, highWaterMark: BLOCK_STREAM_HIGH_WATER_MARK }), { clusterSize });
}
