/**
 * Compressed clusters (spec: "Compressed Clusters Descriptor"; qemu's qcow2-threads.c).
 *
 * A compressed cluster decompresses to exactly one cluster. qemu stops as soon as the output
 * is full and ignores whatever follows in the bytes it read (the descriptor's size rounds up to
 * whole sectors, so the next cluster's stream or padding usually follows); a stream that ends
 * before the cluster is full is an error. Both rules are kept here, and every allocation is
 * bounded by the cluster size, so a hostile descriptor cannot make us balloon.
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
    result = inflateRawSync(compressed, {
      windowBits: 12,
      maxOutputLength: out.length,
      // The bytes read may end before the stream's end marker only if the image is damaged;
      // a sync flush returns what was decoded so the length check below names the problem.
      finishFlush: zlibConstants.Z_SYNC_FLUSH,
    });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
      throw corrupt(`the deflate stream inflates to more than the cluster size (${out.length} bytes)`, hostOffset, err);
    }
    throw corrupt(`invalid deflate data (${(err as Error).message})`, hostOffset, err);
  }
  if (result.length !== out.length) {
    throw corrupt(`the deflate stream ends after ${result.length} of ${out.length} bytes`, hostOffset);
  }
  out.set(result);
}

type ZstdSyncDecompressor = (data: Uint8Array, options: { maxOutputLength: number }) => Buffer;
/** Node ≥ 22.15 / 23.8 ship zstd in node:zlib; Node 20 does not, and fzstd fills in. */
const nativeZstd = (zlib as unknown as { zstdDecompressSync?: ZstdSyncDecompressor }).zstdDecompressSync;

class OutputFull extends Error {}

function decompressZstd(compressed: Uint8Array, out: Uint8Array, hostOffset: number): void {
  const frames = zstdFrames(compressed, hostOffset);
  if (nativeZstd) {
    let result: Buffer | undefined;
    try {
      result = nativeZstd(frames, { maxOutputLength: out.length });
    } catch (err) {
      // The bytes read can hold the next cluster's frame too (the descriptor's size rounds up
      // to sectors), so "more output than a cluster" is normal: qemu stops once the cluster is
      // full. The native call cannot stop there; the streaming decoder below can.
      if ((err as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') {
        throw corrupt(`invalid zstd data (${(err as Error).message})`, hostOffset, err);
      }
    }
    if (result) {
      if (result.length !== out.length) throw corrupt(`the zstd data ends after ${result.length} of ${out.length} bytes`, hostOffset);
      out.set(result);
      return;
    }
  }
  let filled = 0;
  const stream = new ZstdStream((chunk) => {
    const n = Math.min(chunk.length, out.length - filled);
    out.set(chunk.subarray(0, n), filled);
    filled += n;
    // qemu stops decompressing once the cluster is full; so do we.
    if (filled === out.length) throw new OutputFull();
  });
  try {
    stream.push(frames, true);
  } catch (err) {
    if (!(err instanceof OutputFull)) throw corrupt(`invalid zstd data (${(err as Error).message})`, hostOffset, err);
  }
  if (filled !== out.length) throw corrupt(`the zstd data ends after ${filled} of ${out.length} bytes`, hostOffset);
}

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50;

/**
 * The prefix of `data` made of whole zstd frames, after checking each frame's window size.
 * Stops at the first bytes that are not a frame (the sector padding after qemu's single frame).
 * Walking block headers is cheap and lets us bound the decoder's window allocation up front.
 */
function zstdFrames(data: Uint8Array, hostOffset: number): Uint8Array {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
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
    if (end === undefined) break; // a frame cut off by the end of the bytes read
    pos = end;
  }
  if (pos === 0) throw corrupt('no zstd frame found', hostOffset);
  return data.subarray(0, Math.min(pos, data.length));
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
