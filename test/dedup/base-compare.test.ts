import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Block } from '../../src/block.js';
import { InternalImageWriter } from '../../src/write/internal-sink.js';
import { isAllZero } from '../../src/io/buffers.js';
import { createHasher } from '../../transforms/fingerprint.js';
import { compareWithBase, compareWithManifest, type BaseImage } from '../../transforms/base-compare.js';
import { ManifestReader, ManifestWriter } from '../../transforms/manifest.js';
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';

const CS = 65536;

async function* blocksOf(raw: Buffer): AsyncGenerator<Block> {
  for (let i = 0; i * CS < raw.length; i++) {
    const data = raw.subarray(i * CS, Math.min(raw.length, (i + 1) * CS));
    yield { index: i, data, zero: isAllZero(data) };
  }
}

/** A 64-cluster base and a day-2 image with ~5% of the clusters changed (one zeroed). */
function images(): { base: Buffer; next: Buffer; changed: number[] } {
  const base = Buffer.concat([randomBytesAt(1, 0, 40 * CS), Buffer.alloc(20 * CS), randomBytesAt(1, 60 * CS, 4 * CS - 1000)]);
  const next = Buffer.from(base);
  const changed = [3, 17, 45];
  for (const c of changed) randomBytesAt(2, c * CS, CS).copy(next, c * CS);
  next.fill(0, 30 * CS, 31 * CS); // data turned into zeros: must hide the base's bytes
  changed.push(30);
  return { base, next, changed: changed.sort((a, b) => a - b) };
}

async function writeOverlay(path: string, blocks: AsyncIterable<Block>, size: number) {
  const writer = await InternalImageWriter.create({ output: path, clusterSize: 65536, refcountBits: 16, size, backing: { name: 'base.qcow2', format: 'qcow2' } });
  for await (const block of blocks) await writer.write(block);
  return writer.finish();
}

test('an overlay against the base image holds only the changed clusters and reads as the new image', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const { base, next, changed } = images();
  writeFileSync(join(dir, 'next.raw'), next);
  const baseWriter = await InternalImageWriter.create({ output: join(dir, 'base.qcow2'), clusterSize: 65536, refcountBits: 16, size: base.length });
  for await (const b of blocksOf(base)) await baseWriter.write(b);
  await baseWriter.finish();

  const baseImage: BaseImage = { virtualSize: base.length, read: async (offset, length) => base.subarray(offset, offset + length) };
  const { blocks, stats } = compareWithBase(blocksOf(next), { base: baseImage, clusterSize: CS });
  const summary = await writeOverlay(join(dir, 'next.qcow2'), blocks, next.length);
  assert.equal(stats.changed, changed.length);
  assert.equal(summary.dataClusters, changed.length - 1, 'the zeroed cluster is a zero flag, not data');
  assert.equal(qemuCheck('next.qcow2', dir).code, 0);
  const cmp = qemuCompare('next.raw', 'next.qcow2', dir);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
});

test('the same against a manifest of the base', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const hasher = await createHasher();
  const { base, next, changed } = images();
  writeFileSync(join(dir, 'next.raw'), next);
  const baseWriter = await InternalImageWriter.create({ output: join(dir, 'base.qcow2'), clusterSize: 65536, refcountBits: 16, size: base.length });
  const manifestWriter = await ManifestWriter.create({ output: join(dir, 'base.xxh'), hasher, clusterSize: 65536 });
  for await (const b of blocksOf(base)) {
    await baseWriter.write(b);
    await manifestWriter.add(b);
  }
  await baseWriter.finish();
  await manifestWriter.finish(base.length);

  const manifest = await ManifestReader.open(join(dir, 'base.xxh'));
  t.after(() => manifest.close());
  const { blocks, stats } = compareWithManifest(blocksOf(next), { manifest, hasher, clusterSize: 65536 });
  await writeOverlay(join(dir, 'next.qcow2'), blocks, next.length);
  assert.equal(stats.changed, changed.length);
  assert.equal(qemuCheck('next.qcow2', dir).code, 0);
  assert.equal(qemuCompare('next.raw', 'next.qcow2', dir).code, 0);
});

test('a manifest made with another cluster size is refused', async (t) => {
  const dir = tempDir(t);
  const hasher = await createHasher();
  const writer = await ManifestWriter.create({ output: join(dir, 'm.xxh'), hasher, clusterSize: 4096 });
  await writer.finish(8192);
  const manifest = await ManifestReader.open(join(dir, 'm.xxh'));
  t.after(() => manifest.close());
  assert.throws(() => compareWithManifest(blocksOf(Buffer.alloc(CS)), { manifest, hasher, clusterSize: 65536 }), /4096-byte clusters/);
});
