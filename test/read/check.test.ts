/**
 * checkImage against `qemu-img check`: agreement on clean images of every kind, on images
 * broken on purpose, and one qemu misses (host ≠ guest with a data file).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkImage, type CheckResult } from '../../src/read/check.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { mixedExtents, randomBytesAt, writeRawImage } from '../helpers/images.js';
import { convert } from '../../src/write/convert.js';
import { img, io, locate, qemuRaw, readU64, setRefcount16, writeU32, writeU64 } from './fixtures.js';

const COPIED = 1n << 63n;

interface QemuCheck {
  code: number;
  corruptions: number;
  leaks: number;
  allocated: number;
  total: number;
  end: number;
}

function qemuCheckJson(dir: string, image: string): QemuCheck {
  const result = qemuImg(['check', '--output=json', image], dir);
  const json = JSON.parse(result.stdout) as Record<string, number>;
  return {
    code: result.code,
    corruptions: json['corruptions'] ?? 0,
    leaks: json['leaks'] ?? 0,
    allocated: json['allocated-clusters'] ?? 0,
    total: json['total-clusters'] ?? 0,
    end: json['image-end-offset'] ?? 0,
  };
}

function errorMessages(result: CheckResult): string[] {
  return result.findings.filter((f) => f.severity !== 'warning').map((f) => f.message);
}

/** Asserts our counts equal qemu's and returns our result. */
async function agreeWithQemu(dir: string, image: string): Promise<CheckResult> {
  const ours = await checkImage(join(dir, image));
  const qemu = qemuCheckJson(dir, image);
  assert.equal(ours.corruptions, qemu.corruptions, `${image} corruptions: ${errorMessages(ours).join('; ')}`);
  assert.equal(ours.leaks, qemu.leaks, `${image} leaks`);
  assert.equal(ours.totalClusters, qemu.total, `${image} total clusters`);
  assert.equal(ours.allocatedClusters, qemu.allocated, `${image} allocated clusters`);
  assert.equal(ours.imageEndOffset, qemu.end, `${image} image end offset`);
  return ours;
}

test('clean images of every kind check clean, like qemu-img check', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '4M');
  io(dir, 'ext.qcow2', 'write -P 0x11 0 1M', 'write -z 512k 64k', 'discard 768k 64k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=r.data,data_file_raw=on', 'raw.qcow2', '2M');
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1', 'small.qcow2', '2M');
  io(dir, 'small.qcow2', 'write -P 0x22 0 300k', 'write -z 1k 1k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M');
  io(dir, 'v2.qcow2', 'write -P 0x33 0 100k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on,refcount_bits=64', 'xl2.qcow2', '1M');
  io(dir, 'xl2.qcow2', 'write -P 0x44 4k 4k', 'write -z 64k 2k');
  writeRawImage(join(dir, 'src.raw'), 2 * 1024 * 1024, mixedExtents(2 * 1024 * 1024, 65536, 3));
  img(dir, 'convert', '-c', '-O', 'qcow2', 'src.raw', 'comp.qcow2');
  img(dir, 'create', '-f', 'qcow2', 'snap.qcow2', '1M');
  io(dir, 'snap.qcow2', 'write -P 0x55 0 128k');
  img(dir, 'snapshot', '-c', 'one', 'snap.qcow2');
  io(dir, 'snap.qcow2', 'write -P 0x66 64k 128k');
  for (const image of ['ext.qcow2', 'raw.qcow2', 'small.qcow2', 'v2.qcow2', 'xl2.qcow2', 'comp.qcow2', 'snap.qcow2']) {
    const ours = await agreeWithQemu(dir, image);
    assert.ok(ours.clean, `${image}: ${errorMessages(ours).join('; ')}`);
    assert.equal(qemuCheckJson(dir, image).code, 0);
  }
});

