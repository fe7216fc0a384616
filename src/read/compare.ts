/**
 * Compares the guest content of two images like `qemu-img compare` (without `-s`): identical
 * when every byte of the common size matches and the larger image's excess reads as zeros.
 * The first mismatch is reported at 512-byte granularity, as qemu prints it.
 *
 * Like qemu (which asks block status first), what is known to read as zeros is not read: zero
 * and unallocated extents, and holes of 256 KiB or more in the files storing data extents (a
 * sparse raw file, a raw data file; SEEK_DATA/SEEK_HOLE through src/io/extents.ts, so without
 * the addon those holes are read). Where both sides are known zeros nothing is read; where one
 * is, only the other side is read and checked for zeros.
 */

import type { Progress } from '../progress.js';
import { AbortedError } from '../errors.js';
import { checkDiskImage } from '../internal/arguments.js';
import { allocIoBuffer, isAllZero } from '../io/buffers.js';
import { dataExtents, MIN_SKIPPED_HOLE } from '../io/extents.js';
import { extentFile, type DiskImage } from './image.js';

const COMPARE_CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

/** Options of {@link compareImages}. */
export interface CompareOptions {
  /** Cancels the comparison: it rejects with an AbortedError. */
  signal?: AbortSignal;
  /** Called after each chunk with the bytes compared so far and the larger virtual size. */
  onProgress?: (progress: Progress) => void;
}

/** What {@link compareImages} found, by qemu-img compare's rules. */
export interface CompareResult {
  /** The guest contents are equal (a longer image's excess reads as zeros). */
  identical: boolean;
  /** The virtual sizes differ (qemu prints "Warning: Image size mismatch!"). */
  sizeMismatch: boolean;
  /** Start of the first differing 512-byte sector, when not identical. */
  mismatchOffset?: number;
}

/** Compares `a` and `b` byte by byte (both stay open). */
export async function compareImages(a: DiskImage, b: DiskImage, options: CompareOptions = {}): Promise<CompareResult> {
  checkDiskImage(a, 'compareImages()');
  checkDiskImage(b, 'compareImages()');
  const common = Math.min(a.virtualSize, b.virtualSize);
  const total = Math.max(a.virtualSize, b.virtualSize);
  const sizeMismatch = a.virtualSize !== b.virtualSize;
  const bufA = allocIoBuffer(COMPARE_CHUNK);
  const bufB = allocIoBuffer(COMPARE_CHUNK);
  const check = () => {
    if (options.signal?.aborted) throw abortError(options.signal);
  };
  const zerosA = new ZeroRanges(a, common);
  const zerosB = new ZeroRanges(b, common);
  let pos = 0;
  while (pos < common) {
    check();
    // The next piece where each side is either known zeros or to be read, at most one chunk.
    const [aZero, aEnd] = await zerosA.at(pos);
    const [bZero, bEnd] = await zerosB.at(pos);
    const end = Math.min(aEnd, bEnd, pos + COMPARE_CHUNK);
    const n = end - pos;
    if (!aZero || !bZero) {
      const chunkA = bufA.subarray(0, n);
      const chunkB = bufB.subarray(0, n);
      if (aZero) await b.readInto(chunkB, pos);
      else if (bZero) await a.readInto(chunkA, pos);
      else await Promise.all([a.readInto(chunkA, pos), b.readInto(chunkB, pos)]);
      if (aZero || bZero) {
        const chunk = aZero ? chunkB : chunkA;
        if (!isAllZero(chunk)) return { identical: false, sizeMismatch, mismatchOffset: sectorOf(pos + firstNonZeroByte(chunk)) };
      } else if (!chunkA.equals(chunkB)) {
        return { identical: false, sizeMismatch, mismatchOffset: sectorOf(pos + firstDifferentByte(chunkA, chunkB)) };
      }
    }
    pos = end;
    options.onProgress?.({ bytesDone: pos, bytesTotal: total });
  }
  const larger = a.virtualSize > b.virtualSize ? a : b;
  const zerosL = new ZeroRanges(larger, total);
  while (pos < total) {
    check();
    const [zero, zeroEnd] = await zerosL.at(pos);
    const end = Math.min(zeroEnd, pos + COMPARE_CHUNK);
    if (!zero) {
      const chunk = bufA.subarray(0, end - pos);
      await larger.readInto(chunk, pos);
      if (!isAllZero(chunk)) return { identical: false, sizeMismatch, mismatchOffset: sectorOf(pos + firstNonZeroByte(chunk)) };
    }
    pos = end;
    options.onProgress?.({ bytesDone: pos, bytesTotal: total });
  }
  return { identical: true, sizeMismatch };
}

