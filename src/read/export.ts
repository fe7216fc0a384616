/**
 * qcow2 → raw: the guest bytes of an opened image, as a Node Readable or into a file/stdout.
 *
 * Both walk the image's coalesced extents: zero and unallocated ranges cost nothing (a shared
 * zero buffer on streams, holes in regular files) and data ranges are read in large chunks
 * (up to {@link EXPORT_CHUNK}), so memory stays at a few chunks whatever the image size.
 */

import type { Progress } from '../progress.js';
import { type Duplex, Readable } from 'node:stream';
import { chainUnchecked } from 'stream-chain';
import { AbortedError, InvalidArgumentError, streamError } from '../errors.js';
import { checkCallbacks, checkDiskImage, checkOptionsObject, checkSignal, describeValue, isWritableLike } from '../internal/arguments.js';
import { allocIoBuffer, isAllZero, zeroBuffer } from '../io/buffers.js';
import { COPIES_IN_FLIGHT, OffsetWriter, type OutputTarget } from '../io/output.js';
import { dataExtents, MIN_SKIPPED_HOLE } from '../io/extents.js';
import { checkOutputName, refuseOverlaps } from '../io/same-file.js';
import { chainFiles } from './chain-files.js';
import { extentFile, type DiskImage, type Extent, type ExtentFile } from './image.js';

/** Bytes read per data chunk: large reads are what makes export fast. */
export const EXPORT_CHUNK = 2 * 1024 * 1024;
/** Granularity of the zero check that keeps holes in a regular-file output. */
const SPARSE_GRANULE = 64 * 1024;
const ZERO_CHUNK = 1024 * 1024;
/** Positional writes kept in flight on a regular-file output. */
const WRITES_IN_FLIGHT = 3;

/** Options of {@link exportStream} and {@link exportToFile}. */
export interface ExportOptions {
  /** Cancels the export; the output file is removed. */
  signal?: AbortSignal;
  /** Called after each chunk with the guest bytes done so far and the total. */
  onProgress?: (progress: Progress) => void;
  /** exportToFile: fsync a regular-file output (and its directory after the rename) before resolving. Default true. */
  sync?: boolean;
  /** exportToFile: replace an existing file or object at the output. Default false (the CLI's --force). */
  overwrite?: boolean;
}

/** What {@link exportToFile} wrote. */
export interface ExportResult {
  /** Guest bytes exported (the virtual size). */
  bytes: number;
  /** Bytes actually written (data; plus zeros on a stream). */
  bytesWritten: number;
  /** The image's warnings (e.g. a data file shorter than the image). */
  warnings: readonly string[];
}

/** One step of an export: a zero range, or data to read into a buffer. */
interface Piece {
  offset: number;
  length: number;
  data: boolean;
  /** Uncompressed data: the file holding it, and where. */
  stored?: { file: ExtentFile; hostOffset: number };
}

/** The export plan: extents split so that data pieces are at most one chunk. */
async function* pieces(image: DiskImage, signal: AbortSignal | undefined): AsyncGenerator<Piece> {
  for await (const extent of image.extents()) {
    if (signal?.aborted) throw abortError(signal);
    if (extent.kind !== 'data') {
      yield { offset: extent.start, length: extent.length, data: false };
      continue;
    }
    const file = extentFile(extent);
    for (const range of storedRanges(extent, file)) {
      if (signal?.aborted) throw abortError(signal);
      if (!range.data) {
        yield { offset: range.start, length: range.end - range.start, data: false };
        continue;
      }
      for (let pos = range.start; pos < range.end; pos += EXPORT_CHUNK) {
        // Checked per chunk, not per extent: a data-file image with the raw bit is one extent
        // as long as the disk, and cancelling must not wait for all of it.
        if (signal?.aborted) throw abortError(signal);
        const piece: Piece = { offset: pos, length: Math.min(EXPORT_CHUNK, range.end - pos), data: true };
        if (file && extent.hostOffset !== undefined) piece.stored = { file, hostOffset: extent.hostOffset + (pos - extent.start) };
        yield piece;
      }
    }
  }
}

