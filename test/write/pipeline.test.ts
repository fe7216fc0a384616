import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createReadStream, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { Readable, Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Block } from '../../src/block.js';
import { createClusterizeStream } from '../../src/write/clusterize.js';
import { convert, type ConvertProgress } from '../../src/write/convert.js';
import { createExternalSink } from '../../src/write/external-sink.js';
import { createFileBlockSource } from '../../src/write/sources.js';
import { createZeroDetectStream } from '../../transforms/index.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, MiB, qemuFacts } from './helpers.js';

/** Resolves once a stream has closed (its cleanup done), whatever error it carried. */
function closed(stream: Writable): Promise<void> {
  return stream.closed ? Promise.resolve() : new Promise((resolve) => stream.once('close', () => resolve()));
}

test('the stages compose with pipeline(): file source or byte stream → zero-detect → external sink', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 6 * MiB + 4321;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 65536, 21));

  const sink = createExternalSink({ output: join(dir, 'a.qcow2'), dataFile: join(dir, 'a.data'), dataFileName: 'a.data', size });
  await pipeline(createFileBlockSource(join(dir, 'in.raw')), createZeroDetectStream(), sink);
  assert.equal(sink.result?.virtualSize, size + 287);
  assert.equal(sink.result?.metadataLayout, 'streamed');
  assertQemuAgrees('in.raw', 'a.qcow2', dir);

  const sparse = createExternalSink({ output: join(dir, 'b.qcow2'), dataFile: join(dir, 'b.data'), dataFileName: 'b.data', dataFileRaw: false, clusterSize: 4096 });
  await pipeline(createReadStream(join(dir, 'in.raw'), { highWaterMark: 100_000 }), createClusterizeStream({ clusterSize: 4096 }), createZeroDetectStream(), sparse);
  assert.ok(sparse.result && sparse.result.dataClusters < sparse.result.clusters);
  assertQemuAgrees('in.raw', 'b.qcow2', dir);
  assert.equal(qemuFacts('b.qcow2', dir).dataFileRaw, false);

  // Without zero-detect the sink checks the Blocks itself: zero clusters are never stored as
  // data (the pitfall of a pipeline that leaves the stage out), and the image is the same.
  const unchecked = createExternalSink({ output: join(dir, 'c.qcow2'), dataFile: join(dir, 'c.data'), dataFileName: 'c.data', size });
  await pipeline(createFileBlockSource(join(dir, 'in.raw')), unchecked);
  assert.equal(unchecked.result?.dataClusters, sink.result?.dataClusters);
  assert.ok(unchecked.result!.dataClusters < unchecked.result!.clusters);
  assertQemuAgrees('in.raw', 'c.qcow2', dir);
});

test('a failing stage destroys the sink and removes its outputs', async (t) => {
  const dir = tempDir(t);
  writeRawImage(join(dir, 'in.raw'), 8 * MiB, [{ offset: 0, length: 8 * MiB, kind: 'random' }]);
  let seen = 0;
  const failing = new Transform({
    objectMode: true,
    transform(block: Block, _e, cb) {
      cb(++seen === 40 ? new Error('transform failed') : null, block);
    },
  });
  const sink = createExternalSink({ output: join(dir, 'o.qcow2'), dataFile: join(dir, 'o.data') });
  await assert.rejects(pipeline(createFileBlockSource(join(dir, 'in.raw')), failing, sink), /transform failed/);
  // pipeline() rejects as soon as a stage fails; the sink's cleanup is done when it closes.
  await closed(sink);
  assert.deepEqual(readdirSync(dir), ['in.raw']);
});

test('the sink refuses blocks out of order or of the wrong size', async (t) => {
  const dir = tempDir(t);
  const cases: Array<[Block[], RegExp]> = [
    [[{ index: 1, data: new Uint8Array(4096) }, { index: 0, data: new Uint8Array(4096) }], /increasing order/],
    [[{ index: 0, data: new Uint8Array(65536) }], /1\.\.4096 bytes/],
    [[{ index: 0, data: new Uint8Array(100) }, { index: 1, data: new Uint8Array(4096) }], /follows a short block/],
  ];
  for (const [list, message] of cases) {
    const sink = createExternalSink({ output: join(dir, 'o.qcow2'), dataFile: join(dir, 'o.data'), clusterSize: 4096 });
    await assert.rejects(pipeline(Readable.from(list), sink), message);
    await closed(sink);
    assert.deepEqual(readdirSync(dir), []);
  }
});

test('convert() reports progress up to the input size', async (t) => {
  const dir = tempDir(t);
  const size = 70 * MiB + 5;
  writeRawImage(join(dir, 'in.raw'), size, [{ offset: 0, length: 4096, kind: 'random' }]);
  const reports: ConvertProgress[] = [];
  const summary = await convert({ input: join(dir, 'in.raw'), output: join(dir, 'o.qcow2'), onProgress: (p) => reports.push(p) });
  assert.ok(reports.length >= 3, `${reports.length} reports`);
  assert.deepEqual(reports.at(-1), { bytesDone: size, bytesTotal: size });
  assert.ok(reports.every((p, i) => i === 0 || p.bytesDone > reports[i - 1]!.bytesDone));
  assert.equal(summary.dataClusters, 1);
  assert.equal(statSync(join(dir, 'o.data')).size, size + 507);
});
