/**
 * The plain conversion of a regular file into an external data file, without Blocks: every
 * 2 MiB read of `fileSegments` becomes one native copy (read, zero check and write of the
 * chunk on a thread-pool thread, ExternalWriter.copyFromFile) and every hole a run of zero
 * clusters queued behind the copies in flight (ExternalWriter.takeHole). It
 * makes the same image as `readBlocks → zeroDetect → sink` with a fraction of the CPU, because
 * no JavaScript runs per cluster. convert() takes it when nothing else needs the bytes (no
 * base, manifest or dedup) and the native addon is built; everything else goes through Blocks.
 */

import { abortError } from './abort.js';
import type { ExternalWriter } from './external-sink.js';
import { isAllZero } from '../io/buffers.js';
import { extentFile, type DiskImage } from '../read/image.js';
import { imageSegments } from './image-source.js';
import { fileSegments, MAX_ZERO_RUN_BYTES } from './sources.js';

/** Options of {@link copyFileToExternal}. */
export interface FileCopyOptions {
  /** Checked before each chunk: an abort rejects with an AbortedError. */
  signal?: AbortSignal | undefined;
  /** Called with the input bytes taken so far, after each chunk or zero run is handed over. */
  onAdvance?: ((bytesDone: number) => void) | undefined;
}

/**
 * Feeds the first `size` bytes of the regular file `fd` to `writer`, in order. The writer must
 * be able to copy (`writer.canCopyFromFile`); the caller finishes or aborts it, and closes `fd`
 * only after that.
 */
export async function copyFileToExternal(source: { fd: number; name: string }, size: number, writer: ExternalWriter, options: FileCopyOptions = {}): Promise<void> {
  const { signal, onAdvance } = options;
  const clusterSize = writer.settings.clusterSize;
  for (const segment of fileSegments(source.fd, size, clusterSize, source.name)) {
    if (signal?.aborted) throw abortError(signal);
    const end = segment.start + segment.length;
    if (!segment.hole) {
      await writer.copyFromFile(source, segment.start, segment.length);
      onAdvance?.(end);
      continue;
    }
    // Cut like readBlocks cuts holes, so progress and aborts keep pace.
    for (let start = segment.start; start < end; start += MAX_ZERO_RUN_BYTES) {
      const length = Math.min(MAX_ZERO_RUN_BYTES, end - start);
      await writer.takeHole(start, length);
      onAdvance?.(start + length);
    }
  }
}

/**
 * The same for an image whose data sits uncompressed in its file (VHD, VHDX): each 2 MiB read
 * of `imageSegments` that one data extent covers is copied natively from where the image stores
 * it; ranges no layer holds are holes; anything else (a window mixing kinds or layers, bytes
 * past a file's end) is read through the image and written as Blocks, zero-checked here.
 */
export async function copyImageToExternal(image: DiskImage, writer: ExternalWriter, options: FileCopyOptions = {}): Promise<void> {
  const { signal, onAdvance } = options;
  const cs = writer.settings.clusterSize;
  for await (const segment of imageSegments(image, cs)) {
    if (signal?.aborted) throw abortError(signal);
    const end = segment.start + segment.length;
    if (segment.hole) {
      for (let start = segment.start; start < end; start += MAX_ZERO_RUN_BYTES) {
        const length = Math.min(MAX_ZERO_RUN_BYTES, end - start);
        await writer.takeHole(start, length);
        onAdvance?.(start + length);
      }
      continue;
    }
    const extents = [];
    for await (const extent of image.extents(segment.start, end)) extents.push(extent);
    const only = extents.length === 1 ? extents[0]! : undefined;
    const file = only?.kind === 'data' ? extentFile(only) : undefined;
    if (only && file && only.hostOffset !== undefined && only.hostOffset + segment.length <= file.size) {
      await writer.copyFromFile({ fd: file.fd, name: file.name }, segment.start, segment.length, only.hostOffset);
    } else {
      const bytes = new Uint8Array(segment.length);
      await image.readInto(bytes, segment.start);
      for (let off = 0; off < bytes.length; off += cs) {
        const data = bytes.subarray(off, Math.min(bytes.length, off + cs));
        await writer.write({ index: (segment.start + off) / cs, data, zero: isAllZero(data) });
      }
    }
    onAdvance?.(end);
  }
}
