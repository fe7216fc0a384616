/**
 * Nightly incremental backups of a disk: night 1 is a full conversion, every later night an
 * overlay of the night before that stores only the clusters that changed.
 *
 *   node --import tsx examples/nightly-incremental.ts [DIR]
 *
 * - Night 1: `convert()` with `manifest`: besides the image it records the fingerprint (XXH64)
 *   of every cluster in night-1.manifest (8 bytes per cluster).
 * - Night N: `convert()` with `base: night-(N-1).qcow2` and `baseManifest: night-(N-1).manifest`.
 *   Each cluster of tonight's disk is fingerprinted and compared with the manifest, so
 *   yesterday's image is not read at all; clusters equal to yesterday's stay unallocated and
 *   read through the backing file. Tonight's manifest is written for tomorrow.
 *   (Without `baseManifest`, the base image is read and compared byte for byte: slower, but
 *   immune to hash collisions a hostile guest could craft; see transforms/manifest.ts.)
 * - Each night's image is opened (with its chain of backing files) and compared with that
 *   night's disk.
 *
 * The data-file and backing-file names stored in each image are bare names (`night-1.qcow2`),
 * resolved in the image's own directory, so the backup directory can be moved as a whole. DIR (created if missing) keeps the files; without it a
 * temporary directory is used and removed. In your own code, import from the package instead:
 *
 *   import { convert, openImage, openDisk, compareImages, checkImage } from 'qcow2-stream';
 */

import { closeSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkImage, compareImages, convert, isQcow2StreamError, openDisk, openImage } from '../src/index.js';

const CLUSTER = 64 * 1024;
const DISK_SIZE = 32 * 1024 * 1024; // 512 clusters

/** Bytes actually allocated on disk (data files are sparse: their length is the full disk). */
const allocated = (path: string) => statSync(path).blocks * 512;
const kib = (bytes: number) => `${Math.round(bytes / 1024)} KiB`;

/** The live disk on night 1: 12 MiB of data in a few places, the rest never written. */
function createDisk(path: string): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, DISK_SIZE);
    for (const [at, length] of [[0, 4 << 20], [10 << 20, 6 << 20], [24 << 20, 2 << 20]] as const) {
      writeSync(fd, randomBytes(length), 0, length, at);
    }
  } finally {
    closeSync(fd);
  }
}

/** A day of activity: a few clusters rewritten, one grown into free space, one zeroed (deleted). */
function changeDisk(path: string, night: number): number {
  const fd = openSync(path, 'r+');
  const changed = [3 + night, 50 + night, 170 + 7 * night, 300 + night];
  try {
    for (const cluster of changed) writeSync(fd, randomBytes(CLUSTER), 0, CLUSTER, cluster * CLUSTER);
    writeSync(fd, randomBytes(1000), 0, 1000, (100 + night) * CLUSTER + 5000); // a partial write
    writeSync(fd, Buffer.alloc(CLUSTER), 0, CLUSTER, (60 + night) * CLUSTER); // data → zeros
  } finally {
    closeSync(fd);
  }
  return changed.length + 2;
}

async function verify(qcow2: string, raw: string): Promise<void> {
  const check = await checkImage(qcow2);
  if (!check.clean) throw new Error(`${qcow2} is not clean: ${JSON.stringify(check.findings)}`);
  // openImage follows the chain: night-3 → night-2 → night-1 (names resolved in their directory).
  const image = await openImage(qcow2);
  const disk = await openDisk(raw, { format: 'raw' });
  try {
    const result = await compareImages(image, disk);
    if (!result.identical) throw new Error(`${qcow2} differs from the disk at byte ${result.mismatchOffset}`);
  } finally {
    await image.close();
    await disk.close();
  }
}

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qcow2-stream-nightly-'));
  const backups = join(dir, 'backups');
  mkdirSync(backups, { recursive: true });
  const disk = join(dir, 'disk.raw'); // stands in for the live disk (an LVM snapshot, say)
  const name = (night: number, ext: string) => join(backups, `night-${night}.${ext}`);
  try {
    createDisk(disk);
    for (let night = 1; night <= 3; night++) {
      if (night > 1) console.log(`day ${night}: ${changeDisk(disk, night)} clusters of the disk changed`);
      const summary = await convert({
        input: disk,
        output: name(night, 'qcow2'),
        dataFile: name(night, 'data'), // stored as night-N.data: relative to the image's directory
        overwrite: true,
        manifest: name(night, 'manifest'), // for tomorrow's comparison
        // From night 2 on: an overlay of last night's image, compared through its manifest.
        // baseName is the backing-file name stored in the header: a bare name, resolved next to
        // the overlay (with an absolute `base` path, the default stores that absolute path).
        ...(night > 1 ? { base: name(night - 1, 'qcow2'), baseName: `night-${night - 1}.qcow2`, baseManifest: name(night - 1, 'manifest') } : {}),
      });
      await verify(name(night, 'qcow2'), disk);
      const stored = allocated(name(night, 'data'));
      console.log(
        night === 1
          ? `night 1 (full):        ${summary.dataClusters} data clusters, data file ${kib(stored)} on disk`
          : `night ${night} (incremental): ${summary.dataClusters} data clusters stored, ` +
              `${summary.unchangedClusters} unchanged read from ${summary.backingFile}, ` +
              `${summary.zeroClusters} zero; data file ${kib(stored)} on disk`,
      );
      console.log(`  night-${night}.qcow2 reads identical to the disk (${kib(allocated(name(night, 'qcow2')))} of metadata, ${kib(allocated(name(night, 'manifest')))} manifest)`);
      // The whole point: an incremental night stores a small fraction of a full backup.
      if (night > 1 && stored > allocated(name(1, 'data')) / 10) throw new Error(`night ${night} stored ${stored} bytes: too much for an incremental`);
    }
    console.log('nightly-incremental: ok');
  } finally {
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  if (isQcow2StreamError(err)) console.error(`nightly-incremental failed: ${err.code}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
  else console.error('nightly-incremental failed:', err);
  process.exit(1);
});
