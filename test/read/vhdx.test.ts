import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk } from '../../src/read/image.js';
import { crc32c, guidAt } from '../../src/read/vhdx-reader.js';
import { convert } from '../../src/write/convert.js';
import { assertConvertsLikeQemu, assertReadsLikeQemu, qemuConvertTo, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;

test('CRC-32C is the Castagnoli CRC (check value of "123456789")', () => {
  assert.equal(crc32c(new TextEncoder().encode('123456789')), 0xe3069283);
});

test('VHDX dynamic and fixed, odd sizes and 1 MiB blocks: export is qemu-img convert -O raw byte for byte; convert passes check and compare', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [i, size] of [9 * MiB + 3 * 512, 2 * MiB + 512].entries()) {
    const raw = writeSourceRaw(dir, `in${i}.raw`, size, 70 + i, 1024 * 1024);
    for (const sub of ['dynamic', 'fixed']) {
      const vhdx = `x${i}-${sub}.vhdx`;
      qemuConvertTo(dir, raw, vhdx, 'vhdx', `subformat=${sub},block_size=1M`);
      assert.equal(await assertReadsLikeQemu(dir, vhdx), 'vhdx', sub);
      await assertConvertsLikeQemu(dir, vhdx);
    }
  }
  // Zeroed blocks (qemu-io write -z) read as zeros.
  assert.equal(qemuIo(['-c', 'write -z 1M 2M', 'x0-dynamic.vhdx'], dir).code, 0);
  await assertReadsLikeQemu(dir, 'x0-dynamic.vhdx');
});

/** Rewrites the CRC-32C at byte 4 of a VHDX structure of `size` bytes at `at`. */
function reChecksum(bytes: Buffer, at: number, size: number): void {
  bytes.writeUInt32LE(0, at + 4);
  bytes.writeUInt32LE(crc32c(bytes.subarray(at, at + size)), at + 4);
}

test('VHDX: a dirty log is refused with the fix named; hostile fields are typed errors', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 3 * MiB, 8);
  qemuConvertTo(dir, 'in.raw', 'x.vhdx', 'vhdx', 'block_size=1M');
  const good = readFileSync(join(dir, 'x.vhdx'));
  const headers = [64 * 1024, 128 * 1024];
  const region = 192 * 1024;
  const bothHeaders = (mutate: (b: Buffer, at: number) => void) => (b: Buffer) => {
    for (const at of headers) {
      mutate(b, at);
      reChecksum(b, at, 4096);
    }
  };
  const regionEntry = (b: Buffer, guidFirst: number) => {
    const count = b.readUInt32LE(region + 8);
    for (let i = 0; i < count; i++) if (b.readUInt32LE(region + 16 + i * 32) === guidFirst) return region + 16 + i * 32;
    throw new Error('region not found');
  };
  const cases: Array<[string, (b: Buffer) => void, string, RegExp?]> = [
    ['dirty log', bothHeaders((b, at) => b.fill(0x11, at + 48, at + 64)), 'QCOW_ERR_UNSUPPORTED_FEATURE', /qemu-img check -r all/],
    ['version 2', bothHeaders((b, at) => b.writeUInt16LE(2, at + 66)), 'QCOW_ERR_UNSUPPORTED_FEATURE'],
    ['no valid header', (b) => headers.forEach((at) => b.fill(0, at, at + 8)), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['no valid region table', (b) => [region, region + 65536].forEach((at) => b.fill(0, at + 4, at + 8)), 'QCOW_ERR_CORRUPT_IMAGE'],
    [
      'BAT region past the end',
      (b) => {
        for (const at of [region, region + 65536]) {
          b.writeBigUInt64LE(1n << 40n, regionEntry(b, 0x2dc27766) - region + at + 16);
          reChecksum(b, at, 65536);
        }
      },
      'QCOW_ERR_CORRUPT_IMAGE',
    ],
    [
      'region count',
      (b) => {
        for (const at of [region, region + 65536]) {
          b.writeUInt32LE(5000, at + 8);
          reChecksum(b, at, 65536);
        }
      },
      'QCOW_ERR_CORRUPT_IMAGE',
    ],
    [
      'BAT entry past the end',
      (b) => {
        const bat = Number(b.readBigUInt64LE(regionEntry(b, 0x2dc27766) + 16));
        b.writeBigUInt64LE((1n << 40n) | 6n, bat);
      },
      'QCOW_ERR_CORRUPT_IMAGE',
    ],
    [
      'unknown block state',
      (b) => {
        const bat = Number(b.readBigUInt64LE(regionEntry(b, 0x2dc27766) + 16));
        b.writeBigUInt64LE(5n, bat);
      },
      'QCOW_ERR_CORRUPT_IMAGE',
    ],
  ];
  for (const [name, mutate, code, message] of cases) {
    const bytes = Buffer.from(good);
    mutate(bytes);
    writeFileSync(join(dir, 'bad.vhdx'), bytes);
    await assert.rejects(
      (async () => {
        const image = await openDisk(join(dir, 'bad.vhdx'));
        try {
          await image.read(0, image.virtualSize);
        } finally {
          await image.close();
        }
      })(),
      (err: { code?: string; message?: string }) => {
        assert.equal(err.code, code, `${name}: ${err.message}`);
        if (message) assert.match(`${err.message} ${(err as { hint?: string }).hint}`, message);
        return true;
      },
    );
  }
});