/**
 * A data extent cut where the file storing it has holes (SEEK_HOLE, src/io/extents.ts): those
 * read as zeros, so they are not read at all. A raw data file is one extent as long as the disk,
 * and most of a sparse one is holes. Edges are rounded outwards to the sparse granule, so the
 * zero check sees the same granules; bytes mapped past the end of the file stay data, so that
 * reading them gives the image's warning.
 */
function* storedRanges(extent: Extent, file: ExtentFile | undefined): Generator<{ start: number; end: number; data: boolean }> {
  const end = extent.start + extent.length;
  if (!file || extent.hostOffset === undefined) {
    yield { start: extent.start, end, data: true };
    return;
  }
  const delta = extent.hostOffset - extent.start;
  const inFileEnd = Math.max(extent.start, Math.min(end, file.size - delta));
  let dataFrom = extent.start;
  let at = extent.start;
  const hole = function* (holeEnd: number) {
    if (holeEnd - at < MIN_SKIPPED_HOLE) return;
    if (dataFrom < at) yield { start: dataFrom, end: at, data: true };
    yield { start: at, end: holeEnd, data: false };
    dataFrom = holeEnd;
  };
  for (const stored of dataExtents(file.fd, extent.hostOffset, inFileEnd + delta)) {
    const dataStart = Math.max(at, Math.floor((stored.start - delta) / SPARSE_GRANULE) * SPARSE_GRANULE);
    yield* hole(dataStart);
    at = Math.max(at, Math.min(inFileEnd, Math.ceil((stored.end - delta) / SPARSE_GRANULE) * SPARSE_GRANULE));
  }
  yield* hole(inFileEnd);
  if (dataFrom < end) yield { start: dataFrom, end, data: true };
}

/**
 * Always our AbortedError (the caller's reason, or the DOMException `abort()` makes without one,
 * is its `cause`), so cancellation is recognisable by code like every other outcome; the same
 * rule as the write side's.
 */
function abortError(signal: AbortSignal): AbortedError {
  const reason: unknown = signal.reason;
  return reason instanceof AbortedError ? reason : new AbortedError('The operation was aborted', { cause: reason });
}

/**
 * The image's guest bytes as a byte stream with backpressure. Zero ranges are chunks of one
 * shared zero buffer (never written to); data chunks are fresh buffers the consumer may keep.
 * The image stays open; close it after the stream ends.
 */
export function exportStream(image: DiskImage, options: ExportOptions = {}): ExportReadable {
  checkExportArguments(image, options, 'exportStream()');
  async function* chunks(): AsyncGenerator<Uint8Array> {
    let done = 0;
    for await (const piece of pieces(image, options.signal)) {
      if (piece.data) {
        const buffer = allocIoBuffer(piece.length);
        await image.readInto(buffer, piece.offset);
        yield buffer;
      } else {
        for (let left = piece.length; left > 0; left -= ZERO_CHUNK) {
          // A zero range can be the whole disk: cancelling must not wait for all of it.
          if (options.signal?.aborted) throw abortError(options.signal);
          yield zeroBuffer(ZERO_CHUNK).subarray(0, Math.min(ZERO_CHUNK, left));
        }
      }
      done += piece.length;
      options.onProgress?.({ bytesDone: done, bytesTotal: image.virtualSize });
    }
  }
  return Readable.from(chunks(), { objectMode: false, highWaterMark: EXPORT_CHUNK }) as ExportReadable;
}

/**
 * Writes the image's guest bytes to a path (`'-'` for standard output) or a Writable.
 *
 * A regular file is written under a temporary name and renamed at the end; zero ranges (and
 * all-zero data blocks) stay holes. A pipe gets every byte, zeros included. On failure or abort
 * nothing is left at the target path.
 */
