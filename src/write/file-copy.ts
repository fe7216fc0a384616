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
