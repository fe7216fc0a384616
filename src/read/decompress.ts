/**
 * Compressed clusters (spec: "Compressed Clusters Descriptor"; qemu's qcow2-threads.c).
 *
 * A compressed cluster decompresses to exactly one cluster; a stream that ends before the
 * cluster is full is an error in both codecs. Past the full cluster qemu's two codecs differ,
 * and so do we, as qemu does: deflate ignores whatever follows (the descriptor's size rounds up
 * to whole sectors); zstd requires the frame that filled the cluster to end there. Every
 * allocation is bounded by the cluster size, so a hostile descriptor cannot make us balloon.
 */

import { constants as zlibConstants, inflateRawSync } from 'node:zlib';
import * as zlib from 'node:zlib';
import { Decompress as ZstdStream } from 'fzstd';
import { CorruptImageError, LimitExceededError } from '../errors.js';
import { COMPRESSION_ZSTD } from '../format/index.js';

/**
 * The largest zstd window we accept. qemu's compressor writes one frame per cluster, so its
 * window is at most the cluster size (2 MiB); fzstd allocates a full window per frame, so an
 * unbounded window descriptor (up to 2 GiB) would be an allocation a hostile image controls.
 */
export const MAX_ZSTD_WINDOW = 8 * 1024 * 1024;

/** Decompresses one cluster into `out` (exactly `out.length` bytes), or throws CorruptImageError. */
export function decompressCluster(compressed: Uint8Array, out: Uint8Array, compressionType: number, hostOffset: number): void {
  if (compressionType === COMPRESSION_ZSTD) decompressZstd(compressed, out, hostOffset);
  else decompressDeflate(compressed, out, hostOffset);
}

function corrupt(message: string, hostOffset: number, cause?: unknown): CorruptImageError {
  return new CorruptImageError(`Compressed cluster at byte ${hostOffset}: ${message}`, {
    structure: 'compressed cluster',
    offset: hostOffset,
    ...(cause === undefined ? {} : { cause }),
  });
}

/** qcow2's zlib clusters are raw deflate (no zlib header), windowBits −12. */
function decompressDeflate(compressed: Uint8Array, out: Uint8Array, hostOffset: number): void {
  let result: Buffer;
  try {
    result = inflatePrefix(compressed, compressed.length, out.length);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') throw corrupt(`invalid deflate data (${(err as Error).message})`, hostOffset, err);
    // More than a cluster: qemu fills the cluster and ignores the rest (inflate's
    // Z_BUF_ERROR with the output full is success there), so take the first cluster's worth.
    result = firstCluster(compressed, out.length, hostOffset);
  }
  if (result.length < out.length) {
    throw corrupt(`the deflate stream ends after ${result.length} of ${out.length} bytes`, hostOffset);
  }
  out.set(result.subarray(0, out.length));
}

/**
 * Inflates `compressed[0, length)` with at most `limit` bytes out. The bytes read may end
 * before the stream's end marker (the descriptor counts whole sectors, or the image is
 * damaged): a sync flush returns what was decoded, and the caller's length check judges it.
 */
function inflatePrefix(compressed: Uint8Array, length: number, limit: number): Buffer {
  return inflateRawSync(compressed.subarray(0, length), { windowBits: 12, maxOutputLength: limit, finishFlush: zlibConstants.Z_SYNC_FLUSH });
}

/**
 * The first `clusterSize` bytes of a stream that inflates to more: the shortest input prefix
 * that gives at least a cluster, found by bisection (output only grows with input). One more
 * input byte adds at most a few KiB of output (a stored block adds one byte per byte; a byte of
 * codes at most 8 matches of 258), so the slack bounds every attempt's allocation.
 */
function firstCluster(compressed: Uint8Array, clusterSize: number, hostOffset: number): Buffer {
  const limit = clusterSize + 64 * 1024;
  const attempt = (length: number): Buffer | undefined => {
    try {
      return inflatePrefix(compressed, length, limit);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') return undefined;
      throw corrupt(`invalid deflate data (${(err as Error).message})`, hostOffset, err);
    }
  };
  let low = 0; // gives less than a cluster
  let high = compressed.length; // gives more than a cluster (or more than the slack)
  let best: Buffer | undefined;
  while (high - low > 1) {
    const mid = Math.floor((low + high) / 2);
    const result = attempt(mid);
    if (result && result.length < clusterSize) {
      low = mid;
      continue;
    }
    if (result) best = result;
    high = mid;
  }
  best ??= attempt(high);
  if (!best) throw corrupt(`the deflate stream inflates to more than the cluster size (${clusterSize} bytes) within one input byte`, hostOffset);
  return best;
}

type ZstdSyncDecompressor = (data: Uint8Array, options: { maxOutputLength: number }) => Buffer;
/** Node ≥ 22.15 / 23.8 ship zstd in node:zlib; Node 20 does not, and fzstd fills in. */
const nativeZstd = (zlib as unknown as { zstdDecompressSync?: ZstdSyncDecompressor }).zstdDecompressSync;

