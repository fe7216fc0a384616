/**
 * Random access to a qcow2 image: open it, read a few sectors where you need them (the MBR, a
 * range across a cluster boundary, a partition's first sector), and list its extents — what
 * a backup or forensics tool does to look inside an image without exporting it.
 *
 *   node --import tsx examples/read-sectors.ts [DIR]
 *
 * The example makes an 8 MiB raw disk with an MBR partition table, converts it to qcow2, then
 * reads through `openImage()` and checks every read against the raw file.
 *
 * DIR (created if missing) keeps the files; without it a temporary directory is used and removed.
 * In your own code, import from the package instead of the source tree:
 *
 *   import { convert, openImage, isQcow2StreamError } from 'qcow2-stream';
 */

import { closeSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convert, isQcow2StreamError, openImage } from '../src/index.js';

const SECTOR = 512;
const CLUSTER = 64 * 1024;
const DISK_SIZE = 8 * 1024 * 1024;

/** Partitions written into the MBR: [type, first LBA, sectors]. */
const PARTITIONS = [
  [0x83, 2048, 8192], // Linux, 1 MiB .. 5 MiB
  [0x82, 10240, 4096], // Linux swap, 5 MiB .. 7 MiB
] as const;

/** An 8 MiB raw disk: MBR + boot code in sectors 0..199 (crossing cluster 0's end), data at the start of each partition. */
function makeRawDisk(path: string): void {
  const mbr = Buffer.alloc(SECTOR);
  randomBytes(440).copy(mbr, 0); // boot code
  PARTITIONS.forEach(([type, lba, sectors], i) => {
    const entry = 446 + 16 * i;
    mbr[entry + 4] = type;
    mbr.writeUInt32LE(lba, entry + 8);
    mbr.writeUInt32LE(sectors, entry + 12);
  });
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, DISK_SIZE);
    writeSync(fd, mbr, 0, SECTOR, 0);
    writeSync(fd, randomBytes(199 * SECTOR), 0, 199 * SECTOR, SECTOR); // "stage 2" boot loader: 512..102400
    for (const [, lba] of PARTITIONS) writeSync(fd, randomBytes(256 * 1024), 0, 256 * 1024, lba * SECTOR); // file system heads
  } finally {
    closeSync(fd);
  }
}

/** The same bytes straight from the raw file, to check each read against. */
function rawBytes(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.alloc(length);
    readSync(fd, out, 0, length, offset);
    return out;
  } finally {
    closeSync(fd);
  }
}

function expectSame(what: string, actual: Uint8Array, expected: Buffer): void {
  if (!expected.equals(actual)) throw new Error(`${what}: the image reads differently from the raw disk`);
}

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qcow2-stream-read-sectors-'));
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'disk.raw');
  const qcow2 = join(dir, 'disk.qcow2');
  try {
    makeRawDisk(raw);
    // dataFileRaw: false leaves zero clusters unallocated, so extents() below tells data from
    // holes. (In the default raw mode every cluster maps to the data file: one data extent.)
    await convert({ input: raw, output: qcow2, dataFile: join(dir, 'disk.data'), dataFileRaw: false, overwrite: true });

    const image = await openImage(qcow2);
    try {
      console.log(`opened disk.qcow2: ${image.virtualSize} bytes, ${image.clusterSize / 1024} KiB clusters, data file ${image.dataFilePath}`);

      // 1. Sector 0: the MBR. read() returns a new Uint8Array of exactly the bytes asked for.
      const mbr = Buffer.from(await image.read(0, SECTOR));
      expectSame('sector 0', mbr, rawBytes(raw, 0, SECTOR));
      if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) throw new Error('sector 0 has no MBR signature');
      console.log('sector 0: MBR signature 55 aa; partitions:');
      for (let i = 0; i < 4; i++) {
        const entry = 446 + 16 * i;
        const type = mbr[entry + 4]!;
        if (type === 0) continue;
        const lba = mbr.readUInt32LE(entry + 8);
        const sectors = mbr.readUInt32LE(entry + 12);
        console.log(`  ${i + 1}: type 0x${type.toString(16)}, sectors ${lba}..${lba + sectors - 1} (${(sectors * SECTOR) / 1024} KiB)`);
        const expected = PARTITIONS[i];
        if (!expected || expected[0] !== type || expected[1] !== lba || expected[2] !== sectors) throw new Error(`partition ${i + 1} reads wrong`);

        // 2. The partition's first sector, by LBA (where a file system keeps its superblock).
        const first = await image.read(lba * SECTOR, SECTOR);
        expectSame(`partition ${i + 1}, first sector`, first, rawBytes(raw, lba * SECTOR, SECTOR));
      }

      // 3. Sectors 126..129: the read crosses the end of cluster 0 (byte 65536) into cluster 1;
      //    readInto() fills a buffer you own, useful in a loop.
      const across = Buffer.alloc(4 * SECTOR);
      await image.readInto(across, CLUSTER - 2 * SECTOR);
      expectSame('sectors 126..129', across, rawBytes(raw, CLUSTER - 2 * SECTOR, 4 * SECTOR));
      console.log(`sectors 126..129 (across the cluster boundary at ${CLUSTER}): ${across.subarray(2 * SECTOR - 4, 2 * SECTOR + 4).toString('hex')} around the boundary, same as the raw disk`);

      // 4. A never-written sector reads as zeros, without touching the data file.
      const empty = await image.read(7 * 1024 * 1024, SECTOR);
      if (empty.some((byte) => byte !== 0)) throw new Error('an unallocated sector did not read as zeros');
      console.log('sector 14336 (never written): all zeros');

      // 5. Out-of-range reads are refused with a coded error, not a short buffer.
      try {
        await image.read(image.virtualSize - SECTOR, 2 * SECTOR);
        throw new Error('a read past the end succeeded');
      } catch (err) {
        if (!isQcow2StreamError(err) || err.code !== 'QCOW_ERR_INVALID_ARGUMENT') throw err;
        console.log(`read past the end: ${err.code}`);
      }

      // 6. The map: coalesced runs of data / zero / unallocated (like `qemu-img map`).
      console.log('extents:');
      let dataBytes = 0;
      for await (const extent of image.extents()) {
        const where = extent.kind === 'data' ? ` at offset ${extent.hostOffset} of ${extent.file}` : '';
        console.log(`  ${String(extent.start).padStart(8)} +${String(extent.length).padEnd(8)} ${extent.kind}${where}`);
        if (extent.kind === 'data') dataBytes += extent.length;
      }
      // Clusters 0-1 (boot area) and 4 clusters per partition hold data.
      if (dataBytes !== 10 * CLUSTER) throw new Error(`expected ${10 * CLUSTER} bytes of data extents, got ${dataBytes}`);
    } finally {
      await image.close();
    }
    console.log('read-sectors: ok');
  } finally {
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  if (isQcow2StreamError(err)) console.error(`read-sectors failed: ${err.code}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
  else console.error('read-sectors failed:', err);
  process.exit(1);
});
