/**
 * Compressed single-file images (`compression`): qemu-img is the oracle (check, compare, info),
 * and the L2 tables are read back to see clusters packed as qemu packs them.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { canCompressZstd } from '../../src/write/compress.js';
import { CompressionUnsupportedError } from '../../src/errors.js';
import { decodeCompressedDescriptor, decodeHeaderFields } from '../../src/format/index.js';
import { needQemu, qemuCheck, qemuCompare, qemuImg, qemuInfo, qemuIo, hasQemuIo, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';
import { buildCompressible } from '../helpers/compressible.js';

/** Every L2 entry of a single-file image (standard entries), with the table's guest base. */
function l2Entries(image: Buffer): Array<{ guest: number; hi: number; lo: number }> {
  const header = decodeHeaderFields(image);
  const cs = 2 ** header.clusterBits;
  const entries: Array<{ guest: number; hi: number; lo: number }> = [];
  for (let i = 0; i < header.l1Size; i++) {
    const l2 = Number(image.readBigUInt64BE(header.l1TableOffset + i * 8) & 0x00fffffffffffe00n);
    if (!l2) continue;
    for (let e = 0; e < cs / 8; e++) {
      const hi = image.readUInt32BE(l2 + e * 8);
      const lo = image.readUInt32BE(l2 + e * 8 + 4);
      if (hi || lo) entries.push({ guest: i * (cs / 8) + e, hi, lo });
    }
  }
  return entries;
}

const PLAN = 'ttrtzptt1t1rzzt2t22tpt' + 't'.repeat(12) + 'r1';

for (const cs of [4096, 65536, 2 * 1024 * 1024]) {
  test(`zlib-compressed image at ${cs}-byte clusters: check clean, compare identical, qemu's packing`, async (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    // At 2 MiB clusters fewer of them keep the test small.
    const raw = buildCompressible(cs > 65536 ? 'ttrtzpt1' : PLAN, cs, 1234);
    writeFileSync(join(dir, 'in.raw'), raw);
    const summary = await convert({ input: join(dir, 'in.raw'), output: join(dir, 'c.qcow2'), layout: 'internal', compression: 'zlib', clusterSize: cs, sync: false });
    const check = qemuCheck('c.qcow2', dir);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const cmp = qemuCompare('in.raw', 'c.qcow2', dir);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    assert.equal((qemuInfo('c.qcow2', dir)['format-specific'] as { data: Record<string, unknown> }).data['compression-type'], 'zlib');

    const image = readFileSync(join(dir, 'c.qcow2'));
    const entries = l2Entries(image);
    const compressed = entries.filter((e) => (e.hi & 0x40000000) !== 0);
    assert.equal(summary.compression?.clusters, compressed.length);
    assert.ok(compressed.length > 0);
    // Random clusters do not shrink: stored as normal clusters, with COPIED.
    const randoms = [...(cs > 65536 ? 'ttrtzpt1' : PLAN)].map((c, i) => (c === 'r' ? i : -1)).filter((i) => i >= 0);
    for (const guest of randoms) {
      const entry = entries.find((e) => e.guest === guest)!;
      assert.equal(entry.hi & 0x40000000, 0, `random cluster ${guest} is not compressed`);
      assert.ok((entry.hi & 0x80000000) !== 0, `random cluster ${guest} has COPIED`);
    }
    // Packed byte by byte: no compressed entry has COPIED; several start in one host cluster,
    // most start mid-cluster, and each starts right where the one before it ended.
    const places = compressed.map((e) => decodeCompressedDescriptor(e.hi, e.lo, Math.log2(cs)));
    assert.ok(compressed.every((e) => (e.hi & 0x80000000) === 0));
    const hosts = places.map((p) => Math.floor(p.hostOffset / cs));
    assert.ok(new Set(hosts).size < hosts.length, 'several compressed clusters share a host cluster');
    assert.ok(places.some((p) => p.hostOffset % 512 !== 0), 'streams start at byte offsets, not sectors');
  });
}

