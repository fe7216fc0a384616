/**
 * Hostile and broken images: each is refused with a typed error naming the problem, quickly,
 * and a failed export leaves nothing behind.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { openImage, type OpenImageOptions } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { isQcow2StreamError, type ErrorCode } from '../../src/errors.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, locate, readU64, writeBytes, writeU32, writeU64 } from './fixtures.js';

const COPIED = 1n << 63n;

/** Opens and exports `image`; resolves when both succeed. */
async function openAndExport(dir: string, image: string, options: OpenImageOptions = {}): Promise<void> {
  const opened = await openImage(join(dir, image), options);
  try {
    await exportToFile(opened, join(dir, 'out.raw'), { overwrite: true });
  } finally {
    await opened.close();
  }
}

async function assertRefused(dir: string, image: string, code: ErrorCode, message: RegExp, options: OpenImageOptions = {}): Promise<void> {
  rmSync(join(dir, 'out.raw'), { force: true }); // left by a successful export before this one
  await assert.rejects(openAndExport(dir, image, options), (err: unknown) => {
    assert.ok(isQcow2StreamError(err), `expected our error, got ${String(err)}`);
    assert.equal(err.code, code, `${image}: ${err.message}`);
    assert.match(err.message, message);
    return true;
  });
  const left = readdirSync(dir).filter((name) => name.startsWith('out.raw') || name.includes('.partial'));
  assert.deepEqual(left, [], 'a failed export must leave no output behind');
}

/** A small data-file image and an internal one to patch copies of. */
function baseImages(dir: string): void {
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '1M');
  io(dir, 'ext.qcow2', 'write -P 0x11 0 256k');
  img(dir, 'create', '-f', 'qcow2', 'int.qcow2', '1M');
  io(dir, 'int.qcow2', 'write -P 0x22 0 256k');
}

function copy(dir: string, from: string, to: string): string {
  copyFileSync(join(dir, from), join(dir, to));
  return join(dir, to);
}

