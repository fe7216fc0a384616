import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Block } from '../../src/block.js';
import { InternalImageWriter } from '../../src/write/internal-sink.js';
import { isAllZero } from '../../src/io/buffers.js';
import { DedupUnsupportedError } from '../../src/errors.js';
import { createHasher, type Hasher } from '../../transforms/fingerprint.js';
import { needQemu, qemuCheck, qemuCompare, qemuImg, qemuIo, tempDir, hasQemuIo } from '../helpers/qemu.js';
import { patternBytes, randomBytesAt } from '../helpers/images.js';

/** A raw image whose clusters follow `plan`: 'r' random, 'z' zero, a digit = copy of template d. */
function buildRaw(plan: string, cs: number, tail = 0): Buffer {
  const parts = [...plan].map((c, i) => {
    if (c === 'r') return randomBytesAt(7, i * cs, cs);
    if (c === 'z') return Buffer.alloc(cs);
    return patternBytes(cs, 0x30 + Number(c) * 17);
  });
  if (tail) parts.push(randomBytesAt(9, 0, tail));
  return Buffer.concat(parts);
}

async function writeInternal(path: string, raw: Buffer, cs: number, options: { order?: number; hasher?: Hasher | undefined; dedup?: boolean } = {}) {
  const writer = await InternalImageWriter.create({
    output: path,
    clusterSize: cs,
    refcountBits: 2 ** (options.order ?? 4),
    size: raw.length,
    dedup: options.dedup === false ? undefined : { hasher: options.hasher ?? (await createHasher()) },
  });
  for (let i = 0; i * cs < raw.length; i++) {
    const data = raw.subarray(i * cs, Math.min(raw.length, (i + 1) * cs));
    const block: Block = { index: i, data, zero: isAllZero(data) };
    await writer.write(block);
  }
  return writer.finish();
}

test('dedup into a single-file image: qemu-img check clean, compare identical, duplicates stored once', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 65536;
  const plan = 'r1z12r2222zz1rr3' + '1'.repeat(20) + 'z3';
  const raw = buildRaw(plan, cs, 777);
  writeFileSync(join(dir, 'in.raw'), raw);
  const summary = await writeInternal(join(dir, 'out.qcow2'), raw, cs);
  assert.equal(qemuCheck('out.qcow2', dir).code, 0, qemuCheck('out.qcow2', dir).stdout);
  const cmp = qemuCompare('in.raw', 'out.qcow2', dir);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  const templates = new Set([...plan].filter((c) => /\d/.test(c)));
  const randoms = [...plan].filter((c) => c === 'r').length + 1; // + the tail cluster
  assert.equal(summary.dataClusters, templates.size + randoms);
  assert.equal(summary.duplicateClusters, [...plan].filter((c) => /\d/.test(c)).length - templates.size);
  assert.equal(summary.zeroClusters, [...plan].filter((c) => c === 'z').length);

  // qemu-img's own sparse qcow2 stores every duplicate again.
  assert.equal(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', 'in.raw', 'plain.qcow2'], dir).code, 0);
  const saved = statSync(join(dir, 'plain.qcow2')).size - statSync(join(dir, 'out.qcow2')).size;
  assert.ok(saved >= (summary.duplicateClusters - 1) * cs, `saved ${saved} bytes for ${summary.duplicateClusters} duplicates`);
});

test('copy-on-write by qemu works on our refcounts', async (t) => {
  if (!needQemu(t)) return;
  if (!hasQemuIo) return t.skip('qemu-io not installed');
  const dir = tempDir(t);
  const cs = 65536;
  const raw = buildRaw('1111r1', cs);
  writeFileSync(join(dir, 'in.raw'), raw);
  await writeInternal(join(dir, 'out.qcow2'), raw, cs);
  const io = qemuIo(['-f', 'qcow2', '-c', `write -P 0xee ${2 * cs} 4096`, 'out.qcow2'], dir);
  assert.equal(io.code, 0, io.stderr);
  assert.equal(qemuCheck('out.qcow2', dir).code, 0, qemuCheck('out.qcow2', dir).stdout);
  // Every other sharer still reads its old bytes; only the written range changed.
  assert.equal(qemuImg(['convert', '-O', 'raw', 'out.qcow2', 'back.raw'], dir).code, 0);
  const back = readFileSync(join(dir, 'back.raw'));
  const expected = Buffer.from(raw);
  expected.fill(0xee, 2 * cs, 2 * cs + 4096);
  assert.ok(back.equals(expected));
});

test('narrow refcounts start a new copy before overflowing; 1-bit refcounts refuse dedup', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 4096;
  const raw = buildRaw('1'.repeat(10) + 'r' + '2'.repeat(5), cs);
  writeFileSync(join(dir, 'in.raw'), raw);
  // One bit counts one reference: nothing could be shared, so dedup is refused, not silently off.
  await assert.rejects(writeInternal(join(dir, 'o0.qcow2'), raw, cs, { order: 0 }), (err: unknown) => err instanceof DedupUnsupportedError && /1-bit refcounts/.test(err.message));
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw'], 'nothing created');
  for (const order of [1, 2]) {
    const name = `o${order}.qcow2`;
    const summary = await writeInternal(join(dir, name), raw, cs, { order });
    const check = qemuCheck(name, dir);
    assert.equal(check.code, 0, `order ${order}: ${check.stdout}`);
    assert.equal(qemuCompare('in.raw', name, dir).code, 0);
    const max = 2 ** 2 ** order - 1;
    const expectedStored = Math.ceil(10 / max) + 1 + Math.ceil(5 / max);
    assert.equal(summary.dataClusters, expectedStored, `order ${order}`);
  }
});

test('a forced fingerprint collision does not corrupt the image', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 4096;
  const raw = buildRaw('rr1r2r1', cs);
  writeFileSync(join(dir, 'in.raw'), raw);
  const constant: Hasher = { algorithm: 'xxh64', hash64: () => 42n };
  const summary = await writeInternal(join(dir, 'c.qcow2'), raw, cs, { hasher: constant });
  assert.equal(qemuCheck('c.qcow2', dir).code, 0);
  assert.equal(qemuCompare('in.raw', 'c.qcow2', dir).code, 0);
  assert.ok((summary.dedup?.collisions ?? 0) > 0, 'the constant hash made collisions');
});

test('without dedup the internal image is a plain sparse qcow2', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 512;
  const raw = buildRaw('r1z1zzr', cs, 100);
  writeFileSync(join(dir, 'in.raw'), raw);
  const summary = await writeInternal(join(dir, 'p.qcow2'), raw, cs, { dedup: false });
  assert.equal(qemuCheck('p.qcow2', dir).code, 0);
  assert.equal(qemuCompare('in.raw', 'p.qcow2', dir).code, 0);
  assert.equal(summary.dataClusters, 5);
  const map = JSON.parse(qemuImg(['map', '--output=json', 'p.qcow2'], dir).stdout) as Array<{ start: number; data: boolean }>;
  assert.ok(map.some((e) => e.start === 2 * cs && !e.data), 'zero clusters are unallocated');
});