export async function exportToFile(image: DiskImage, target: OutputTarget, options: ExportOptions = {}): Promise<ExportResult> {
  checkExportArguments(image, options, 'exportToFile()');
  if (typeof target !== 'string' && !isWritableLike(target)) throw new InvalidArgumentError(`exportToFile(): the target must be a path, '-', an s3:// URI or a Writable, not ${describeValue(target)}`);
  if (typeof target === 'string' && target !== '-') {
    checkOutputName(target, 'output');
    // The image, its data file and its backing files are read while the output is written.
    await refuseOverlaps(chainFiles(image), [{ role: 'output', path: target }]);
  }
  // An object's part size follows from the virtual size.
  const writer = await OffsetWriter.create(target, { label: 'raw image', sync: options.sync ?? true, overwrite: options.overwrite ?? false, sizeHint: image.virtualSize });
  // A regular file takes several positional writes at once (the kernel copies them in parallel
  // on the thread pool, as qemu-img keeps several requests in flight); a stream takes them one
  // at a time, in order. Each in-flight write owns one buffer of the pool; a Writable may keep
  // the chunks it is given, so it gets fresh buffers instead.
  const parallel = writer.kind === 'file' ? WRITES_IN_FLIGHT : 1;
  // Uncompressed data bound for a regular file goes through the native data mover when it is
  // built: read, zero check and write of each chunk on the thread pool, no buffer of ours.
  const copyNatively = writer.canCopyClusters;
  const reuseBuffers = typeof target === 'string';
  // Each pooled buffer remembers the write that reads from it, and is reused only once that
  // write has settled. Counting queue places is not enough: native copies share the queue, so
  // after a copy the queue's oldest entry can be a copy while a buffer's write is still running.
  const pool = reuseBuffers ? Array.from({ length: parallel + 1 }, () => ({ buffer: allocIoBuffer(EXPORT_CHUNK), write: Promise.resolve() })) : [];
  const inFlight: Promise<void>[] = [];
  let turn = 0;
  let done = 0;
  try {
    for await (const piece of pieces(image, options.signal)) {
      if (piece.data && copyNatively && piece.stored) {
        if (inFlight.length >= COPIES_IN_FLIGHT) await inFlight.shift();
        const copy = copyStored(writer, piece, piece.stored);
        copy.catch(() => {}); // observed when awaited (see below)
        inFlight.push(copy);
      } else if (piece.data) {
        const slot = reuseBuffers ? pool[turn++ % pool.length] : undefined;
        if (slot) await slot.write;
        const buffer = slot ? slot.buffer.subarray(0, piece.length) : allocIoBuffer(piece.length);
        await image.readInto(buffer, piece.offset);
        if (inFlight.length >= parallel) await inFlight.shift();
        const write = writer.kind === 'file' ? writeSparse(writer, piece.offset, buffer) : writer.write(piece.offset, buffer);
        // A write can fail (ENOSPC, EIO, a closed pipe) while the next chunk is being read and
        // before anything awaits it; without a handler attached now, Node treats that as an
        // unhandled rejection and kills the process with a stack trace instead of letting the
        // catch below remove the partial output. The failure still surfaces where it is awaited.
        write.catch(() => {});
        if (slot) slot.write = write.catch(() => {});
        inFlight.push(write);
      }
      // Zero pieces need no write: holes in a file, zeros filled by the writer on a stream.
      done += piece.length;
      options.onProgress?.({ bytesDone: done, bytesTotal: image.virtualSize });
    }
    await Promise.all(inFlight.splice(0));
    await writer.finish(image.virtualSize);
    if (options.signal?.aborted) throw abortError(options.signal);
    await writer.commit();
  } catch (err) {
    await Promise.allSettled(inFlight);
    await writer.abort();
    throw err;
  }
  return { bytes: image.virtualSize, bytesWritten: writer.bytesWritten, warnings: image.warnings };
}

/**
 * Copies a piece of stored data to the output natively, leaving its all-zero 64 KiB granules as
 * holes (like writeSparse). Bytes mapped past the end of their file read as zeros, as qemu has
 * them: nothing to write for them, only the image's warning.
 */