test('header refusals: magic, version, cluster bits, header length, encryption, unknown features', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  baseImages(dir);
  writeU32(copy(dir, 'int.qcow2', 'magic.qcow2'), 0, 0x12345678);
  await assertRefused(dir, 'magic.qcow2', 'QCOW_ERR_BAD_MAGIC', /Not a qcow2 image/);
  writeU32(copy(dir, 'int.qcow2', 'v4.qcow2'), 4, 4);
  await assertRefused(dir, 'v4.qcow2', 'QCOW_ERR_UNSUPPORTED_VERSION', /version 4/);
  writeU32(copy(dir, 'int.qcow2', 'cb22.qcow2'), 20, 22);
  await assertRefused(dir, 'cb22.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /cluster size: 2\^22/);
  writeU32(copy(dir, 'int.qcow2', 'hl.qcow2'), 100, 108);
  await assertRefused(dir, 'hl.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /header_length 108/);
  writeU32(copy(dir, 'int.qcow2', 'crypt.qcow2'), 32, 1);
  await assertRefused(dir, 'crypt.qcow2', 'QCOW_ERR_UNSUPPORTED_FEATURE', /encrypted/);
  const unknown = copy(dir, 'int.qcow2', 'bit5.qcow2');
  writeU64(unknown, 72, readU64(unknown, 72) | (1n << 5n));
  await assertRefused(dir, 'bit5.qcow2', 'QCOW_ERR_UNSUPPORTED_FEATURE', /Unknown incompatible feature: 5/);
  // Named from the image's own feature table: relabel qemu's "dirty bit" entry as bit 5.
  const named = copy(dir, 'int.qcow2', 'named.qcow2');
  const table = Buffer.from('dirty bit');
  const head = readFileSync(named).subarray(0, 4096);
  const at = head.indexOf(table);
  writeBytes(named, at - 1, Buffer.from([5]));
  writeBytes(named, at, Buffer.from('shiny new'));
  writeU64(named, 72, readU64(named, 72) | (1n << 5n));
  await assertRefused(dir, 'named.qcow2', 'QCOW_ERR_UNSUPPORTED_FEATURE', /shiny new/);
  writeU64(copy(dir, 'int.qcow2', 'rawbit.qcow2'), 88, 2n);
  await assertRefused(dir, 'rawbit.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /raw-external-data bit .* no external data file/);
});

test('table refusals: L1 and refcount table sizes and offsets, snapshots with a data file', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  baseImages(dir);
  const { header } = locate(join(dir, 'int.qcow2'));
  writeU32(copy(dir, 'int.qcow2', 'l1big.qcow2'), 36, 5_000_000);
  await assertRefused(dir, 'l1big.qcow2', 'QCOW_ERR_LIMIT_EXCEEDED', /L1 table too large/);
  writeU32(copy(dir, 'int.qcow2', 'l1small.qcow2'), 36, 0);
  await assertRefused(dir, 'l1small.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /L1 table is too small/);
  writeU64(copy(dir, 'int.qcow2', 'l1align.qcow2'), 40, BigInt(header.l1TableOffset + 512));
  await assertRefused(dir, 'l1align.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /L1 table offset invalid/);
  writeU64(copy(dir, 'int.qcow2', 'l1far.qcow2'), 40, 1n << 40n);
  await assertRefused(dir, 'l1far.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /L1 table offset invalid/);
  writeU32(copy(dir, 'int.qcow2', 'rtbig.qcow2'), 56, 129);
  await assertRefused(dir, 'rtbig.qcow2', 'QCOW_ERR_LIMIT_EXCEEDED', /Reference count table too large/);
  writeU64(copy(dir, 'int.qcow2', 'rtfar.qcow2'), 48, 1n << 30n);
  await assertRefused(dir, 'rtfar.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /Reference count table offset invalid/);
  const snap = copy(dir, 'ext.qcow2', 'snap.qcow2');
  writeU32(snap, 60, 1);
  writeU64(snap, 64, 65536n);
  await assertRefused(dir, 'snap.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /snapshot.*data file/);
});

test('mapping refusals: data-file rules, misaligned or out-of-file L2 tables, reserved bits', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  baseImages(dir);
  const ext = locate(join(dir, 'ext.qcow2'));
  writeU64(copy(dir, 'ext.qcow2', 'hostguest.qcow2'), ext.l2EntryOffset(1), 0x20000n | COPIED);
  await assertRefused(dir, 'hostguest.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /does not match guest cluster offset/);
  writeU64(copy(dir, 'ext.qcow2', 'comp.qcow2'), ext.l2EntryOffset(2), (1n << 62n) | 0x30000n);
  await assertRefused(dir, 'comp.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /Compressed cluster .* external data file/);
  writeU64(copy(dir, 'ext.qcow2', 'reserved.qcow2'), ext.l2EntryOffset(0), COPIED | (1n << 56n));
  await assertRefused(dir, 'reserved.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /reserved bits/);
  const l2 = BigInt(ext.l2TableOffset(0));
  writeU64(copy(dir, 'ext.qcow2', 'l2align.qcow2'), ext.l1EntryOffset(0), (l2 + 512n) | COPIED);
  await assertRefused(dir, 'l2align.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /not cluster-aligned/);
  writeU64(copy(dir, 'ext.qcow2', 'l2far.qcow2'), ext.l1EntryOffset(0), (1n << 40n) | COPIED);
  await assertRefused(dir, 'l2far.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /beyond the end of the image file/);
  const int = locate(join(dir, 'int.qcow2'));
  writeU64(copy(dir, 'int.qcow2', 'dataalign.qcow2'), int.l2EntryOffset(0), BigInt(int.l2TableOffset(0) + 4096) | COPIED);
  await assertRefused(dir, 'dataalign.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /not cluster-aligned/);
});

test('a compressed cluster claiming the largest size over garbage fails fast and bounded', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=2M', 'c.qcow2', '4M');
  io(dir, 'c.qcow2', 'write -P 0x33 0 4k');
  const c = locate(join(dir, 'c.qcow2'));
  // x = 62 - (21 - 8) = 49: all 13 sector-count bits set, stream at byte 0 (the header).
  const descriptor = (1n << 62n) | (((1n << 13n) - 1n) << 49n);
  writeU64(join(dir, 'c.qcow2'), c.l2EntryOffset(1), descriptor);
  const started = Date.now();
  await assertRefused(dir, 'c.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /Compressed cluster at byte 0/);
  assert.ok(Date.now() - started < 5000);
});

test('backing chains: a loop, an image that is its own backing, and the depth limit', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'self.qcow2', '1M');
  img(dir, 'rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', 'self.qcow2');
  await assertRefused(dir, 'self.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /backing chain loops/);
  img(dir, 'create', '-f', 'qcow2', 'a.qcow2', '1M');
  img(dir, 'create', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'b.qcow2', '1M');
  img(dir, 'rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'a.qcow2');
  await assertRefused(dir, 'b.qcow2', 'QCOW_ERR_CORRUPT_IMAGE', /backing chain loops/);
  img(dir, 'create', '-f', 'qcow2', 'c0.qcow2', '1M');
  img(dir, 'create', '-f', 'qcow2', '-b', 'c0.qcow2', '-F', 'qcow2', 'c1.qcow2', '1M');
  img(dir, 'create', '-f', 'qcow2', '-b', 'c1.qcow2', '-F', 'qcow2', 'c2.qcow2', '1M');
  // The limit counts every image of the chain, the top one included: c2 → c1 → c0 is 3.
  await assertRefused(dir, 'c2.qcow2', 'QCOW_ERR_LIMIT_EXCEEDED', /holds more than 2 images/, { maxChainDepth: 2 });
  await openAndExport(dir, 'c2.qcow2', { maxChainDepth: 3 });
  // A raw file at the bottom counts too.
  img(dir, 'create', '-f', 'raw', 'r.raw', '1M');
  img(dir, 'create', '-f', 'qcow2', '-b', 'r.raw', '-F', 'raw', 'over-raw.qcow2', '1M');
  await assertRefused(dir, 'over-raw.qcow2', 'QCOW_ERR_LIMIT_EXCEEDED', /holds more than 1 images/, { maxChainDepth: 1 });
  await openAndExport(dir, 'over-raw.qcow2', { maxChainDepth: 2 });
});

test('a data file given for an image without one, and a data-file image without a name, are refused', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  baseImages(dir);
  await assertRefused(dir, 'int.qcow2', 'QCOW_ERR_INVALID_ARGUMENT', /has no external data file/, { dataFile: join(dir, 'd.data') });
  img(dir, 'amend', '-o', 'data_file=', 'ext.qcow2');
  await assertRefused(dir, 'ext.qcow2', 'QCOW_ERR_INVALID_ARGUMENT', /does not name it/);
});
