/**
 * A pipeline with a custom stage: file → Blocks → zero-detect → YOUR TRANSFORM → external sink.
 *
 *   node --import tsx examples/custom-transform.ts [DIR]
 *
 * Every stage is a plain Node stream in object mode carrying `Block`s (one guest cluster each:
 * `index`, `data`, and annotations such as `zero` set by zero-detect). The custom stage here
 * looks at each cluster on its way to the sink — it counts data and zero clusters and builds a
 * small histogram of byte entropy (≈0 bits: empty or repetitive, ≈8 bits: compressed or
 * encrypted) — and passes the Block on untouched. A stage may also annotate Blocks or drop
 * them (a missing index counts as a zero cluster), but must never modify `data` and must
 * keep Blocks in increasing index order.
 *
 * DIR (created if missing) keeps the files; without it a temporary directory is used and removed.
 * In your own code, import from the package instead of the source tree:
 *
 *   import { createFileBlockSource, createExternalSink, type Block } from 'qcow2-stream';
 *   import { createZeroDetectStream } from 'qcow2-stream/transforms';
 */

import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { closeSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkImage, compareImages, createExternalSink, createFileBlockSource, isQcow2StreamError, openDisk, type Block } from '../src/index.js';
import { createZeroDetectStream } from '../transforms/index.js';

const CLUSTER = 64 * 1024;

/** Shannon entropy of a buffer in bits per byte (0..8). */
function entropy(data: Uint8Array): number {
  const counts = new Uint32Array(256);
  for (const byte of data) counts[byte]!++;
  let bits = 0;
  for (const count of counts) {
    if (count === 0) continue;
    const p = count / data.length;
    bits -= p * Math.log2(p);
  }
  return bits;
}

/** The custom stage: statistics over the clusters flowing through, Blocks passed on unchanged. */
class ClusterStats extends Transform {
  dataClusters = 0;
  zeroClusters = 0;
  /** histogram[b]: data clusters whose entropy is in [b, b+1) bits per byte (8 counts in [7, 8]). */
  readonly histogram = new Array<number>(8).fill(0);

  constructor() {
    // objectMode: the chunks are Block objects, not bytes.
    super({ objectMode: true });
  }

  override _transform(block: Block, _encoding: BufferEncoding, callback: TransformCallback): void {
    if (block.zero) {
      this.zeroClusters++; // zero-detect ran before us: no need to look at the bytes
    } else {
      this.dataClusters++;
      this.histogram[Math.min(7, Math.floor(entropy(block.data)))]!++;
    }
    callback(null, block);
  }
}

/** An 8 MiB raw disk with text-like, random and repetitive clusters, and holes. */
function makeRawDisk(path: string): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 8 * 1024 * 1024);
    const text = Buffer.from('The quick brown fox jumps over the lazy dog. '.repeat(6000).slice(0, 4 * CLUSTER));
    writeSync(fd, text, 0, text.length, 0); // 4 clusters of text (~4 bits/byte)
    writeSync(fd, randomBytes(10 * CLUSTER), 0, 10 * CLUSTER, 8 * CLUSTER); // 10 random (~8 bits)
    writeSync(fd, Buffer.alloc(3 * CLUSTER, 0xab), 0, 3 * CLUSTER, 40 * CLUSTER); // 3 of one byte (0 bits)
    const counter = Buffer.alloc(2 * CLUSTER);
    for (let i = 0; i < counter.length; i++) counter[i] = i & 0xff;
    writeSync(fd, counter, 0, counter.length, 100 * CLUSTER); // 2 of 0..255 ramps (exactly 8 bits, yet trivially compressible)
  } finally {
    closeSync(fd);
  }
}

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qcow2-stream-custom-transform-'));
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'disk.raw');
  const qcow2 = join(dir, 'disk.qcow2');
  try {
    makeRawDisk(raw);

    const source = createFileBlockSource(raw, { clusterSize: CLUSTER }); // 2 MiB reads cut into cluster Blocks
    const stats = new ClusterStats();
    const sink = createExternalSink({
      output: qcow2,
      dataFile: join(dir, 'disk.data'), // stored in the header as 'disk.data': relative to disk.qcow2's directory
      clusterSize: source.clusterSize, // the cluster size is chosen once, at the source
      overwrite: true,
    });
    await pipeline(
      source,
      createZeroDetectStream(), // sets block.zero
      stats, // ← the custom stage
      sink, // data clusters to disk.data, zero clusters left as holes, metadata to disk.qcow2
    );

    // The sink's summary, once both files are committed (rejects if the pipeline failed).
    const result = await sink.finished;
    console.log(`wrote ${result.dataClusters} data clusters and skipped ${result.zeroClusters} zero clusters of ${result.clusters}`);
    console.log(`the custom stage saw ${stats.dataClusters} data and ${stats.zeroClusters} zero clusters; entropy of the data clusters:`);
    stats.histogram.forEach((count, bits) => console.log(`  ${bits}-${bits + 1} bits/byte ${String(count).padStart(3)} ${'#'.repeat(count)}`));
    if (stats.dataClusters !== result.dataClusters || stats.zeroClusters !== result.zeroClusters) {
      throw new Error('the custom stage and the sink disagree on the cluster counts');
    }
    if (stats.histogram[0] !== 3 || stats.histogram[4] !== 4 || stats.histogram[7] !== 12) {
      throw new Error(`unexpected entropy histogram ${JSON.stringify(stats.histogram)}`);
    }

    // Verify: a clean image that reads exactly like the input.
    const check = await checkImage(qcow2);
    if (!check.clean) throw new Error(`the image is not clean: ${JSON.stringify(check.findings)}`);
    const [a, b] = [await openDisk(raw, { format: 'raw' }), await openDisk(qcow2)];
    const same = await compareImages(a, b).finally(async () => {
      await a.close();
      await b.close();
    });
    if (!same.identical) throw new Error(`disk.qcow2 differs from disk.raw at byte ${same.mismatchOffset}`);
    console.log('check: clean; compare with disk.raw: identical');
    console.log('custom-transform: ok');
  } finally {
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  if (isQcow2StreamError(err)) console.error(`custom-transform failed: ${err.code}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
  else console.error('custom-transform failed:', err);
  process.exit(1);
});