test('zlib: the image is the same whatever the thread count, and a cluster that does not shrink is stored as is', async (t) => {
  const dir = tempDir(t);
  const cs = 65536;
  writeFileSync(join(dir, 'in.raw'), buildCompressible(PLAN + PLAN, cs, 100));
  const images = [];
  for (const threads of [1, 2, 3]) {
    const output = join(dir, `t${threads}.qcow2`);
    await convert({ input: join(dir, 'in.raw'), output, layout: 'internal', compression: 'zlib', compressionThreads: threads, clusterSize: cs, sync: false });
    images.push(readFileSync(output));
  }
  assert.ok(images[0]!.equals(images[1]!) && images[0]!.equals(images[2]!), 'same bytes with 1, 2 and 3 threads');

  writeFileSync(join(dir, 'random.raw'), randomBytesAt(5, 0, 8 * cs));
  const summary = await convert({ input: join(dir, 'random.raw'), output: join(dir, 'r.qcow2'), layout: 'internal', compression: 'zlib', clusterSize: cs, sync: false });
  assert.equal(summary.compression?.clusters, 0);
  assert.equal(summary.dataClusters, 8);
});

test('compressed + dedup: duplicates share one compressed cluster; check clean, compare identical', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [cs, order] of [[65536, 4], [4096, 4], [4096, 1]] as const) {
    const raw = buildCompressible('t1t1111r2r2' + '1'.repeat(10) + 'p2', cs);
    writeFileSync(join(dir, 'in.raw'), raw);
    const name = `d${cs}-${order}.qcow2`;
    const summary = await convert({
      input: join(dir, 'in.raw'),
      output: join(dir, name),
      layout: 'internal',
      compression: 'zlib',
      dedup: true,
      clusterSize: cs,
      refcountBits: 2 ** order,
      sync: false,
    });
    const check = qemuCheck(name, dir);
    assert.equal(check.code, 0, `${name}: ${check.stdout}${check.stderr}`);
    assert.equal(qemuCompare('in.raw', name, dir).code, 0, name);
    assert.ok(summary.duplicateClusters > 0, name);
    const entries = l2Entries(readFileSync(join(dir, name)));
    const ones = entries.filter((e) => [1, 3, 4, 5, 6].includes(e.guest));
    // With 2-bit refcounts (max 3) a packed cluster fills up: copies start again, still clean.
    if (order === 4) assert.equal(new Set(ones.map((e) => `${e.hi}:${e.lo}`)).size, 1, `${name}: template 1 stored once`);
  }
});

test('qemu-io writes into a compressed (and shared) image keep it check-clean', async (t) => {
  if (!needQemu(t)) return;
  if (!hasQemuIo) return t.skip('qemu-io not installed');
  const dir = tempDir(t);
  const cs = 65536;
  const raw = buildCompressible('tt1t1tpt' + 'ttt', cs);
  writeFileSync(join(dir, 'in.raw'), raw);
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'c.qcow2'), layout: 'internal', compression: 'zlib', dedup: true, clusterSize: cs, sync: false });
  const expected = Buffer.from(raw);
  for (const [offset, length, value] of [[cs + 100, 4096, 0xee], [2 * cs - 10, 20, 0x11], [4 * cs, cs, 0x22], [9 * cs + 7, 3 * 512, 0x33]] as const) {
    const io = qemuIo(['-f', 'qcow2', '-c', `write -P ${value} ${offset} ${length}`, 'c.qcow2'], dir);
    assert.equal(io.code, 0, io.stderr);
    expected.fill(value, offset, offset + length);
  }
  const check = qemuCheck('c.qcow2', dir);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  writeFileSync(join(dir, 'expected.raw'), expected);
  assert.equal(qemuCompare('expected.raw', 'c.qcow2', dir).code, 0);
});