/** The 16 on-disk bytes of a GUID (first three fields little-endian). */
function guidBytes(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  const b = Buffer.from(hex, 'hex');
  return Buffer.concat([Buffer.from(b.subarray(0, 4)).reverse(), Buffer.from(b.subarray(4, 6)).reverse(), Buffer.from(b.subarray(6, 8)).reverse(), b.subarray(8)]);
}

/**
 * Turns the dynamic VHDX `child` into a differencing disk of the VHDX `parent`: HasParent in the
 * file parameters, a parent locator (relative_path, parent_linkage), the BAT's sector-bitmap
 * entry pointing at a new bitmap block, and block `partialBlock` partially present with
 * `presentSectors` (sector numbers within the disk) marked present.
 */
function makeDifferencingVhdx(childPath: string, parentPath: string, storedName: string, partialBlock: number, presentSectors: number[]): Buffer {
  let child = readFileSync(childPath);
  const parent = readFileSync(parentPath);
  const headerOf = (b: Buffer) => [64 * 1024, 128 * 1024].map((at) => ({ at, seq: b.readBigUInt64LE(at + 8) })).sort((x, y) => (x.seq > y.seq ? -1 : 1))[0]!.at;
  const parentDataWrite = parent.subarray(headerOf(parent) + 32, headerOf(parent) + 48);
  const region = 192 * 1024;
  const regionOf = (first: number) => {
    for (let i = 0; i < child.readUInt32LE(region + 8); i++) {
      const e = region + 16 + i * 32;
      if (child.readUInt32LE(e) === first) return { offset: Number(child.readBigUInt64LE(e + 16)), length: child.readUInt32LE(e + 24) };
    }
    throw new Error('region');
  };
  const bat = regionOf(0x2dc27766);
  const meta = regionOf(0x8b7ca206);
  // Metadata: HasParent, and a parent locator item after the last item.
  const count = child.readUInt16LE(meta.offset + 10);
  let freeAt = 64 * 1024;
  for (let i = 0; i < count; i++) {
    const e = meta.offset + 32 + i * 32;
    if (child.readUInt32LE(e) === 0xcaa16737) {
      const at = meta.offset + child.readUInt32LE(e + 16);
      child.writeUInt32LE(child.readUInt32LE(at + 4) | 2, at + 4);
    }
    freeAt = Math.max(freeAt, child.readUInt32LE(e + 16) + child.readUInt32LE(e + 20));
  }
  freeAt = Math.ceil(freeAt / 8) * 8;
  const pairs: Array<[string, string]> = [
    ['parent_linkage', `{${guidAt(parentDataWrite, 0)}}`],
    ['relative_path', storedName],
  ];
  const keyValues: Buffer[] = [];
  const entries = Buffer.alloc(pairs.length * 12);
  let at = 20 + entries.length;
  pairs.forEach(([key, value], i) => {
    const k = Buffer.from(key, 'utf16le');
    const v = Buffer.from(value, 'utf16le');
    entries.writeUInt32LE(at, i * 12);
    entries.writeUInt32LE(at + k.length, i * 12 + 4);
    entries.writeUInt16LE(k.length, i * 12 + 8);
    entries.writeUInt16LE(v.length, i * 12 + 10);
    keyValues.push(k, v);
    at += k.length + v.length;
  });
  const locatorHeader = Buffer.alloc(20);
  guidBytes('b04aefb7-d19e-4a81-b789-25b8e9445913').copy(locatorHeader, 0);
  locatorHeader.writeUInt16LE(pairs.length, 18);
  const locator = Buffer.concat([locatorHeader, entries, ...keyValues]);
  locator.copy(child, meta.offset + freeAt);
  const entry = meta.offset + 32 + count * 32;
  guidBytes('a8d35f2d-b30b-454d-abf7-d3d84834ab0c').copy(child, entry);
  child.writeUInt32LE(freeAt, entry + 16);
  child.writeUInt32LE(locator.length, entry + 20);
  child.writeUInt32LE(4, entry + 24); // IsRequired
  child.writeUInt16LE(count + 1, meta.offset + 10);
  // A sector bitmap block at the end of the file, and its BAT entry after the chunk's payload entries.
  const bitmapAt = Math.ceil(child.length / MiB) * MiB;
  child = Buffer.concat([child, Buffer.alloc(bitmapAt + MiB - child.length)]);
  const chunkRatio = 4096; // 2^23 × 512-byte sectors / 1 MiB blocks
  child.writeBigUInt64LE(BigInt(bitmapAt / MiB) * (1n << 20n) | 6n, bat.offset + chunkRatio * 8);
  for (const sector of presentSectors) child[bitmapAt + (sector >> 3)]! |= 1 << (sector & 7);
  const entryAt = bat.offset + partialBlock * 8;
  child.writeBigUInt64LE((child.readBigUInt64LE(entryAt) & ~7n) | 7n, entryAt);
  writeFileSync(childPath, child);
  return child;
}