class OutputFull extends Error {}

/**
 * qemu decodes until the cluster is full and then requires the frame it is in to be complete
 * (ZSTD_decompressStream returned 0): a frame that would give more than the cluster, or data
 * that does not decode, is EIO there and a CorruptImageError here, never bytes of a damaged
 * stream. Frames are decoded one at a time, each bounded by what is left of the cluster.
 */
function decompressZstd(compressed: Uint8Array, out: Uint8Array, hostOffset: number): void {
  let filled = 0;
  for (const frame of zstdFrames(compressed, hostOffset)) {
    if (filled === out.length) break;
    filled += decodeZstdFrame(frame, out.subarray(filled), hostOffset);
  }
  if (filled !== out.length) throw corrupt(`the zstd data ends after ${filled} of ${out.length} bytes`, hostOffset);
}

/** Decodes one whole frame into the start of `out`; more output than `out` holds is corruption. */
function decodeZstdFrame(frame: Uint8Array, out: Uint8Array, hostOffset: number): number {
  const tooLong = () => corrupt(`a zstd frame decodes to more than the ${out.length} bytes left of the cluster`, hostOffset);
  if (nativeZstd) {
    let result: Buffer;
    try {
      result = nativeZstd(frame, { maxOutputLength: out.length });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') throw tooLong();
      throw corrupt(`invalid zstd data (${(err as Error).message})`, hostOffset, err);
    }
    out.set(result);
    return result.length;
  }
  let filled = 0;
  const stream = new ZstdStream((chunk) => {
    if (chunk.length > out.length - filled) throw new OutputFull();
    out.set(chunk, filled);
    filled += chunk.length;
  });
  try {
    stream.push(frame, true);
  } catch (err) {
    if (err instanceof OutputFull) throw tooLong();
    throw corrupt(`invalid zstd data (${(err as Error).message})`, hostOffset, err);
  }
  return filled;
}

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50;

/**
 * The whole zstd frames at the start of `data`, each after checking its window size. Stops at
 * the first bytes that are not a frame (the sector padding after qemu's single frame) and at a
 * frame cut off by the end of the bytes read. Walking block headers is cheap and bounds the
 * decoder's window allocation up front.
 */
function zstdFrames(data: Uint8Array, hostOffset: number): Uint8Array[] {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const frames: Uint8Array[] = [];
  let pos = 0;
  while (pos + 4 <= data.length) {
    const magic = view.getUint32(pos, true);
    if ((magic & ZSTD_SKIPPABLE_MASK) >>> 0 === ZSTD_SKIPPABLE_MAGIC) {
      if (pos + 8 > data.length) break;
      pos += 8 + view.getUint32(pos + 4, true);
      continue;
    }
    if (magic !== ZSTD_MAGIC) break;
    const end = zstdFrameEnd(data, pos, hostOffset);
    if (end === undefined) break;
    frames.push(data.subarray(pos, end));
    pos = end;
  }
  if (frames.length === 0) throw corrupt('no whole zstd frame found', hostOffset);
  return frames;
}

function zstdFrameEnd(data: Uint8Array, start: number, hostOffset: number): number | undefined {
  let pos = start + 4;
  if (pos >= data.length) return undefined;
  const descriptor = data[pos++] ?? 0;
  const singleSegment = (descriptor >> 5) & 1;
  const checksum = (descriptor >> 2) & 1;
  const dictIdBytes = [0, 1, 2, 4][descriptor & 3] ?? 0;
  const sizeFlag = descriptor >> 6;
  const contentSizeBytes = sizeFlag === 0 ? singleSegment : 1 << sizeFlag;
  let window = 0;
  if (!singleSegment) {
    const wd = data[pos++] ?? 0;
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  pos += dictIdBytes;
  if (pos + contentSizeBytes > data.length) return undefined;
  if (singleSegment) {
    let contentSize = 0;
    for (let i = contentSizeBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + (data[pos + i] ?? 0);
    if (contentSizeBytes === 2) contentSize += 256;
    window = contentSize;
  }
  pos += contentSizeBytes;
  if (window > MAX_ZSTD_WINDOW) {
    throw new LimitExceededError(`Compressed cluster at byte ${hostOffset}: zstd window of ${window} bytes is above the ${MAX_ZSTD_WINDOW}-byte limit`, {
      structure: 'compressed cluster',
      offset: hostOffset,
      limit: MAX_ZSTD_WINDOW,
      actual: window,
    });
  }
  for (;;) {
    if (pos + 3 > data.length) return undefined;
    const header = (data[pos] ?? 0) | ((data[pos + 1] ?? 0) << 8) | ((data[pos + 2] ?? 0) << 16);
    pos += 3;
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === 3) throw corrupt('reserved zstd block type', hostOffset);
    pos += type === 1 ? 1 : size; // an RLE block stores one byte
    if (pos > data.length) return undefined;
    if (last) break;
  }
  pos += checksum * 4;
  return pos > data.length ? undefined : pos;
}