async function copyStored(writer: OffsetWriter, piece: Piece, stored: { file: ExtentFile; hostOffset: number }): Promise<void> {
  const { file, hostOffset } = stored;
  const inFile = Math.max(0, Math.min(piece.length, file.size - hostOffset));
  // Noted before the copy is awaited: the copies of later pieces must not report first.
  if (inFile < piece.length) file.notePastEnd(hostOffset + inFile);
  if (inFile === 0) return;
  const flags = new Uint8Array(Math.ceil(inFile / SPARSE_GRANULE));
  const copied = await writer.copyClustersFrom(file, hostOffset, piece.offset, inFile, SPARSE_GRANULE, flags);
  if (copied < inFile) file.notePastEnd(hostOffset + copied); // the file shrank while it was read
}

/** Writes the non-zero runs of `data` (at 64 KiB granularity), leaving holes for the rest. */
async function writeSparse(writer: OffsetWriter, offset: number, data: Uint8Array): Promise<void> {
  let runStart = -1;
  for (let pos = 0; pos < data.length; pos += SPARSE_GRANULE) {
    const block = data.subarray(pos, pos + SPARSE_GRANULE);
    if (isAllZero(block)) {
      if (runStart >= 0) await writer.write(offset + runStart, data.subarray(runStart, pos));
      runStart = -1;
    } else if (runStart < 0) {
      runStart = pos;
    }
  }
  if (runStart >= 0) await writer.write(offset + runStart, data.subarray(runStart));
}

/** Options of {@link createExportStream}. */
export interface ExportStreamOptions extends ExportOptions {
  /**
   * Stages of your own over the raw chunks, stream-chain style (a function of one chunk, a
   * generator, a Node stream), between the image and the stream's readable side. Their output
   * must stay bytes.
   */
  stages?: readonly unknown[];
}

/** The Readable of {@link exportStream}: the image's raw bytes. */
export interface ExportReadable extends Readable {
  /** `for await (const chunk of stream)` gives the raw bytes, typed: Buffers, as any byte-mode Readable yields them. */
  [Symbol.asyncIterator](): NodeJS.AsyncIterator<Buffer>;
}

/** The stream of {@link createExportStream}: raw bytes out, and `finished`. */
export interface ExportStream extends Duplex {
  /** Resolves once the last byte has been read from the stream; rejects with the error that stopped it. */
  readonly finished: Promise<ExportResult>;
  /** `for await (const chunk of stream)` gives the raw bytes, typed: Buffers, as any byte-mode stream yields them. */
  [Symbol.asyncIterator](): NodeJS.AsyncIterator<Buffer>;
}

/**
 * {@link exportStream} as one stream-chain `chain()`: the image's guest bytes, through your
 * `stages`, out of the readable side; `await stream.finished` gives the result (bytes counts
 * what came out of the last stage). The image stays open; close it after.
 */
export function createExportStream(image: DiskImage, options: ExportStreamOptions = {}): ExportStream {
  checkExportArguments(image, options, 'createExportStream()');
  let bytesWritten = 0;
  const count = (chunk: Uint8Array) => {
    bytesWritten += chunk.length;
    return chunk;
  };
  const stream = chainUnchecked([exportStream(image, options), ...(options.stages ?? []), count], { readableObjectMode: false, writableObjectMode: false }) as unknown as Duplex;
  const finished = new Promise<ExportResult>((resolve, reject) => {
    stream.once('end', () => resolve({ bytes: image.virtualSize, bytesWritten, warnings: image.warnings }));
    // A failure outside our code (a stage of yours, a pipeline's abort, a reader that went away) comes out as ours.
    stream.once('error', (err) => reject(streamError(err, 'export', 'finish')));
    stream.once('close', () => reject(new AbortedError('The export stream was destroyed before its end')));
  });
  finished.catch(() => {});
  return Object.assign(stream, { finished });
}

/** What every export entry point checks first: an opened image and an options object of the right types. */
function checkExportArguments(image: DiskImage, options: ExportOptions, call: string): void {
  checkDiskImage(image, call);
  checkOptionsObject(options, call);
  checkSignal(options.signal);
  checkCallbacks(options, ['onProgress']);
}
