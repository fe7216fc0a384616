/**
 * Compares the guest content of two images like `qemu-img compare` (without `-s`): identical
 * when every byte of the common size matches and the larger image's excess reads as zeros.
 * The first mismatch is reported at 512-byte granularity, as qemu prints it.
 */

import type { Progress } from '../progress.js';
import { AbortedError } from '../errors.js';
import { allocIoBuffer, isAllZero } from '../io/buffers.js';
import type { DiskImage } from './image.js';

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
  const common = Math.min(a.virtualSize, b.virtualSize);
  const total = Math.max(a.virtualSize, b.virtualSize);
  const sizeMismatch = a.virtualSize !== b.virtualSize;
  const bufA = allocIoBuffer(COMPARE_CHUNK);
  const bufB = allocIoBuffer(COMPARE_CHUNK);
  for (let pos = 0; pos < common; pos += COMPARE_CHUNK) {
    if (options.signal?.aborted) throw abortError(options.signal);
    const n = Math.min(COMPARE_CHUNK, common - pos);
    const chunkA = bufA.subarray(0, n);
    const chunkB = bufB.subarray(0, n);
    await Promise.all([a.readInto(chunkA, pos), b.readInto(chunkB, pos)]);
    if (!chunkA.equals(chunkB)) return { identical: false, sizeMismatch, mismatchOffset: pos + firstDifferentSector(chunkA, chunkB) };
    options.onProgress?.({ bytesDone: pos + n, bytesTotal: total });
  }
  const larger = a.virtualSize > b.virtualSize ? a : b;
  for (let pos = common; pos < total; pos += COMPARE_CHUNK) {
    if (options.signal?.aborted) throw abortError(options.signal);
    const n = Math.min(COMPARE_CHUNK, total - pos);
    const chunk = bufA.subarray(0, n);
    await larger.readInto(chunk, pos);
    if (!isAllZero(chunk)) return { identical: false, sizeMismatch, mismatchOffset: pos + firstNonZeroSector(chunk) };
    options.onProgress?.({ bytesDone: pos + n, bytesTotal: total });
  }
  return { identical: true, sizeMismatch };
}

function firstDifferentSector(a: Buffer, b: Buffer): number {
  for (let at = 0; at < a.length; at += SECTOR) {
    if (!a.subarray(at, at + SECTOR).equals(b.subarray(at, at + SECTOR))) return at;
  }
  return 0;
}

function firstNonZeroSector(chunk: Buffer): number {
  for (let at = 0; at < chunk.length; at += SECTOR) {
    if (!isAllZero(chunk.subarray(at, at + SECTOR))) return at;
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