test('broken refcounts and COPIED flags are found like qemu-img check finds them', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '4M');
  io(dir, 'ext.qcow2', 'write -P 0x11 0 256k');
  img(dir, 'create', '-f', 'qcow2', 'int.qcow2', '4M');
  io(dir, 'int.qcow2', 'write -P 0x22 0 256k');
  const copy = (from: string, to: string) => {
    copyFileSync(join(dir, from), join(dir, to));
    return join(dir, to);
  };
  const ext = locate(join(dir, 'ext.qcow2'));
  const l2Cluster = ext.l2TableOffset(0) / ext.header.clusterSize;

  setRefcount16(copy('ext.qcow2', 'rc0.qcow2'), l2Cluster, 0);
  let r = await agreeWithQemu(dir, 'rc0.qcow2');
  assert.ok(errorMessages(r).some((m) => m === `ERROR cluster ${l2Cluster} refcount=0 reference=1`));
  assert.ok(errorMessages(r).some((m) => m.startsWith('ERROR OFLAG_COPIED L2 cluster: l1_index=0')));

  setRefcount16(copy('ext.qcow2', 'rc2.qcow2'), l2Cluster, 2);
  r = await agreeWithQemu(dir, 'rc2.qcow2');
  assert.equal(r.leaks, 1);
  assert.ok(errorMessages(r).includes(`Leaked cluster ${l2Cluster} refcount=2 reference=1`));

  const l1Copied = copy('ext.qcow2', 'l1copied.qcow2');
  writeU64(l1Copied, ext.l1EntryOffset(0), readU64(l1Copied, ext.l1EntryOffset(0)) & ~COPIED);
  r = await agreeWithQemu(dir, 'l1copied.qcow2');
  assert.equal(r.corruptions, 1);

  const l2Copied = copy('ext.qcow2', 'l2copied.qcow2');
  writeU64(l2Copied, ext.l2EntryOffset(1), readU64(l2Copied, ext.l2EntryOffset(1)) & ~COPIED);
  r = await agreeWithQemu(dir, 'l2copied.qcow2');
  assert.ok(errorMessages(r).some((m) => m.startsWith('ERROR OFLAG_COPIED data cluster: l2_entry=0x10000 refcount=1')));

  const int = locate(join(dir, 'int.qcow2'));
  const dataCluster = Number(readU64(join(dir, 'int.qcow2'), int.l2EntryOffset(0)) & 0x00fffffffffffe00n) / int.header.clusterSize;
  setRefcount16(copy('int.qcow2', 'data0.qcow2'), dataCluster, 0);
  await agreeWithQemu(dir, 'data0.qcow2');

  // A refcount on a cluster inside the file that nothing references: a leak.
  const leak = copy('int.qcow2', 'leak.qcow2');
  writeFileSync(leak, Buffer.alloc(65536), { flag: 'a' });
  const lastCluster = statSync(leak).size / int.header.clusterSize - 1;
  setRefcount16(leak, lastCluster, 1);
  r = await agreeWithQemu(dir, 'leak.qcow2');
  assert.equal(r.leaks, 1);
  assert.equal(qemuCheckJson(dir, 'leak.qcow2').code, 3);
});

test('host offset ≠ guest offset with a data file: qemu-img check says clean, we report it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'hg.qcow2', '4M');
  io(dir, 'hg.qcow2', 'write -P 0x11 0 256k');
  const hg = locate(join(dir, 'hg.qcow2'));
  writeU64(join(dir, 'hg.qcow2'), hg.l2EntryOffset(2), 0x30000n | COPIED);
  assert.equal(qemuCheckJson(dir, 'hg.qcow2').code, 0, 'qemu-img check misses this (pitfall P5)');
  const r = await checkImage(join(dir, 'hg.qcow2'));
  assert.equal(r.clean, false);
  assert.equal(r.corruptions, 1);
  assert.match(errorMessages(r)[0] ?? '', /host offset 0x30000 does not match guest offset 0x20000/);
  assert.equal(r.findings[0]?.offset, hg.l2EntryOffset(2));
});

test('data-file rules: compressed clusters and snapshots are corruptions, as in qemu-img check', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'c.qcow2', '4M');
  io(dir, 'c.qcow2', 'write -P 0x11 0 256k');
  const c = locate(join(dir, 'c.qcow2'));
  writeU64(join(dir, 'c.qcow2'), c.l2EntryOffset(5), (1n << 62n) | 0x50000n);
  let r = await agreeWithQemu(dir, 'c.qcow2');
  assert.ok(errorMessages(r).some((m) => /compressed cluster 5 with data file/.test(m)));
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=s.data', 's.qcow2', '4M');
  // One snapshot entry pointing at the active L1 (which qemu's open does not reject).
  const s = locate(join(dir, 's.qcow2'));
  writeU32(join(dir, 's.qcow2'), 60, 1);
  writeU64(join(dir, 's.qcow2'), 64, BigInt(s.header.l1TableOffset));
  r = await checkImage(join(dir, 's.qcow2'));
  assert.ok(errorMessages(r).some((m) => /1 snapshots in image with data file/.test(m)));
  assert.notEqual(qemuCheckJson(dir, 's.qcow2').code, 0);
});

