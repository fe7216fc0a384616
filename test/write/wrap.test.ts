import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { wrap } from '../../src/write/wrap.js';
import { InvalidArgumentError } from '../../src/errors.js';
import { roundUpToSector } from '../../src/format/index.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, assertRefcountsExact, decodeImage, MiB, qemuFacts, sha256File } from './helpers.js';

test('wrap leaves the raw file byte-for-byte and mtime unchanged, and qemu agrees, in both modes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  for (const [i, c] of [
    { clusterSize: 65536, size: 5 * MiB + 1234, dataFileRaw: true },
    { clusterSize: 65536, size: 5 * MiB + 1234, dataFileRaw: false },
    { clusterSize: 512, size: 300_001, dataFileRaw: false },
    { clusterSize: 2 * MiB, size: 3 * MiB, dataFileRaw: true },
  ].entries()) {
    const raw = `r${i}.raw`;
    writeRawImage(join(dir, raw), c.size, mixedExtents(c.size, c.clusterSize, i + 1));
    const before = { hash: sha256File(join(dir, raw)), stat: statSync(join(dir, raw)) };
    // The default stored name: the raw file relative to the image's directory.
    const summary = await wrap({ input: join(dir, raw), output: join(dir, `w${i}.qcow2`), clusterSize: c.clusterSize, dataFileRaw: c.dataFileRaw });
    assert.equal(summary.dataFileName, raw);
    assert.deepEqual(summary.warnings, []);
    const after = statSync(join(dir, raw));
    assert.equal(sha256File(join(dir, raw)), before.hash);
    assert.equal(after.size, c.size, 'never padded or truncated');
    assert.equal(after.mtimeMs, before.stat.mtimeMs);
    assert.equal(summary.virtualSize, roundUpToSector(c.size));
    assert.equal(summary.bytesRead, c.dataFileRaw ? 0 : c.size, 'raw mode reads nothing');
    assertQemuAgrees(raw, `w${i}.qcow2`, dir);
    const facts = qemuFacts(`w${i}.qcow2`, dir);
    assert.equal(facts.dataFileRaw, c.dataFileRaw);
    assert.equal(facts.dataFile, raw);
    assertRefcountsExact(decodeImage(readFileSync(join(dir, `w${i}.qcow2`))));
    // qemu can read it end to end (including the unpadded tail) and the raw file still holds.
    const back = qemuImg(['convert', '-O', 'raw', `w${i}.qcow2`, `back${i}.raw`], dir);
    assert.equal(back.code, 0, back.stderr);
    const original = readFileSync(join(dir, raw));
    const exported = readFileSync(join(dir, `back${i}.raw`));
    assert.ok(exported.subarray(0, c.size).equals(original));
    assert.ok(exported.subarray(c.size).every((b) => b === 0));
    assert.equal(sha256File(join(dir, raw)), before.hash);
  }
});

test('wrap in sparse mode leaves zero clusters unallocated', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeRawImage(join(dir, 'disk.raw'), 4 * MiB, [
    { offset: 0, length: 100, kind: 'random' },
    { offset: 2 * MiB, length: 65536, kind: 'pattern' },
  ]);
  const summary = await wrap({ input: join(dir, 'disk.raw'), output: join(dir, 'disk.qcow2'), dataFileRaw: false, dataFileName: 'disk.raw' });
  assert.equal(summary.dataClusters, 2);
  const map = qemuImg(['map', '--output=json', 'disk.qcow2'], dir);
  const extents = JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean }>;
  assert.deepEqual(
    extents.filter((e) => e.data).map((e) => [e.start, e.length]),
    [
      [0, 65536],
      [2 * MiB, 65536],
    ],
  );
});

test('wrap refuses to write over the raw file, and stores the raw path relative to the image by default', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'disk.raw');
  writeFileSync(raw, Buffer.alloc(4096, 9));
  const hash = sha256File(raw);
  await assert.rejects(wrap({ input: raw, output: raw }), InvalidArgumentError);
  await assert.rejects(wrap({ input: raw, output: join(dir, 'x', '..', 'disk.raw') }), InvalidArgumentError);
  assert.equal(sha256File(raw), hash);
  assert.deepEqual(readdirSync(dir), ['disk.raw']);
  const summary = await wrap({ input: raw, output: join(dir, 'disk.qcow2') });
  assert.equal(summary.dataFileName, 'disk.raw');
  assert.equal(summary.dataFile, raw);
  assert.equal(summary.inputBytes, 4096);
  assert.equal(decodeImage(readFileSync(join(dir, 'disk.qcow2'))).header.dataFileName, 'disk.raw');
  await assert.rejects(wrap({ input: join(dir, 'missing.raw'), output: join(dir, 'm.qcow2') }), /no such file/);
  await assert.rejects(wrap({ input: dir, output: join(dir, 'm.qcow2') }), /directory/);
});
