/**
 * The compression worker (one per core, started by compress.ts): compresses clusters the way
 * qemu's qcow2-threads.c does and posts back what shrank.
 *
 * It imports nothing of ours, so the same file runs from dist/ next to the CLI bundle and from
 * the TypeScript source under tsx.
 *
 * Message in:  { id, type: 'zlib' | 'zstd', clusterSize, input, output: SharedArrayBuffer, lengths }
 *              (clusters back to back in `input`; a short last cluster is zero-padded to
 *              clusterSize, as qemu pads the image's last cluster before compressing it)
 * Message out: { id, sizes: Int32Array } — the compressed streams written back to back into
 *              `output`, sizes[i] = −1 where the stream would not be smaller than a cluster
 *              (stored as is); or { id, error: string }
 *
 * The buffers are shared and reused batch after batch, so no per-batch garbage builds up.
 */

import { runInNewContext } from 'node:vm';
import { parentPort } from 'node:worker_threads';
import * as zlib from 'node:zlib';

/**
 * Every cluster costs a zlib object and its output buffers, garbage held outside V8's heap
 * that no heap limit bounds: V8 lets ~64 MiB of it build up per thread before collecting,
 * which made each worker ~40 MiB larger. A young-generation collection every few batches
 * frees it (measured: 2 workers, 115 → 68 MiB; well under 1% of the time). The pool turns
 * `--expose-gc` on while its workers start, so this context can take `gc`; without it
 * (another embedder), nothing is collected early.
 */
type GcFunction = (options: { type: 'minor' | 'major' }) => void;
const gc = (() => {
  try {
    return runInNewContext('typeof gc === "function" ? gc : undefined') as GcFunction | undefined;
  } catch {
    return undefined;
  }
})();
/** Bytes of input compressed between collections. */
const COLLECT_EVERY_BYTES = 2 * 1024 * 1024;
let sinceCollect = 0;
/** Every how many collections is a full one. */
const MAJOR_EVERY = 4;
let collections = 0;
parentPort!.postMessage({ ready: true });

interface Job {
  id: number;
  type: 'zlib' | 'zstd';
  clusterSize: number;
  input: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: number[];
}

type Compress = (input: Uint8Array) => Buffer;
type ZstdCompress = (input: Uint8Array, options: { params: Record<number, number> }) => Buffer;

function compressor(type: Job['type']): Compress {
  if (type === 'zstd') {
    const zstd = (zlib as unknown as { zstdCompressSync?: ZstdCompress }).zstdCompressSync;
    const level = (zlib.constants as unknown as Record<string, number>).ZSTD_c_compressionLevel;
    if (!zstd || level === undefined) throw new Error(`zstd compression needs Node.js 22.15 or later (this is ${process.version})`);
    // qemu: ZSTD_CLEVEL_DEFAULT (3), one frame per cluster.
    return (input) => zstd(input, { params: { [level]: 3 } });
  }
  // qemu: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY): raw deflate.
  return (input) => zlib.deflateRawSync(input, { level: 6, windowBits: 12, memLevel: 9 });
}

const compressors = new Map<string, Compress>();

parentPort!.on('message', (job: Job) => {
  try {
    let compress = compressors.get(job.type);
    if (!compress) compressors.set(job.type, (compress = compressor(job.type)));
    const input = new Uint8Array(job.input);
    const output = new Uint8Array(job.output);
    const sizes = new Int32Array(job.lengths.length);
    let total = 0;
    let pos = 0;
    let padded: Uint8Array | undefined;
    job.lengths.forEach((length, i) => {
      let cluster: Uint8Array = input.subarray(pos, pos + length);
      pos += length;
      if (length < job.clusterSize) {
        padded ??= new Uint8Array(job.clusterSize);
        padded.fill(0);
        padded.set(cluster);
        cluster = padded;
      }
      const out = compress(cluster);
      // qemu compresses into a buffer of cluster_size − 1 bytes: what does not fit is stored as is.
      if (out.length >= job.clusterSize) {
        sizes[i] = -1;
        return;
      }
      if (total + out.length > output.length) throw new Error('the output buffer is too small');
      sizes[i] = out.length;
      output.set(out, total);
      total += out.length;
    });
    parentPort!.postMessage({ id: job.id, sizes }, [sizes.buffer]);
    sinceCollect += pos;
    if (gc && sinceCollect >= COLLECT_EVERY_BYTES) {
      sinceCollect = 0;
      // On Node 24 the zlib objects outlive young collections (RSS grew 61 MiB over 64 MiB with
      // minor ones only): every few collections is a full one, on this worker's small heap.
      gc({ type: ++collections % MAJOR_EVERY === 0 ? 'major' : 'minor' });
    }
  } catch (err) {
    parentPort!.postMessage({ id: job.id, error: err instanceof Error ? err.message : String(err) });
  }
});