/** qemu-img check --output=json's counts, with the fields it leaves out as undefined. */
function qemuCounts(dir: string, image: string): Record<string, number | undefined> {
  const json = JSON.parse(qemuImg(['check', '--output=json', image], dir).stdout) as Record<string, number>;
  return {
    corruptions: json['corruptions'] ?? 0,
    leaks: json['leaks'] ?? 0,
    checkErrors: json['check-errors'],
    allocated: json['allocated-clusters'],
    fragmented: json['fragmented-clusters'],
    end: json['image-end-offset'],
  };
}

function ourCounts(r: CheckResult, like: Record<string, number | undefined>): Record<string, number | undefined> {
  const ours: Record<string, number | undefined> = {
    corruptions: r.corruptions,
    leaks: r.leaks,
    checkErrors: r.checkErrors,
    allocated: r.allocatedClusters,
    fragmented: r.fragmentedClusters,
    end: r.imageEndOffset,
  };
  // qemu leaves out the statistics when the check could not complete.
  for (const key of Object.keys(ours)) if (like[key] === undefined) ours[key] = undefined;
  return ours;
}

test('fragmentation is counted per L2 table, as qemu-img check counts it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // The reproduction of issue 13, item 11: 512-byte clusters, writes out of guest order.
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512', 'frag.qcow2', '2M');
  io(dir, 'frag.qcow2', 'write -P 1 0 512', 'write -P 2 100000 3000', 'write -P 3 40000 2000', 'write -P 4 1500000 700', 'write -P 5 33000 100', 'write -P 6 700000 5000', 'write -P 7 65536 512');
  const r = await checkImage(join(dir, 'frag.qcow2'));
  const qemu = qemuCounts(dir, 'frag.qcow2');
  assert.equal(qemu.fragmented, 1);
  assert.deepEqual(ourCounts(r, qemu), qemu);
});

test('misaligned L2 tables, data clusters and refcount blocks: the counts qemu-img check gives', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'int.qcow2', '4M');
  io(dir, 'int.qcow2', 'write -P 0x22 0 256k', 'write -P 0x23 2M 128k');
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '4M');
  io(dir, 'ext.qcow2', 'write -P 0x22 0 256k');
  const patch = (from: string, to: string, at: (l: ReturnType<typeof locate>) => number, value: (old: bigint) => bigint) => {
    copyFileSync(join(dir, from), join(dir, to));
    const path = join(dir, to);
    const offset = at(locate(path));
    writeU64(path, offset, value(readU64(path, offset)));
  };
  const fileSize = statSync(join(dir, 'int.qcow2')).size;
  const refblock = locate(join(dir, 'int.qcow2')).refblockOffset;
  // An L1 entry 512 bytes into its L2 table: qemu counts and walks the table at that offset.
  patch('int.qcow2', 'l1-misaligned.qcow2', (l) => l.l1EntryOffset(0), (v) => v + 512n);
  // An L1 entry whose table starts half a cluster before the end of the file.
  patch('int.qcow2', 'l1-past-end.qcow2', (l) => l.l1EntryOffset(0), (v) => (v & COPIED) | BigInt(fileSize - 32768));
  // A data cluster 512 bytes off: counted over the two clusters it touches.
  patch('int.qcow2', 'l2-misaligned.qcow2', (l) => l.l2EntryOffset(1), (v) => v + 512n);
  patch('ext.qcow2', 'ext-l2-misaligned.qcow2', (l) => l.l2EntryOffset(1), (v) => v + 512n);
  // A data cluster on top of the refcount block: the block is then referenced twice.
  patch('int.qcow2', 'on-refblock.qcow2', (l) => l.l2EntryOffset(1), (v) => (v & COPIED) | BigInt(refblock));
  // A misaligned refcount block: no refcount it covers can be read (check errors, as in qemu).
  patch('int.qcow2', 'refblock-misaligned.qcow2', (l) => l.header.refcountTableOffset, (v) => v + 512n);
  // Reserved bits in a refcount table entry: read through, but its block is not counted.
  patch('int.qcow2', 'reftable-reserved.qcow2', (l) => l.header.refcountTableOffset, (v) => v | 1n);
  for (const image of ['l1-misaligned.qcow2', 'l1-past-end.qcow2', 'l2-misaligned.qcow2', 'ext-l2-misaligned.qcow2', 'on-refblock.qcow2', 'refblock-misaligned.qcow2', 'reftable-reserved.qcow2']) {
    const qemu = qemuCounts(dir, image);
    assert.ok((qemu.corruptions ?? 0) > 0, `${image}: qemu finds the damage`);
    const ours = await checkImage(join(dir, image));
    assert.deepEqual(ourCounts(ours, qemu), qemu, `${image}: ${errorMessages(ours).slice(0, 5).join('; ')}`);
  }
});

