/**
 * What a JavaScript caller (or a cast) can hand the public API by mistake: each is refused with
 * an InvalidArgumentError (or the error its case has) whose message shows the value — a number
 * as a number, a stream as a stream — never a TypeError from inside or '[object Object]'.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import {
  checkImage,
  clusterizeBatches,
  compareImages,
  convert,
  createConvertStream,
  createExportStream,
  exportStream,
  exportToFile,
  isQcow2StreamError,
  mapImage,
  measure,
  openDisk,
  openImage,
  readImageInfo,
  writeInternal,
  type ErrorCode,
} from '../../src/index.js';
import { redisConnection } from '../../src/fleet/index.js';
import { writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';

/** Calls `run` (sync or async) and checks the refusal: our class and code, a message matching `message`. */
async function refused(run: () => unknown, message: RegExp, code: ErrorCode = 'QCOW_ERR_INVALID_ARGUMENT'): Promise<void> {
  let err: unknown;
  try {
    await run();
  } catch (e) {
    err = e;
  }
  assert.ok(isQcow2StreamError(err), `expected one of our errors, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  assert.match(err.message, message);
  assert.doesNotMatch(err.message, /\[object \w+\]/);
}

/** A deliberately wrong value, past the type checker (as from JavaScript). */
const wrong = <T>(value: unknown): T => value as T;

test('convert() and createConvertStream(): wrong types are InvalidArgumentErrors that show the value', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'disk.raw');
  writeRawImage(raw, 1 << 20, [{ offset: 0, length: 65536, kind: 'random' }]);
  const output = join(dir, 'out.qcow2');
  await refused(() => convert(wrong(undefined)), /convert\(\) takes an options object, not undefined/);
  await refused(() => convert({ input: wrong(42), output }), /input must be a path, '-', a Readable or an async iterable of bytes, not 42$/);
  await refused(() => convert({ input: wrong(null), output }), /not null$/);
  await refused(() => convert({ input: raw, output: wrong(42) }), /output must be .*, not 42$/);
  await refused(() => convert({ input: raw, output: wrong({}) }), /output must be .*, not an object$/);
  await refused(() => convert({ input: raw, output, dataFile: wrong(7) }), /dataFile must be .*, not 7$/);
  await refused(() => convert({ input: raw, output, clusterSize: wrong('65536') }), /Invalid cluster size '65536'/);
  await refused(() => convert({ input: raw, output, size: wrong('1048576') }), /size must be a number, not '1048576'/);
  await refused(() => convert({ input: raw, output, layout: wrong({ internal: true }) }), /Unknown layout an object: use 'external' or 'internal'/);
  await refused(() => convert({ input: raw, output, signal: wrong({}) }), /signal must be an AbortSignal, not an object/);
  await refused(() => convert({ input: raw, output, onProgress: wrong('log') }), /onProgress must be a function, not 'log'/);
  await refused(() => convert({ input: raw, output, compression: wrong(9), layout: 'internal' }), /Unknown compression type 9/);
  await refused(() => createConvertStream({ output: wrong(() => undefined) }), /output must be .*, not a function/);
  await refused(() => createConvertStream(wrong(null)), /createConvertStream\(\) takes an options object, not null/);
  assert.deepEqual(readdirSync(dir), ['disk.raw'], 'nothing was created');
});

test('measure() and the fleet: an options object that is none, a size that is text, a connection that is a number', async () => {
  await refused(() => measure(wrong(null)), /measure\(\) takes an options object, not null/);
  await refused(() => measure({ size: wrong('1G') }), /size must be a number, not '1G'/);
  await refused(() => redisConnection(wrong(6379)), /a redis:\/\/ URL or BullMQ connection options, not 6379/);
});

test("a single-file image into a Writable names the Writable, not '[object Object]'", async () => {
  await refused(
    () => writeInternal(clusterizeBatches([new Uint8Array(4096)]), { output: wrong(new PassThrough()) }),
    /needs a regular file as output \(a Duplex stream is not a file\)/,
    'QCOW_ERR_NOT_SEEKABLE',
  );
});

test('the readers and exports: a path that is not a string, an image that is not an image', async (t) => {
  const dir = tempDir(t);
  await refused(() => openImage(wrong(42)), /The image must be a path \(a non-empty string\), not 42/);
  await refused(() => openDisk(wrong({ path: 'x' })), /The image must be a path .*, not an object/);
  // Readers without a check of their own: Node refusing the path is still the caller's mistake.
  await refused(() => checkImage(wrong(42)), /Cannot open 42: The "path" argument must be of type string/);
  await refused(() => readImageInfo(wrong(42)), /Cannot open 42: /);
  await refused(() => openImage(join(dir, 'nul\0.qcow2')), /without null bytes/);
  await refused(() => openImage(join(dir, 'x.qcow2'), wrong('qcow2')), /openImage\(\) takes an options object, not 'qcow2'/);
  await refused(() => exportStream(wrong('disk.qcow2')), /exportStream\(\) takes an image opened with openImage\(\) or openDisk\(\), not 'disk.qcow2'/);
  await refused(() => createExportStream(wrong({})), /createExportStream\(\) takes an image .*, not an object/);
  await refused(() => compareImages(wrong('a.qcow2'), wrong('b.qcow2')), /compareImages\(\) takes an image .*, not 'a.qcow2'/);
  await refused(() => mapImage(wrong(7)).next(), /mapImage\(\) takes an image .*, not 7/);
  writeRawImage(join(dir, 'disk.raw'), 65536, []);
  const image = await openDisk(join(dir, 'disk.raw'), { format: 'raw' });
  t.after(() => image.close());
  await refused(() => exportToFile(image, wrong(1)), /the target must be a path, '-', an s3:\/\/ URI or a Writable, not 1/);
  await refused(() => exportToFile(image, join(dir, 'out.raw'), { signal: wrong('stop') }), /signal must be an AbortSignal, not 'stop'/);
});
