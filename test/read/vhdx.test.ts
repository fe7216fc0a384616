import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk } from '../../src/read/image.js';
import { crc32c } from '../../src/read/vhdx-reader.js';
import { assertConvertsLikeQemu, assertReadsLikeQemu, qemuConvertTo, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuIo, tempDir } from '../helpers/qemu.js';

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
