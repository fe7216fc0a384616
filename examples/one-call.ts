/**
 * One-call conversion: raw → qcow2 (metadata + external data file) with `convert()`, then back
 * to raw with `exportToFile()`, and a byte-for-byte comparison with the original.
 *
 *   node --import tsx examples/one-call.ts [DIR]
 *
 * DIR (created if missing) keeps the files; without it a temporary directory is used and removed.
 * In your own code, import from the package instead of the source tree:
 *
 *   import { convert, openImage, openDisk, exportToFile, checkImage, compareImages } from 'qcow2-stream';
 */

import { mkdirSync, mkdtempSync, openSync, closeSync, ftruncateSync, writeSync, rmSync, statSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convert, openImage, openDisk, exportToFile, checkImage, compareImages, isQcow2StreamError } from '../src/index.js';

const MiB = 1024 * 1024;

/** A 16 MiB sparse raw disk: random data at a few places, written zeros, holes in between. */
function makeRawDisk(path: string): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 16 * MiB); // all holes to start with
    writeSync(fd, randomBytes(1 * MiB), 0, 1 * MiB, 0); // "boot area"
    writeSync(fd, Buffer.alloc(2 * MiB), 0, 2 * MiB, 2 * MiB); // zeros actually written
    writeSync(fd, randomBytes(3 * MiB + 777), 0, 3 * MiB + 777, 6 * MiB); // ends mid-cluster
    writeSync(fd, randomBytes(4096), 0, 4096, 16 * MiB - 4096); // the last 4 KiB
  } finally {
    closeSync(fd);
  }
}

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qcow2-stream-one-call-'));
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'disk.raw');
  const qcow2 = join(dir, 'disk.qcow2');
  const data = join(dir, 'disk.data');
  const roundtrip = join(dir, 'roundtrip.raw');
  try {
    makeRawDisk(raw);

    // 1. The one call. The metadata goes to disk.qcow2, the guest data to disk.data at the same
    //    offsets it has in the guest (zero clusters stay holes). The header stores the data
    //    file relative to the image's directory ('disk.data'), so the pair can move together.
    const reported: number[] = [];
    const summary = await convert({
      input: raw,
      output: qcow2,
      dataFile: data,
      overwrite: true, // re-running in the same DIR replaces the previous data file
      progressInterval: 4 * MiB, // the default (32 MiB) is more than this whole disk
      onProgress: (p) => {
        reported.push(p.bytesDone);
        console.log(`  progress: ${p.bytesDone} of ${p.bytesTotal ?? '?'} bytes`);
      },
    });
    // Every 4 MiB read, or further at once where a hole is skipped without reading; then 100%.
    const increasing = reported.every((bytes, i) => i === 0 || bytes > reported[i - 1]!);
    if (reported.length < 3 || !increasing || reported.at(-1) !== 16 * MiB) {
      throw new Error(`progress was reported at ${reported.join(', ')} bytes`);
    }
    console.log(
      `converted ${summary.inputBytes} bytes in ${summary.seconds.toFixed(3)} s: ` +
        `${summary.clusters} clusters of ${summary.clusterSize / 1024} KiB, ` +
        `${summary.dataClusters} with data, ${summary.zeroClusters} zero (left as holes)`,
    );
    console.log(
      `  metadata ${summary.metadataBytesWritten} bytes (${summary.metadataLayout}), data file '${summary.dataFileName}': ` +
        `${summary.dataBytesWritten} bytes written, ${statSync(data).blocks * 512} bytes allocated on disk`,
    );

    // 2. A structural check of what was written (like `qemu-img check`).
    const check = await checkImage(qcow2);
    console.log(`check: ${check.clean ? 'clean' : `${check.corruptions} corruptions, ${check.leaks} leaks`}`);
    if (!check.clean) throw new Error(`the converted image is not clean: ${JSON.stringify(check.findings)}`);

    // 3. Back to raw. openImage() finds the data file through the name stored in the header.
    const image = await openImage(qcow2);
    const exported = await exportToFile(image, roundtrip).finally(() => image.close());
    console.log(`exported ${exported.bytes} bytes to roundtrip.raw (${exported.bytesWritten} written, the rest are holes)`);

    // 4. Compare the original with the round trip. openDisk() probes the format, so the same
    //    call also compares a raw file with a qcow2 directly.
    for (const [left, right] of [[raw, roundtrip], [raw, qcow2]] as const) {
      const a = await openDisk(left, { format: 'raw' });
      const b = await openDisk(right);
      try {
        const result = await compareImages(a, b);
        console.log(`compare ${b.format === 'raw' ? 'roundtrip.raw' : 'disk.qcow2'} with disk.raw: ${result.identical ? 'identical' : `differ at ${result.mismatchOffset}`}`);
        if (!result.identical) throw new Error(`${right} differs from ${left}`);
      } finally {
        await a.close();
        await b.close();
      }
    }
    console.log('one-call: ok');
  } finally {
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  // Library errors carry a stable code (QCOW_ERR_…) and often a hint.
  if (isQcow2StreamError(err)) console.error(`one-call failed: ${err.code}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
  else console.error('one-call failed:', err);
  process.exit(1);
});