test('VHDX differencing: not-present blocks and clear bitmap bits read from the parent, found by its locator and linkage', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  writeSourceRaw(dir, 'parent.raw', size, 77, MiB);
  const childRaw = Buffer.alloc(size);
  childRaw.fill(0x51, MiB + 1000, MiB + 300_000); // block 1 (made partially present below)
  childRaw.fill(0x52, 3 * MiB, 3 * MiB + 4096); // block 3, fully present
  writeFileSync(join(dir, 'child.raw'), childRaw);
  qemuConvertTo(dir, 'parent.raw', 'parent.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  qemuConvertTo(dir, 'child.raw', 'child.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  const present = [MiB / 512 + 1, MiB / 512 + 2, MiB / 512 + 300];
  const child = makeDifferencingVhdx(join(dir, 'child.vhdx'), join(dir, 'parent.vhdx'), '.\\parent.vhdx', 1, present);

  // Expected: per block state, from the child's own BAT.
  const parentRaw = readFileSync(join(dir, 'parent.raw'));
  const expected = Buffer.alloc(size);
  const region = 192 * 1024;
  let batOffset = 0;
  for (let i = 0; i < child.readUInt32LE(region + 8); i++) {
    if (child.readUInt32LE(region + 16 + i * 32) === 0x2dc27766) batOffset = Number(child.readBigUInt64LE(region + 16 + i * 32 + 16));
  }
  for (let block = 0; block < 4; block++) {
    const state = Number(child.readBigUInt64LE(batOffset + block * 8) & 7n);
    const [from, to] = [block * MiB, (block + 1) * MiB];
    if (state === 0) parentRaw.copy(expected, from, from, to);
    else if (state === 6) childRaw.copy(expected, from, from, to);
    else if (state === 7) {
      parentRaw.copy(expected, from, from, to);
      for (const s of present) childRaw.copy(expected, s * 512, s * 512, s * 512 + 512);
    }
  }
  const image = await openDisk(join(dir, 'child.vhdx'));
  assert.equal(image.backing?.format, 'vhdx');
  const got = await image.read(0, size);
  await image.close();
  assert.ok(Buffer.from(got).equals(expected), 'the child over its parent');
  assert.notEqual(Number(child.readBigUInt64LE(batOffset + 8) & 7n), 0, 'block 1 is in the child');

  await convert({ input: join(dir, 'child.vhdx'), output: join(dir, 'c.qcow2'), sync: false });
  writeFileSync(join(dir, 'expected.raw'), expected);
  assert.equal(qemuImg(['compare', '-f', 'raw', 'expected.raw', 'c.qcow2'], dir).code, 0);

  // A different parent (another data-write GUID) is refused; so is a name leaving the directory.
  qemuConvertTo(dir, 'parent.raw', 'other.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  await assert.rejects(openDisk(join(dir, 'child.vhdx'), { backing: join(dir, 'other.vhdx') }), { code: 'QCOW_ERR_CORRUPT_IMAGE', message: /data-write GUID/ });
  qemuConvertTo(dir, 'child.raw', 'child2.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  makeDifferencingVhdx(join(dir, 'child2.vhdx'), join(dir, 'parent.vhdx'), '..\\..\\etc\\passwd', 1, []);
  await assert.rejects(openDisk(join(dir, 'child2.vhdx')), { code: 'QCOW_ERR_PATH_POLICY' });
});
