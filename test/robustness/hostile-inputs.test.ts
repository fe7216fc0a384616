/**
 * Hostile inputs that cost time or block rather than crash: FIFOs where an image or data file
 * belongs (opening one for reading blocks until a writer appears), and snapshot tables that make
 * `check` walk the same tables over and over. Each must end quickly with a typed answer.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { openDisk, openImage } from '../../src/read/image.js';
import { checkImage } from '../../src/read/check.js';
import { readImageInfo } from '../../src/read/info.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, locate, writeBytes, writeU32, writeU64 } from '../read/fixtures.js';

async function refusedAsNotSeekable(work: Promise<unknown>, what: string): Promise<void> {
  await assert.rejects(work, (err: unknown) => {
    assert.ok(isQcow2StreamError(err), `${what}: ${String(err)}`);
    assert.equal(err.code, 'QCOW_ERR_NOT_SEEKABLE', `${what}: ${err.message}`);
    assert.match(err.message, /is a pipe/);
    return true;
  });
}

// Without O_NONBLOCK each of these waits forever in open(2) for a writer; the test's own
// timeout is what fails then.
test('a FIFO given as the image or (bypassing the policy) as the data file is refused at once, not waited on', { timeout: 15_000 }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  execFileSync('mkfifo', [join(dir, 'pipe')]);
  const fifo = join(dir, 'pipe');
  await refusedAsNotSeekable(openDisk(fifo), 'openDisk');
  await refusedAsNotSeekable(openImage(fifo), 'openImage');
  await refusedAsNotSeekable(readImageInfo(fifo), 'info');
  await refusedAsNotSeekable(checkImage(fifo), 'check');
  // The path policy stats a stored name before it is opened; a FIFO swapped in after that
  // look (or named explicitly by a caller) meets the same non-blocking open.
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '1M');
  await refusedAsNotSeekable(openImage(join(dir, 'ext.qcow2'), { dataFile: fifo }), 'data file');
  await refusedAsNotSeekable(openImage(join(dir, 'ext.qcow2'), { dataFile: join(dir, 'd.data'), backing: fifo, backingFormat: 'raw' }), 'backing');
});

const CLUSTER = 4096;

/**
 * An image whose `snapshots` snapshot entries all name one L1 table of `l1Entries` entries,
 * each pointing at the same full L2 table: a few hundred KiB that describe
 * snapshots × l1Entries × 512 cluster references.
 */
function snapshotBomb(dir: string, snapshots: number, l1Entries: number): string {
  img(dir, 'create', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, 'bomb.qcow2', '2M');
  io(dir, 'bomb.qcow2', 'write -P 0x11 0 2M');
  const path = join(dir, 'bomb.qcow2');
  const l2 = locate(path).l2TableOffset(0);
  const align = (n: number) => Math.ceil(n / CLUSTER) * CLUSTER;
  const l1Offset = align(statSync(path).size);
  const l1 = Buffer.alloc(l1Entries * 8);
  for (let i = 0; i < l1Entries; i++) l1.writeBigUInt64BE(BigInt(l2), i * 8);
  writeBytes(path, l1Offset, l1);
  const tableOffset = align(l1Offset + l1.length);
  const table = Buffer.alloc(snapshots * 40);
  for (let i = 0; i < snapshots; i++) {
    table.writeBigUInt64BE(BigInt(l1Offset), i * 40);
    table.writeUInt32BE(l1Entries, i * 40 + 8);
  }
  writeBytes(path, tableOffset, table);
  writeU32(path, 60, snapshots);
  writeU64(path, 64, BigInt(tableOffset));
  return path;
}

test('check: snapshots that all name the same tables are walked once per table, not once per reference', { timeout: 30_000 }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // 1000 × 4000 × 512 = 2×10^9 entry visits if every reference were walked.
  const path = snapshotBomb(dir, 1000, 4000);
  const started = Date.now();
  const result = await checkImage(path);
  const elapsed = Date.now() - started;
  assert.ok(elapsed < 10_000, `check took ${elapsed} ms`);
  assert.equal(result.checkErrors, 0);
  // The shared L2 table and its clusters are referenced far more often than their refcount says.
  assert.ok(result.findings.some((f) => /refcount=1 reference=65535/.test(f.message)), JSON.stringify(result.findings.slice(0, 3)));
});

test('check: the snapshots\' L1 entries together are bounded; past the bound the rest is reported unchecked', { timeout: 30_000 }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const path = snapshotBomb(dir, 50, 1000);
  const result = await checkImage(path, { maxSnapshotL1Entries: 20_000 });
  assert.equal(result.checkErrors, 1);
  assert.ok(result.findings.some((f) => /hold more than 20000 entries together; snapshots from 20 on are not checked/.test(f.message)));
  assert.equal(result.clean, false);
  assert.equal(result.leaks, 0, 'leaks cannot be told apart from unwalked references, so none are claimed');
  const full = await checkImage(path);
  assert.equal(full.checkErrors, 0);
});