test('zstd: written where node:zlib has it, else a CompressionUnsupportedError naming the version', async (t) => {
  const dir = tempDir(t);
  const cs = 65536;
  const raw = buildCompressible(PLAN, cs, 500);
  writeFileSync(join(dir, 'in.raw'), raw);
  const output = join(dir, 'z.qcow2');
  if (!canCompressZstd()) {
    await assert.rejects(
      convert({ input: join(dir, 'in.raw'), output, layout: 'internal', compression: 'zstd', clusterSize: cs, sync: false }),
      (err: unknown) => err instanceof CompressionUnsupportedError && err.reason === 'runtime' && err.message.includes('22.15') && err.message.includes(process.version),
    );
    assert.equal(existsSync(output), false);
    assert.deepEqual(readdirSync(dir).sort(), ['in.raw']);
    t.diagnostic(`Node ${process.version} has no zstd in node:zlib: the zstd images are tested on Node 22.15+`);
    return;
  }
  if (!needQemu(t)) return;
  for (const size of [4096, 65536, 2 * 1024 * 1024]) {
    const name = `z${size}.qcow2`;
    writeFileSync(join(dir, 'in.raw'), buildCompressible(size > 65536 ? 'ttrtzpt1' : PLAN, size, 500));
    await convert({ input: join(dir, 'in.raw'), output: join(dir, name), layout: 'internal', compression: 'zstd', clusterSize: size, sync: false });
    assert.equal(qemuCheck(name, dir).code, 0, name);
    assert.equal(qemuCompare('in.raw', name, dir).code, 0, name);
    const info = qemuInfo(name, dir)['format-specific'] as { data: Record<string, unknown> };
    assert.equal(info.data['compression-type'], 'zstd');
  }
});

test('compression with an external data file is refused before anything is written, citing the spec', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), buildCompressible('tt', 65536));
  await assert.rejects(
    convert({ input: join(dir, 'in.raw'), output: join(dir, 'x.qcow2'), compression: 'zlib' }),
    (err: unknown) => err instanceof CompressionUnsupportedError && err.reason === 'layout' && /spec forbids/.test(err.message),
  );
  assert.deepEqual(readdirSync(dir), ['in.raw']);
  // And qemu agrees that our zlib image is what `qemu-img convert -c` makes, size for size.
  if (!needQemu(t)) return;
  writeFileSync(join(dir, 'in.raw'), buildCompressible(PLAN, 65536, 300));
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'ours.qcow2'), layout: 'internal', compression: 'zlib', sync: false });
  assert.equal(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'in.raw', 'qemu.qcow2'], dir).code, 0);
  const ours = readFileSync(join(dir, 'ours.qcow2')).length;
  const theirs = readFileSync(join(dir, 'qemu.qcow2')).length;
  assert.ok(ours <= theirs * 1.02, `ours ${ours} bytes, qemu-img -c ${theirs}`);
});

test('compression workers collect their garbage early, and no other context gets a gc global', async (t) => {
  const { CompressorPool } = await import('../../src/write/compress.js');
  const { runInNewContext } = await import('node:vm');
  const pool = CompressorPool.create({ type: 'zlib', clusterSize: 65536, threads: 2 });
  t.after(() => pool.close());
  // 64 MiB through the pool (measured: 54 MiB of growth before, 19 after): with the zlib garbage per worker left to V8's external
  // memory trigger, the process grew by ~80 MiB; collected every 2 MiB, it stays near flat.
  const clusters = Array.from({ length: 16 }, (_, i) => randomBytesAt(i + 1, 0, 65536).map((b, k) => (k % 3 ? 0 : b)));
  // The workers start on first use: their start-up (larger on Node 24) is not garbage, so it is not measured.
  (await pool.compress(clusters)).release();
  const before = process.memoryUsage().rss;
  let peak = before;
  for (let round = 0; round < 64; round++) {
    const batch = await pool.compress(clusters);
    assert.ok(batch.results.every((r) => r !== undefined && r.length < 65536));
    batch.release();
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  assert.ok(peak - before < 36 * 1024 * 1024, `RSS grew by ${((peak - before) / 2 ** 20).toFixed(0)} MiB over 64 MiB of clusters`);
  assert.equal(runInNewContext('typeof gc'), 'undefined', 'the --expose-gc flag stayed on after the workers started');
});
