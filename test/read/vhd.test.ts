import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { readImageInfo } from '../../src/read/info.js';
import { convert } from '../../src/write/convert.js';
import { assertConvertsLikeQemu, assertReadsLikeQemu, qemuConvertTo, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuCheck, qemuImg, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;

test('VHD fixed and dynamic, odd sizes: export is qemu-img convert -O raw byte for byte; convert passes check and compare', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [i, size] of [5 * MiB + 3 * 512, 3 * MiB + 1000, 64 * 1024].entries()) {
    const raw = writeSourceRaw(dir, `in${i}.raw`, size, 20 + i);
    for (const sub of ['dynamic', 'fixed']) {
      const vhd = `d${i}-${sub}.vhd`;
      qemuConvertTo(dir, raw, vhd, 'vpc', `subformat=${sub}`);
      assert.equal(await assertReadsLikeQemu(dir, vhd, {}, 'vpc'), 'vpc');
      await assertConvertsLikeQemu(dir, vhd, {}, 'vpc');
    }
  }
  // Hyper-V's creator uses the footer's size, not the geometry; an empty dynamic disk is all holes.
  const empty = qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', 'empty.vhd', '7M'], dir);
  assert.equal(empty.code, 0, empty.stderr);
  await assertReadsLikeQemu(dir, 'empty.vhd', {}, 'vpc');
  const image = await openDisk(join(dir, 'empty.vhd'));
  const kinds = [];
  for await (const extent of image.extents()) kinds.push(extent.kind);
  await image.close();
  assert.deepEqual(kinds, ['unallocated']);
});

/** VHD checksum: one's complement of the byte sum, the checksum field excluded. */
function setChecksum(bytes: Buffer, field: number): void {
  bytes.writeUInt32BE(0, field);
  let sum = 0;
  for (const b of bytes) sum += b;
  bytes.writeUInt32BE(~sum >>> 0, field);
}

/**
 * Turns the dynamic VHD `childPath` into a differencing disk of `parentPath`: disk type 4,
 * the parent's UUID, a W2ru locator holding `storedName`, and the given bitmap bits cleared.
 */
function makeDifferencing(childPath: string, parentPath: string, storedName: string, clearSectors: number[]): void {
  const child = readFileSync(childPath);
  const parentFooter = readFileSync(parentPath).subarray(-512);
  const footer = Buffer.from(child.subarray(-512));
  footer.writeUInt32BE(4, 60);
  setChecksum(footer, 64);
  const dynOffset = Number(footer.readBigUInt64BE(16));
  const dyn = Buffer.from(child.subarray(dynOffset, dynOffset + 1024));
  parentFooter.copy(dyn, 40, 68, 84);
  const locatorAt = child.length - 512;
  const name = Buffer.from(storedName, 'utf16le');
  dyn.write('W2ru', 576, 'latin1');
  dyn.writeUInt32BE(512, 580);
  dyn.writeUInt32BE(name.length, 584);
  dyn.writeBigUInt64BE(BigInt(locatorAt), 592);
  setChecksum(dyn, 36);
  const out = Buffer.concat([child.subarray(0, locatorAt), Buffer.alloc(512), footer]);
  name.copy(out, locatorAt);
  footer.copy(out, 0);
  dyn.copy(out, dynOffset);
  // Clear bitmap bits: those sectors then come from the parent.
  const tableOffset = Number(dyn.readBigUInt64BE(16));
  const blockSize = dyn.readUInt32BE(32);
  for (const sector of clearSectors) {
    const block = Math.floor((sector * 512) / blockSize);
    const entry = out.readUInt32BE(tableOffset + block * 4);
    assert.notEqual(entry, 0xffffffff, 'the child block is allocated');
    const s = sector - (block * blockSize) / 512;
    out[entry * 512 + (s >> 3)]! &= ~(0x80 >> (s & 7));
  }
  writeFileSync(childPath, out);
}

