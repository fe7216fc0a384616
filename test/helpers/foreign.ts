/**
 * Checks shared by the tests of every input format: a reader's export is byte for byte what
 * `qemu-img convert -O raw` makes of the same image, and convert() of it gives a qcow2 that
 * qemu-img checks clean and compares equal.
 */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk, type OpenDiskOptions } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { readImageInfo } from '../../src/read/info.js';
import { convert, type ConvertOptions } from '../../src/write/convert.js';
import { mixedExtents, writeRawImage } from './images.js';
import { qemuCheck, qemuImg } from './qemu.js';

/** A raw image of `size` bytes with random data, written zeros and holes (seeded). */
export function writeSourceRaw(dir: string, name: string, size: number, seed = 1, clusterSize = 65536): string {
  writeRawImage(join(dir, name), size, mixedExtents(size, clusterSize, seed), seed);
  return name;
}

/** `qemu-img convert -O format [-o options] src dst` in `dir`. */
export function qemuConvertTo(dir: string, src: string, dst: string, format: string, options?: string, srcFormat = 'raw'): void {
  const made = qemuImg(['convert', '-f', srcFormat, '-O', format, ...(options ? ['-o', options] : []), src, dst], dir);
  assert.equal(made.code, 0, `qemu-img convert -O ${format} ${options ?? ''}: ${made.stderr}`);
}

/** What qemu reads out of `image`: `qemu-img convert -O raw` into `<image>.qemu.raw`. */
export function qemuRaw(dir: string, image: string, format?: string): string {
  const out = `${image}.qemu.raw`;
  const made = qemuImg(['convert', ...(format ? ['-f', format] : []), '-O', 'raw', image, out], dir);
  assert.equal(made.code, 0, `qemu-img convert -O raw ${image}: ${made.stderr}`);
  return out;
}

/**
 * Opens `image` with our reader and checks it against qemu: the same virtual size, export
 * byte-identical to qemu's raw, extents contiguous and covering the disk, and every byte outside
 * the data extents zero. Returns the probed format.
 */
export async function assertReadsLikeQemu(dir: string, image: string, options: OpenDiskOptions = {}, qemuFormat?: string): Promise<string> {
  const expected = readFileSync(join(dir, qemuRaw(dir, image, qemuFormat)));
  const disk = await openDisk(join(dir, image), options);
  try {
    assert.equal(disk.virtualSize, expected.length, `${image}: virtual size`);
    const out = join(dir, `${image}.ours.raw`);
    await exportToFile(disk, out, { sync: false, overwrite: true });
    const ours = readFileSync(out);
    assert.equal(ours.length, expected.length);
    const at = firstDifference(ours, expected);
    assert.equal(at, -1, `${image}: export differs from qemu-img's at byte ${at}`);
    let pos = 0;
    for await (const extent of disk.extents()) {
      assert.equal(extent.start, pos, `${image}: extents are contiguous`);
      if (extent.kind !== 'data') {
        const nonZero = expected.subarray(extent.start, extent.start + extent.length).findIndex((b) => b !== 0);
        assert.equal(nonZero, -1, `${image}: a ${extent.kind} extent at ${extent.start} covers data`);
      }
      pos += extent.length;
    }
    assert.equal(pos, disk.virtualSize, `${image}: extents cover the disk`);
    // Random access: a few odd reads agree with qemu's bytes.
    for (const [offset, length] of [[1, 4095], [Math.floor(expected.length / 3), 70_001], [expected.length - 777, 777]] as const) {
      if (offset < 0 || offset + length > expected.length) continue;
      const got = await disk.read(offset, length);
      assert.ok(Buffer.from(got).equals(expected.subarray(offset, offset + length)), `${image}: read(${offset}, ${length})`);
    }
    // info names the same format and size without opening any parent.
    const info = await readImageInfo(join(dir, image), { format: options.format });
    assert.equal(info.format, disk.format, `${image}: info's format`);
    assert.equal(info.virtualSize, disk.virtualSize, `${image}: info's virtual size`);
    return disk.format;
  } finally {
    await disk.close();
  }
}

/** convert() of `image` gives a qcow2 qemu-img checks clean and compares equal to qemu's raw. */
export async function assertConvertsLikeQemu(dir: string, image: string, extra: Partial<ConvertOptions> = {}, qemuFormat?: string): Promise<void> {
  const expected = qemuRaw(dir, image, qemuFormat);
  const output = `${image}.out.qcow2`;
  await convert({ input: join(dir, image), output: join(dir, output), sync: false, ...(extra.layout === 'internal' ? {} : { dataFile: join(dir, `${image}.out.data`), dataFileName: `${image}.out.data` }), ...extra });
  const check = qemuCheck(output, dir);
  assert.equal(check.code, 0, `qemu-img check ${output}: ${check.stdout}${check.stderr}`);
  const compare = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', expected, output], dir);
  assert.equal(compare.code, 0, `qemu-img compare ${expected} ${output}: ${compare.stdout}${compare.stderr}`);
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let chunk = 0; chunk < n; chunk += 65536) {
    const end = Math.min(n, chunk + 65536);
    if (Buffer.compare(a.subarray(chunk, end), b.subarray(chunk, end)) !== 0) {
      for (let i = chunk; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return a.length === b.length ? -1 : n;
}

/**
 * Makes qemu's streamOptimized file look like VMware's: the first header's GD offset is
 * GD_AT_END and the file ends in a footer marker, a header copy with the GD offset, and an
 * end-of-stream marker.
 */
export function vmwareStyleStream(bytes: Buffer): Buffer {
  const header = Buffer.from(bytes.subarray(0, 512));
  const first = Buffer.from(header);
  first.writeBigInt64LE(-1n, 56);
  let end = bytes.length;
  while (end > 512 && bytes.subarray(end - 512, end).every((b) => b === 0)) end -= 512;
  const marker = (type: number, sectors: number) => {
    const m = Buffer.alloc(512);
    m.writeBigUInt64LE(BigInt(sectors), 0);
    m.writeUInt32LE(type, 12);
    return m;
  };
  // A GT marker with one (empty) sector of table, as VMware puts between grains.
  return Buffer.concat([first, bytes.subarray(512, end), marker(1, 1), Buffer.alloc(512), marker(3, 1), header, Buffer.alloc(512)]);
}
