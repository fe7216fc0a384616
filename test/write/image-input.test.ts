import { mock, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { nativeAddon } from '../../src/io/native.js';
import { openDisk } from '../../src/read/image.js';
import { imageBlocks, imageSegments } from '../../src/write/image-source.js';
import { runCli } from '../helpers/cli.js';
import { assertConvertsLikeQemu, qemuConvertTo, qemuRaw, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuCheck, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const SIZE = 5 * 1024 * 1024 + 3 * 512;

/** A qcow2 chain: a raw base, a compressed qcow2 over it, and qemu-io writes on top. */
function makeChain(dir: string): string {
  writeSourceRaw(dir, 'base.raw', SIZE, 3);
  qemuConvertTo(dir, 'base.raw', 'mid.qcow2', 'qcow2', 'cluster_size=4096');
  const over = qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  assert.equal(over.code, 0, over.stderr);
  for (const cmd of ['write -P 0x61 100000 70000', 'write -z 1048576 1048576', 'write -P 0x62 5242880 1536']) {
    assert.equal(qemuIo(['-c', cmd, 'top.qcow2'], dir).code, 0);
  }
  return 'top.qcow2';
}

test('convert takes a qcow2 chain as an image, never as raw bytes; every option still applies', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const top = makeChain(dir);
  qemuConvertTo(dir, 'base.raw', 'packed.qcow2', 'qcow2', undefined);
  assert.equal(qemuImg(['convert', '-c', '-O', 'qcow2', 'base.raw', 'compressed.qcow2'], dir).code, 0);
  await assertConvertsLikeQemu(dir, top);
  await assertConvertsLikeQemu(dir, 'compressed.qcow2', { dataFileRaw: false });
  await assertConvertsLikeQemu(dir, top, { layout: 'internal', dedup: true, output: join(dir, 'internal.qcow2') });
  // An overlay of a qcow2 input over an earlier image, with a manifest.
  const summary = await convert({ input: join(dir, top), output: join(dir, 'ov.qcow2'), base: join(dir, 'packed.qcow2'), manifest: join(dir, 'ov.xxh'), sync: false });
  assert.ok(summary.unchangedClusters > 0, 'clusters equal to the base stay unallocated');
  assert.ok(existsSync(join(dir, 'ov.xxh')));
  assert.equal(qemuCheck('ov.qcow2', dir).code, 0);
  assert.equal(qemuImg(['compare', '-F', 'qcow2', top, 'ov.qcow2'], dir).code, 0);
});

test('the image source reads data in large pieces and never reads whole-cluster holes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const top = makeChain(dir);
  const image = await openDisk(join(dir, top));
  t.after(() => image.close());
  let pos = 0;
  for await (const segment of imageSegments(image, 65536)) {
    assert.equal(segment.start, pos);
    assert.ok(segment.length <= 2 * 1024 * 1024);
    if (segment.hole) assert.equal(segment.length % 65536, 0);
    pos += segment.length;
  }
  assert.equal(pos, image.virtualSize);
  // The zeroed MiB at 1 MiB is one zero run, not read.
  let zeroRunClusters = 0;
  let bytes = 0;
  for await (const block of imageBlocks(image, { clusterSize: 65536 })) {
    if (block.count !== undefined) zeroRunClusters += block.count;
    bytes += (block.count ?? 1) * 65536;
  }
  assert.ok(zeroRunClusters >= 16, `zero runs: ${zeroRunClusters} clusters`);
  assert.ok(bytes >= image.virtualSize);
});

test('convert refuses to write over a file its input image reads, and leaves nothing', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const top = makeChain(dir);
  const before = readdirSync(dir).sort();
  await assert.rejects(convert({ input: join(dir, top), output: join(dir, 'x.qcow2'), dataFile: join(dir, 'mid.qcow2'), overwrite: true, sync: false }), {
    code: 'QCOW_ERR_INVALID_ARGUMENT',
    message: /is the (input|backing file) .*refusing to overwrite it/,
  });
  await assert.rejects(convert({ input: join(dir, top), output: join(dir, 'mid.qcow2'), sync: false }), { code: 'QCOW_ERR_INVALID_ARGUMENT' });
  await assert.rejects(convert({ input: join(dir, top), output: join(dir, 'y.qcow2'), size: 1234, sync: false }), { code: 'QCOW_ERR_INPUT_SIZE' });
  assert.deepEqual(readdirSync(dir).sort(), before);
});

test('CLI: convert q.qcow2 out.qcow2 converts the guest disk (the data hazard of issue 13 item 9)', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const top = makeChain(dir);
  const expected = qemuRaw(dir, top);
  const result = runCli(['convert', top, 'out.qcow2', '-q'], { cwd: dir });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(qemuImg(['compare', '-f', 'raw', expected, 'out.qcow2'], dir).code, 0);
  // A qcow2 given as a pipe with -f qcow2 is refused: the reader needs random access.
  const piped = runCli(['convert', '-f', 'qcow2', '-', 'p.qcow2', '--data-file', 'p.data'], { cwd: dir, input: Buffer.alloc(1024) });
  assert.equal(piped.code, 2);
  assert.match(piped.stderr, /QCOW_ERR_NOT_SEEKABLE/);
  assert.match(piped.stderr, /Write the input to a file first/);
  assert.equal(existsSync(join(dir, 'p.data')), false);
});

const addon = nativeAddon();

test('VHD and VHDX blocks are copied natively from where they lie: the same image as the Blocks path', { skip: addon ? undefined : 'the native addon is not built' }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 9 * 1024 * 1024 + 1536, 12, 1024 * 1024);
  qemuConvertTo(dir, 'in.raw', 'd.vhd', 'vpc', 'subformat=dynamic');
  qemuConvertTo(dir, 'in.raw', 'f.vhd', 'vpc', 'subformat=fixed');
  qemuConvertTo(dir, 'in.raw', 'x.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  for (const name of ['d.vhd', 'f.vhd', 'x.vhdx']) {
    const copy = mock.method(addon!, 'copyClusters');
    await convert({ input: join(dir, name), output: join(dir, `${name}.n.qcow2`), dataFile: join(dir, `${name}.n.data`), dataFileName: 'n.data', sync: false });
    const copies = copy.mock.callCount();
    copy.mock.restore();
    assert.ok(copies > 0, `${name}: copied natively`);
    // A manifest needs the bytes: the Blocks path, which must make the same image.
    await convert({ input: join(dir, name), output: join(dir, `${name}.b.qcow2`), dataFile: join(dir, `${name}.b.data`), dataFileName: 'n.data', manifest: join(dir, `${name}.xxh`), sync: false });
    assert.ok(readFileSync(join(dir, `${name}.n.data`)).equals(readFileSync(join(dir, `${name}.b.data`))), `${name}: same data file`);
    assert.ok(readFileSync(join(dir, `${name}.n.qcow2`)).equals(readFileSync(join(dir, `${name}.b.qcow2`))), `${name}: same metadata`);
    const expected = qemuRaw(dir, name, name.endsWith('.vhd') ? 'vpc' : undefined);
    // With the raw bit the data file is the guest disk.
    assert.equal(qemuImg(['compare', '-f', 'raw', '-F', 'raw', expected, `${name}.n.data`], dir).code, 0);
  }
});