/**
 * Walks an image's guest range in order, telling for each position whether it is known to read
 * as zeros and where that answer ends. Extents are asked for lazily, one at a time.
 */
class ZeroRanges {
  private readonly extents: AsyncGenerator<{ start: number; end: number; zero: boolean }>;
  private current: { start: number; end: number; zero: boolean } | undefined;

  constructor(image: DiskImage, end: number) {
    this.extents = zeroRuns(image, end);
  }

  /** `[zero, end]` of the run holding `position` (positions are asked in increasing order). */
  async at(position: number): Promise<[boolean, number]> {
    while (!this.current || this.current.end <= position) {
      const next = await this.extents.next();
      if (next.done) return [false, Number.MAX_SAFE_INTEGER]; // past the runs: read (never reached)
      this.current = next.value;
    }
    return [this.current.zero, this.current.end];
  }
}

/** The image's guest range [0, end) as runs that are known zeros or to be read. */
async function* zeroRuns(image: DiskImage, end: number): AsyncGenerator<{ start: number; end: number; zero: boolean }> {
  if (end <= 0) return;
  for await (const extent of image.extents(0, end)) {
    const extentEnd = extent.start + extent.length;
    const file = extent.kind === 'data' && !extent.compressed ? extentFile(extent) : undefined;
    if (extent.kind !== 'data') {
      yield { start: extent.start, end: extentEnd, zero: true };
      continue;
    }
    if (!file || extent.hostOffset === undefined) {
      yield { start: extent.start, end: extentEnd, zero: false };
      continue;
    }
    // Holes of the file below: long ones are skipped, short ones read with the data around them.
    const toGuest = extent.start - extent.hostOffset;
    const hostEnd = extent.hostOffset + extent.length;
    let position = extent.hostOffset;
    for (const data of dataExtents(file.fd, extent.hostOffset, hostEnd)) {
      if (data.start - position >= MIN_SKIPPED_HOLE) {
        yield { start: position + toGuest, end: data.start + toGuest, zero: true };
        position = data.start;
      }
      // Data, and any short hole before it, is read.
      if (data.end > position) {
        yield { start: position + toGuest, end: data.end + toGuest, zero: false };
        position = data.end;
      }
    }
    // Past the last data: a hole (or the end of a file shorter than the mapping: reads as zeros).
    if (position < hostEnd) yield { start: position + toGuest, end: extentEnd, zero: hostEnd - position >= MIN_SKIPPED_HOLE };
  }
}

const sectorOf = (offset: number) => offset - (offset % SECTOR);

function firstDifferentByte(a: Buffer, b: Buffer): number {
  for (let at = 0; at < a.length; at += SECTOR) {
    const end = Math.min(a.length, at + SECTOR);
    if (a.subarray(at, end).equals(b.subarray(at, end))) continue;
    for (let i = at; i < end; i++) if (a[i] !== b[i]) return i;
  }
  return 0;
}

function firstNonZeroByte(chunk: Buffer): number {
  for (let at = 0; at < chunk.length; at += SECTOR) {
    const end = Math.min(chunk.length, at + SECTOR);
    if (isAllZero(chunk.subarray(at, end))) continue;
    for (let i = at; i < end; i++) if (chunk[i] !== 0) return i;
  }
  return 0;
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
