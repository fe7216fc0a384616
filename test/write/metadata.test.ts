import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  EXT_FEATURE_TABLE,
  INCOMPAT_DATA_FILE,
} from '../../src/format/index.js';
import { OffsetWriter } from '../../src/io/output.js';
import { MetadataEmitter } from '../../src/write/metadata.js';
import { resolveImageSettings } from '../../src/write/settings.js';
import { tempDir } from '../helpers/qemu.js';
import { assertRefcountsExact, decodeImage, MemoryWritable, MiB } from './helpers.js';

const GiB = 1024 * MiB;

async function memoryEmitter(options: { clusterSize: number; refcountBits?: number; dataFileRaw: boolean; virtualSize?: number }) {
  const sink = new MemoryWritable();
  const output = await OffsetWriter.create(sink, { label: 'metadata file' });
  const settings = resolveImageSettings(options);
  const emitter = new MetadataEmitter(output, {
    settings,
    dataFileName: 'disk.data',
    ...(options.virtualSize === undefined ? {} : { virtualSize: options.virtualSize }),
  });
  return { sink, output, emitter };
}

test('raw mode streams: header, refcounts and L1 first, each L2 table once its range is done', async () => {
  const virtualSize = GiB + 512; // 3 L2 tables of 512 MiB at 64 KiB clusters, the last cluster partial
  const { sink, output, emitter } = await memoryEmitter({ clusterSize: 65536, dataFileRaw: true, virtualSize });
  assert.equal(emitter.streaming, true);
  await emitter.start();
  const front = sink.bytes().length;
  assert.ok(front > 0 && front % 65536 === 0, 'the leading structures are out after start()');
  await emitter.record(0, 'data');
  await emitter.record(100, 'zero'); // zero clusters are mapped too in raw mode
  assert.equal(sink.bytes().length, front, 'table 0 is not complete yet');
  await emitter.record(8192 * 2, 'data');
  assert.equal(sink.bytes().length, front + 2 * 65536, 'tables 0 and 1 were written when table 2 began');
  const result = await emitter.finish(virtualSize);
  await output.commit();
  assert.equal(result.layout, 'streamed');
  assert.equal(result.l2Tables, 3);

  const bytes = sink.bytes();
  const image = decodeImage(bytes);
  assert.equal(image.header.size, virtualSize);
  assert.equal(image.header.incompatibleFeatures, INCOMPAT_DATA_FILE);
  assert.equal(image.header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  assert.equal(image.header.dataFileName, 'disk.data');
  assert.ok(image.header.extensions.some((e) => e.type === EXT_FEATURE_TABLE), 'feature table with 64 KiB clusters');
  assert.equal(image.entries.length, 8192 * 2 + 1);
  image.entries.forEach((e, i) => {
    assert.equal(e.type, 'normal', `cluster ${i}`);
    assert.equal(e.hostOffset, i * 65536);
    assert.equal(e.copied, true);
  });
  // Pitfall P2: guest cluster 0 is exactly 0x8000000000000000.
  const l2 = image.header.l1TableOffset + 65536;
  assert.deepEqual([...bytes.subarray(l2, l2 + 8)], [0x80, 0, 0, 0, 0, 0, 0, 0]);
  assertRefcountsExact(image);
  assert.equal(bytes.length, result.metadataClusters * 65536);
});

test('sparse mode into a regular file: written at the end, only non-empty L2 tables', async (t) => {
  const path = join(tempDir(t), 'sparse.qcow2');
  const output = await OffsetWriter.create(path, { label: 'metadata file' });
  const settings = resolveImageSettings({ clusterSize: 4096, refcountBits: 4, dataFileRaw: false });
  const virtualSize = 5 * MiB + 1536; // 3 L2 tables of 2 MiB at 4 KiB clusters
  const emitter = new MetadataEmitter(output, { settings, dataFileName: 'sub/disk.data', virtualSize });
  assert.equal(emitter.streaming, false);
  await emitter.start();
  const data = new Set([0, 3, 511, 1024, 1280]); // tables 0 and 2; table 1 stays empty
  for (let i = 0; i < 1281; i++) await emitter.record(i, data.has(i) ? 'data' : 'zero');
  const result = await emitter.finish(virtualSize);
  await output.commit();
  assert.equal(result.layout, 'at-end');
  assert.equal(result.l2Tables, 2);
  const bytes = readFileSync(path);
  const image = decodeImage(bytes);
  assert.equal(image.header.autoclearFeatures, 0n);
  assert.equal(image.header.dataFileName, 'sub/disk.data');
  assert.ok(!image.header.extensions.some((e) => e.type === EXT_FEATURE_TABLE), 'no feature table at 4 KiB, like qemu');
  image.entries.forEach((e, i) => {
    if (data.has(i)) {
      assert.equal(e.type, 'normal', `cluster ${i}`);
      assert.equal(e.hostOffset, i * 4096);
    } else {
      assert.ok(e.type === 'unallocated' || e.type === 'absent', `cluster ${i} is ${e.type}`);
    }
  });
  assert.ok(image.entries.slice(512, 1024).every((e) => e.type === 'absent'), 'table 1 not allocated');
  assertRefcountsExact(image);
});

test('sparse mode into a stream with a known size: every L2 table allocated, zero entries 0', async () => {
  const virtualSize = 5 * MiB;
  const { sink, output, emitter } = await memoryEmitter({ clusterSize: 4096, dataFileRaw: false, virtualSize });
  assert.equal(emitter.streaming, true);
  await emitter.start();
  await emitter.record(2, 'data');
  await emitter.record(1100, 'data');
  await emitter.finish(virtualSize);
  await output.commit();
  const image = decodeImage(sink.bytes());
  assert.ok(image.entries.every((e) => e.type !== 'absent'), 'all tables allocated');
  assert.deepEqual(
    image.entries.flatMap((e, i) => (e.type === 'normal' ? [i] : [])),
    [2, 1100],
  );
  assertRefcountsExact(image);
});

test('unknown size: the metadata is produced at the end from the final size, into a stream too', async () => {
  for (const dataFileRaw of [true, false]) {
    const { sink, output, emitter } = await memoryEmitter({ clusterSize: 512, refcountBits: 1, dataFileRaw });
    assert.equal(emitter.streaming, false);
    await emitter.start();
    assert.equal(sink.bytes().length, 0);
    for (const i of [0, 70, 200]) await emitter.record(i, 'data');
    await emitter.finish(201 * 512 - 512 + 512);
    await output.commit();
    const image = decodeImage(sink.bytes());
    assert.equal(image.header.size, 201 * 512);
    const mapped = image.entries.flatMap((e, i) => (e.type === 'normal' ? [i] : []));
    assert.deepEqual(mapped, dataFileRaw ? [...Array(201).keys()] : [0, 70, 200]);
    assertRefcountsExact(image);
  }
});

test('every cluster size and refcount width gives self-consistent refcounts', async () => {
  for (let bits = 9; bits <= 21; bits++) {
    for (let order = 0; order <= 6; order++) {
      const cs = 2 ** bits;
      const virtualSize = cs * (cs / 8) + 1024; // just over one L2 table
      const { sink, output, emitter } = await memoryEmitter({ clusterSize: cs, refcountBits: 2 ** order, dataFileRaw: true, virtualSize });
      await emitter.finish(virtualSize);
      await output.commit();
      const image = decodeImage(sink.bytes());
      assert.equal(image.header.refcountOrder, order);
      assert.equal(image.header.l1Size, 2);
      assertRefcountsExact(image);
    }
  }
});

test('the emitter refuses clusters out of order and a size other than the declared one', async () => {
  const { emitter } = await memoryEmitter({ clusterSize: 65536, dataFileRaw: true, virtualSize: 1 * MiB });
  await emitter.start();
  await emitter.record(3, 'data');
  assert.throws(() => emitter.record(2, 'data'), RangeError);
  assert.throws(() => emitter.record(16, 'data'), RangeError, 'beyond the virtual size');
  await assert.rejects(emitter.finish(2 * MiB), RangeError);
});

test('a zero-size image has no L1 entries and only the header and refcount clusters', async () => {
  const { sink, output, emitter } = await memoryEmitter({ clusterSize: 65536, dataFileRaw: true, virtualSize: 0 });
  await emitter.start();
  const result = await emitter.finish(0);
  await output.commit();
  const image = decodeImage(sink.bytes());
  assert.equal(image.header.l1Size, 0);
  assert.equal(result.metadataClusters, 3);
  assertRefcountsExact(image);
});
