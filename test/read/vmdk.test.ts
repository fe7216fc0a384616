import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { openDisk } from '../../src/read/image.js';
import { convert } from '../../src/write/convert.js';
import { assertConvertsLikeQemu, assertReadsLikeQemu, qemuConvertTo, vmwareStyleStream, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuCheck, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const SUBFORMATS = ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'];

test('VMDK of every subformat, odd sizes: export is qemu-img convert -O raw byte for byte; convert passes check and compare', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [i, size] of [5 * MiB + 3 * 512, 1 * MiB + 512].entries()) {
    const raw = writeSourceRaw(dir, `in${i}.raw`, size, 40 + i);
    for (const sub of SUBFORMATS) {
      const vmdk = `v${i}-${sub}.vmdk`;
      qemuConvertTo(dir, raw, vmdk, 'vmdk', `subformat=${sub}`);
      assert.equal(await assertReadsLikeQemu(dir, vmdk), 'vmdk', sub);
      await assertConvertsLikeQemu(dir, vmdk, sub === 'streamOptimized' ? { dataFileRaw: false } : {});
    }
  }
  // A zeroed-grain image (zeroed_grain=on) keeps its zero grains as zero extents.
  writeSourceRaw(dir, 'z.raw', 3 * MiB, 7);
  qemuConvertTo(dir, 'z.raw', 'z.vmdk', 'vmdk', 'zeroed_grain=on');
  assert.equal(qemuIo(['-c', 'write -z 0 1M', 'z.vmdk'], dir).code, 0);
  await assertReadsLikeQemu(dir, 'z.vmdk');
  const image = await openDisk(join(dir, 'z.vmdk'));
  const first = await image.extents()[Symbol.asyncIterator]().next();
  await image.close();
  assert.equal(first.value?.kind, 'zero');
});

test('VMDK split into several extents: reads across the 2 GiB boundaries, convert compares equal', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const sub of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    const name = `${sub}.vmdk`;
    assert.equal(qemuImg(['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, name, '4100M'], dir).code, 0);
    for (const [pattern, offset] of [[0x41, 2 * GiB - 4096], [0x42, 4 * GiB - 512]] as const) {
      assert.equal(qemuIo(['-c', `write -P ${pattern} ${offset} 8192`, name], dir).code, 0);
    }
    const image = await openDisk(join(dir, name));
    assert.equal(image.virtualSize, 4100 * MiB);
    const bytes = await image.read(2 * GiB - 8192, 16384);
    assert.ok(bytes.subarray(0, 4096).every((b) => b === 0));
    assert.ok(bytes.subarray(4096, 12288).every((b) => b === 0x41), 'data on both sides of the extent boundary');
    assert.ok(bytes.subarray(12288).every((b) => b === 0));
    await image.close();
    await convert({ input: join(dir, name), output: join(dir, `${sub}.qcow2`), sync: false });
    assert.equal(qemuCheck(`${sub}.qcow2`, dir).code, 0);
    assert.equal(qemuImg(['compare', '-f', 'vmdk', '-F', 'qcow2', name, `${sub}.qcow2`], dir).code, 0);
  }
});

test('VMDK with a parent (qemu-img create -b): unallocated grains read from the parent', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'base.raw', 4 * MiB + 512, 50);
  qemuConvertTo(dir, 'base.raw', 'base.vmdk', 'vmdk');
  assert.equal(qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', 'child.vmdk'], dir).code, 0);
  assert.equal(qemuIo(['-c', 'write -P 0x33 65536 100000', 'child.vmdk'], dir).code, 0);
  await assertReadsLikeQemu(dir, 'child.vmdk');
  await assertConvertsLikeQemu(dir, 'child.vmdk');
  const image = await openDisk(join(dir, 'child.vmdk'));
  assert.equal(image.backing?.format, 'vmdk');
  await image.close();
});