test('VHD differencing: unallocated blocks and clear bitmap bits read from the parent, found by its locator', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 6 * MiB;
  writeSourceRaw(dir, 'parent.raw', size, 31);
  const childRaw = Buffer.alloc(size);
  childRaw.fill(0x77, 2 * MiB + 4096, 2 * MiB + 9000); // block 1 only
  childRaw.fill(0x78, 5 * MiB, 5 * MiB + 512); // block 2
  writeFileSync(join(dir, 'child.raw'), childRaw);
  qemuConvertTo(dir, 'parent.raw', 'parent.vhd', 'vpc', 'subformat=dynamic,force_size=on');
  qemuConvertTo(dir, 'child.raw', 'child.vhd', 'vpc', 'subformat=dynamic,force_size=on');
  const cleared = [(2 * MiB) / 512 + 3, (2 * MiB) / 512 + 9, (5 * MiB) / 512 + 1];
  makeDifferencing(join(dir, 'child.vhd'), join(dir, 'parent.vhd'), '.\\parent.vhd', cleared);

  const parent = readFileSync(join(dir, 'parent.raw'));
  const expected = Buffer.from(parent);
  for (const [start, end] of [[2 * MiB, 4 * MiB], [4 * MiB, 6 * MiB]] as const) {
    childRaw.copy(expected, start, start, end);
  }
  for (const sector of cleared) parent.copy(expected, sector * 512, sector * 512, sector * 512 + 512);

  const image = await openDisk(join(dir, 'child.vhd'));
  assert.equal(image.format, 'vpc');
  assert.equal(image.backing?.format, 'vpc');
  await exportToFile(image, join(dir, 'out.raw'), { sync: false });
  const depths = new Set<number>();
  for await (const extent of image.extents()) depths.add(extent.depth);
  await image.close();
  assert.ok(readFileSync(join(dir, 'out.raw')).equals(expected), 'export = parent overlaid with the child');
  assert.deepEqual([...depths].sort(), [0, 1]);

  await convert({ input: join(dir, 'child.vhd'), output: join(dir, 'c.qcow2'), sync: false });
  writeFileSync(join(dir, 'expected.raw'), expected);
  assert.equal(qemuCheck('c.qcow2', dir).code, 0);
  assert.equal(qemuImg(['compare', '-f', 'raw', 'expected.raw', 'c.qcow2'], dir).code, 0);

  // The parent's name goes through the path policy; a changed parent is refused by UUID.
  makeDifferencing(join(dir, 'child.vhd'), join(dir, 'parent.vhd'), '..\\..\\etc\\passwd', []);
  await assert.rejects(openDisk(join(dir, 'child.vhd')), { code: 'QCOW_ERR_PATH_POLICY' });
  // info inspects the disk without following the name it stores.
  const info = await readImageInfo(join(dir, 'child.vhd'));
  assert.equal(info.format, 'vpc');
  assert.equal(info.virtualSize, size);
  qemuConvertTo(dir, 'parent.raw', 'other.vhd', 'vpc', 'subformat=dynamic,force_size=on');
  await assert.rejects(openDisk(join(dir, 'child.vhd'), { backing: join(dir, 'other.vhd') }), { code: 'QCOW_ERR_CORRUPT_IMAGE', message: /UUID/ });
});

test('VHD: hostile sizes and offsets are typed errors', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 4 * MiB, 5);
  qemuConvertTo(dir, 'in.raw', 'd.vhd', 'vpc', 'subformat=dynamic');
  const good = readFileSync(join(dir, 'd.vhd'));
  const dynOffset = Number(good.readBigUInt64BE(16));
  const cases: Array<[string, (b: Buffer) => void, string]> = [
    ['huge BAT', (b) => b.writeUInt32BE(0x7fffffff, dynOffset + 28), 'QCOW_ERR_LIMIT_EXCEEDED'],
    ['block size 3', (b) => b.writeUInt32BE(3, dynOffset + 32), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['BAT past the end', (b) => b.writeBigUInt64BE(1n << 40n, dynOffset + 16), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['BAT entry past the end', (b) => b.writeUInt32BE(0x7ffffff0, Number(b.readBigUInt64BE(dynOffset + 16))), 'QCOW_ERR_CORRUPT_IMAGE'],
  ];
  for (const [name, mutate, code] of cases) {
    const bytes = Buffer.from(good);
    mutate(bytes);
    setChecksum(bytes.subarray(dynOffset, dynOffset + 1024), 36);
    writeFileSync(join(dir, 'bad.vhd'), bytes);
    await assert.rejects(
      (async () => {
        const image = await openDisk(join(dir, 'bad.vhd'));
        try {
          await image.read(0, image.virtualSize);
        } finally {
          await image.close();
        }
      })(),
      { code },
      name,
    );
  }
});
