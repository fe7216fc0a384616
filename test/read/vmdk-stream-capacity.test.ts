/**
 * The case the VMDK fuzz campaign stalled on, minimized: a streamOptimized header whose capacity
 * is 4 PiB (a mutation of the capacity's high word). A file with that header was refused (its
 * grain directory would need 512 MiB); the stream parser took it, and the hole it then yielded,
 * one 32 MiB zero run at a time, was 134 million Blocks long. Both now apply the same geometry
 * checks.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isQcow2StreamError } from '../../src/errors.js';
import { openDisk } from '../../src/read/image.js';
import { openStreamInput } from '../../src/write/stream-image.js';
import type { ReadTarget } from '../../src/write/sources.js';
import { tempDir } from '../helpers/qemu.js';

const SECTOR = 512;

/** A streamOptimized VMDK with no grains: header (GD at the end), footer marker, header copy, end-of-stream marker. */
function emptyStreamOptimized(capacitySectors: bigint): Buffer {
  const header = Buffer.alloc(SECTOR);
  header.writeUInt32LE(0x564d444b, 0); // KDMV
  header.writeUInt32LE(3, 4);
  header.writeUInt32LE((1 << 16) | (1 << 17) | 1, 8); // compressed, markers, valid newline test
  header.writeBigUInt64LE(capacitySectors, 12);
  header.writeBigUInt64LE(128n, 20); // 64 KiB grains
  header.writeUInt32LE(512, 44); // entries per grain table
  header.writeBigInt64LE(-1n, 56); // GD at the end
  header.writeBigUInt64LE(1n, 64); // overhead: the header
  header.writeUInt16LE(1, 77); // deflate
  const marker = (type: number, sectors: number) => {
    const m = Buffer.alloc(SECTOR);
    m.writeBigUInt64LE(BigInt(sectors), 0);
    m.writeUInt32LE(type, 12);
    return m;
  };
  const copy = Buffer.from(header);
  copy.writeBigInt64LE(0n, 56);
  return Buffer.concat([header, marker(3, 1), copy, marker(0, 0)]);
}

function memoryTarget(bytes: Uint8Array): ReadTarget {
  let pos = 0;
  return {
    name: 'standard input',
    positional: false,
    read: async (buffer, offset, length) => {
      const n = Math.min(length, bytes.length - pos);
      buffer.set(bytes.subarray(pos, pos + n), offset);
      pos += n;
      return n;
    },
  };
}

const limitExceeded = (err: unknown) => isQcow2StreamError(err) && err.code === 'QCOW_ERR_LIMIT_EXCEEDED' && /grain directory/.test(err.message);

test('a streamOptimized header declaring 4 PiB is refused from a pipe as from a file, before any Block', async (t) => {
  const hostile = emptyStreamOptimized(1n << 43n);
  const input = await openStreamInput(memoryTarget(hostile), 'vmdk', 65536);
  assert.equal(input.kind, 'blocks');
  if (input.kind !== 'blocks') return;
  await assert.rejects(input.size, limitExceeded);
  await assert.rejects(input.blocks.next(), limitExceeded);

  const dir = tempDir(t);
  writeFileSync(join(dir, 'hostile.vmdk'), hostile);
  await assert.rejects(openDisk(join(dir, 'hostile.vmdk')), limitExceeded);
});

test('the same header with a capacity the grain directory limit allows streams its holes', async () => {
  const input = await openStreamInput(memoryTarget(emptyStreamOptimized(2n * 1024n * 1024n * 2n)), 'vmdk', 65536);
  assert.equal(input.kind, 'blocks');
  if (input.kind !== 'blocks') return;
  assert.equal(await input.size, 2 * 1024 * 1024 * 1024);
  let bytes = 0;
  for await (const block of input.blocks) bytes += block.count === undefined ? block.data.length : block.count * 65536;
  assert.equal(bytes, 2 * 1024 * 1024 * 1024);
});