test('a deduplicated image after a qemu write: the COPIED flag is a repairable finding, and repair leaves what qemu-img check -r all leaves', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // Issue 13, item 12: two equal clusters share one host cluster; qemu's copy-on-write of the
  // first leaves the second at refcount 1 without COPIED.
  const cluster = randomBytesAt(7, 0, 65536);
  writeFileSync(join(dir, 'in.raw'), Buffer.concat([cluster, cluster]));
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'dedup.qcow2'), layout: 'internal', dedup: true });
  io(dir, 'dedup.qcow2', 'write -P 0x55 0 64k');
  const before = qemuImg(['check', 'dedup.qcow2'], dir);
  assert.equal(before.code, 2);
  assert.match(before.stderr, /ERROR OFLAG_COPIED data cluster: l2_entry=10000 refcount=1/);

  const path = join(dir, 'dedup.qcow2');
  const original = readFileSync(path);
  const found = await checkImage(path);
  assert.equal(found.corruptions, 1, 'qemu counts it as a corruption, and so do we');
  assert.equal(found.repairable, 1);
  assert.deepEqual(
    found.findings.map((f) => [f.severity, f.kind, f.repairable, f.message]),
    [['error', 'copied-flag', true, 'ERROR OFLAG_COPIED data cluster: l2_entry=0x10000 refcount=1']],
  );
  assert.deepEqual(readFileSync(path), original, 'a check without repair writes nothing');

  copyFileSync(path, join(dir, 'by-qemu.qcow2'));
  qemuImg(['check', '-r', 'all', 'by-qemu.qcow2'], dir);
  const repaired = await checkImage(path, { repair: true });
  assert.equal(repaired.repaired, 1);
  assert.equal(repaired.corruptions, 0);
  assert.ok(repaired.clean);
  assert.equal(repaired.findings[0]?.severity, 'repaired');
  assert.equal(qemuImg(['check', 'dedup.qcow2'], dir).code, 0, 'qemu-img check is clean after our repair');
  assert.deepEqual(readFileSync(path), readFileSync(join(dir, 'by-qemu.qcow2')), 'the same bytes as qemu-img check -r all');
  assert.deepEqual(qemuRaw(dir, 'dedup.qcow2'), Buffer.concat([Buffer.alloc(65536, 0x55), cluster]));

  // Running it again finds nothing and writes nothing.
  const again = await checkImage(path, { repair: true });
  assert.equal(again.repaired, 0);
  assert.ok(again.clean);
  assert.deepEqual(readFileSync(path), readFileSync(join(dir, 'by-qemu.qcow2')));
});

test('a COPIED flag on a cluster whose refcount is wrong is not repairable, and repair leaves it alone', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'int.qcow2', '4M');
  io(dir, 'int.qcow2', 'write -P 0x22 0 256k');
  const path = join(dir, 'int.qcow2');
  const l = locate(path);
  const dataCluster = Number(readU64(path, l.l2EntryOffset(1)) & 0x00fffffffffffe00n) / l.header.clusterSize;
  setRefcount16(path, dataCluster, 2); // COPIED now disagrees with a refcount that is itself wrong
  const original = readFileSync(path);
  const r = await checkImage(path, { repair: true });
  assert.equal(r.repaired, 0);
  assert.equal(r.repairable, 0);
  const copied = r.findings.find((f) => f.kind === 'copied-flag');
  assert.ok(copied && copied.repairable !== true && copied.severity === 'error');
  assert.deepEqual(readFileSync(path), original);
  await agreeWithQemu(dir, 'int.qcow2');
});