test('VMDK names go through the path policy; hostile headers are typed errors', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 2 * MiB, 9);
  qemuConvertTo(dir, 'in.raw', 'flat.vmdk', 'vmdk', 'subformat=monolithicFlat');
  const descriptor = readFileSync(join(dir, 'flat.vmdk'), 'utf8');
  for (const [name, stored] of [['abs', '/etc/passwd'], ['dotdot', '../outside.raw'], ['json', 'json:{driver:file}'], ['protocol', 'nbd://host/x']] as const) {
    writeFileSync(join(dir, `${name}.vmdk`), descriptor.replace('"flat-flat.vmdk"', JSON.stringify(stored)));
    await assert.rejects(openDisk(join(dir, `${name}.vmdk`)), { code: 'QCOW_ERR_PATH_POLICY' }, name);
  }
  symlinkSync('/etc/hostname', join(dir, 'link.raw'));
  writeFileSync(join(dir, 'link.vmdk'), descriptor.replace('"flat-flat.vmdk"', '"link.raw"'));
  await assert.rejects(openDisk(join(dir, 'link.vmdk')), { code: 'QCOW_ERR_PATH_POLICY' });

  qemuConvertTo(dir, 'in.raw', 's.vmdk', 'vmdk', 'subformat=streamOptimized');
  const good = readFileSync(join(dir, 's.vmdk'));
  const cases: Array<[string, (b: Buffer) => void, string]> = [
    ['grain size 3', (b) => b.writeBigUInt64LE(3n, 20), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['impossible capacity', (b) => b.writeBigUInt64LE(1n << 50n, 12), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['huge capacity', (b) => b.writeBigUInt64LE(1n << 42n, 12), 'QCOW_ERR_LIMIT_EXCEEDED'],
    ['GT entries 0', (b) => b.writeUInt32LE(0, 44), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['GD past the end', (b) => b.writeBigUInt64LE(1n << 40n, 56), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['GD at the end, no footer', (b) => b.writeBigInt64LE(-1n, 56), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['grain marker size', (b) => b.writeUInt32LE(0x7fffffff, 128 * 512 + 8), 'QCOW_ERR_CORRUPT_IMAGE'],
    ['bad deflate', (b) => b.fill(0xff, 128 * 512 + 12, 128 * 512 + 40), 'QCOW_ERR_CORRUPT_IMAGE'],
    [
      // Grains inflate on the thread pool, several at once: a bomb is still stopped at a grain.
      'a grain inflating to two grains',
      (b) => {
        const bomb = deflateSync(Buffer.alloc(128 * 1024));
        b.writeUInt32LE(bomb.length, 128 * 512 + 8);
        bomb.copy(b, 128 * 512 + 12);
      },
      'QCOW_ERR_CORRUPT_IMAGE',
    ],
    ['descriptor size', (b) => b.writeBigUInt64LE(1n << 30n, 36), 'QCOW_ERR_LIMIT_EXCEEDED'],
    ['version 9', (b) => b.writeUInt32LE(9, 4), 'QCOW_ERR_UNSUPPORTED_FEATURE'],
    ['GD entry past the end', (b) => b.writeUInt32LE(0x7ffffff0, Number(b.readBigUInt64LE(56)) * 512), 'QCOW_ERR_CORRUPT_IMAGE'],
  ];
  for (const [name, mutate, code] of cases) {
    const bytes = Buffer.from(good);
    mutate(bytes);
    writeFileSync(join(dir, 'bad.vmdk'), bytes);
    await assert.rejects(
      (async () => {
        const image = await openDisk(join(dir, 'bad.vmdk'));
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

test('streamOptimized with the grain directory at the end (as VMware writes it)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 3 * MiB + 512, 61);
  qemuConvertTo(dir, 'in.raw', 'q.vmdk', 'vmdk', 'subformat=streamOptimized');
  writeFileSync(join(dir, 'w.vmdk'), vmwareStyleStream(readFileSync(join(dir, 'q.vmdk'))));
  await assertReadsLikeQemu(dir, 'w.vmdk');
});

test('a qcow2 over a VMDK backing file is refused, never read with the VMDK taken as raw bytes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', MiB, 3);
  qemuConvertTo(dir, 'in.raw', 'b.vmdk', 'vmdk');
  assert.equal(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b.vmdk', '-F', 'vmdk', 'o.qcow2'], dir).code, 0);
  await assert.rejects(openDisk(join(dir, 'o.qcow2')), { code: 'QCOW_ERR_UNSUPPORTED_FEATURE' });
  // Probed (no format given with the explicit backing): still refused by what it is.
  await assert.rejects(openDisk(join(dir, 'o.qcow2'), { backing: join(dir, 'b.vmdk') }), { code: 'QCOW_ERR_UNSUPPORTED_FEATURE', message: /is a vmdk image/ });
});

test('huge empty VMDK, VHD and VHDX map as one extent: holes cost a step per table, not per grain or block', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [format, name, size] of [['vmdk', 'big.vmdk', '256G'], ['vpc', 'big.vhd', '1000G'], ['vhdx', 'big.vhdx', '16T']] as const) {
    assert.equal(qemuImg(['create', '-q', '-f', format, name, size], dir).code, 0);
    const image = await openDisk(join(dir, name));
    const kinds = [];
    for await (const extent of image.extents()) kinds.push(extent.kind);
    await image.close();
    // qemu marks a new VHDX's blocks zero or not present: either way one extent of no data.
    assert.equal(kinds.length, 1, name);
    assert.notEqual(kinds[0], 'data', name);
  }
});
