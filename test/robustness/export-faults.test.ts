/**
 * Faults in the middle of an export (the read side): files that shrink or vanish under the
 * reader, read and write errors from the file layer, a consumer that walks away, and
 * cancellation. Each ends in a typed error or a clean cancellation, leaves no output that looks
 * valid, and leaves no descriptor open.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, rmSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { openImage } from '../../src/read/image.js';
import { EXPORT_CHUNK, exportStream, exportToFile } from '../../src/read/export.js';
import { isQcow2StreamError, type ErrorCode, type FileError, type StreamError } from '../../src/errors.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, qemuRaw } from '../read/fixtures.js';
import { countReads, errnoError, failOn } from './faults.js';
import { leakedSince, openDescriptors } from '../helpers/descriptors.js';

const MiB = 1024 * 1024;

/** A 16 MiB image whose data lives in `d.data` (several export chunks of data). */
function dataFileImage(dir: string): Buffer {
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'ext.qcow2', '16M');
  io(dir, 'ext.qcow2', 'write -P 0x11 0 6M', 'write -P 0x22 8M 6M');
  return qemuRaw(dir, 'ext.qcow2');
}

async function rejectsWith(work: Promise<unknown>, code: ErrorCode, message: RegExp): Promise<unknown> {
  let caught: unknown;
  await assert.rejects(work, (err: unknown) => {
    caught = err;
    assert.ok(isQcow2StreamError(err), `expected a typed error, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  });
  return caught;
}

function leftovers(dir: string): string[] {
  return readdirSync(dir).filter((name) => name.startsWith('out') || name.includes('.partial'));
}

async function collect(stream: AsyncIterable<unknown>, onChunk?: (index: number) => void): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) {
    chunks.push(Buffer.from(chunk as Uint8Array));
    onChunk?.(chunks.length);
  }
  return Buffer.concat(chunks);
}

test('the data file truncated during an export: the rest reads as zeros with a warning, like qemu', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const expected = dataFileImage(dir);
  const image = await openImage(join(dir, 'ext.qcow2'));
  try {
    const bytes = await collect(exportStream(image), (index) => {
      if (index === 1) truncateSync(join(dir, 'd.data'), MiB);
    });
    // The first chunk was read before the cut; every data byte read after it is zero.
    const cutExpected = Buffer.concat([expected.subarray(0, EXPORT_CHUNK), Buffer.alloc(expected.length - EXPORT_CHUNK)]);
    assert.ok(bytes.equals(cutExpected));
    assert.ok(image.warnings.some((w) => /data file .* maps data at byte/.test(w)), image.warnings.join('\n'));
  } finally {
    await image.close();
  }
});

test('the data file removed during an export: the open handle still reads it, byte-exact', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const expected = dataFileImage(dir);
  const image = await openImage(join(dir, 'ext.qcow2'));
  try {
    const bytes = await collect(exportStream(image), (index) => {
      if (index === 1) rmSync(join(dir, 'd.data'));
    });
    assert.ok(bytes.equals(expected));
  } finally {
    await image.close();
  }
});

test('the image truncated during an export: an L2 table past the new end is a typed error, no output left', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // 4 KiB clusters: one L2 table per 2 MiB, allocated as the writes go, so later tables lie
  // further into the file than the first chunk of data.
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'int.qcow2', '16M');
  io(dir, 'int.qcow2', 'write -P 0x33 0 16M');
  const before = openDescriptors();
  const image = await openImage(join(dir, 'int.qcow2'));
  let cut = false;
  await rejectsWith(
    exportToFile(image, join(dir, 'out.raw'), {
      onProgress: () => {
        if (!cut) truncateSync(join(dir, 'int.qcow2'), 3 * MiB);
        cut = true;
      },
    }),
    'QCOW_ERR_UNEXPECTED_EOF',
    /ends inside the L2 table/,
  );
  await image.close();
  assert.deepEqual(leftovers(dir), []);
  assert.deepEqual(leakedSince(before), []);
});

test('EIO reading the data file mid-export: a FileError naming the file, no output, no descriptor left', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  dataFileImage(dir);
  const before = openDescriptors();
  const image = await openImage(join(dir, 'ext.qcow2'));
  await failOn(t, 'read', (path) => path.endsWith('/d.data'), 1, errnoError('EIO', 'read'));
  const err = await rejectsWith(exportToFile(image, join(dir, 'out.raw')), 'QCOW_ERR_FILE', /Cannot read '.*d\.data': input\/output error/);
  assert.equal((err as FileError).systemCode, 'EIO');
  assert.equal((err as FileError).errno, -5);
  await image.close();
  assert.deepEqual(leftovers(dir), []);
  assert.deepEqual(leakedSince(before), []);
});

for (const code of ['ENOSPC', 'EIO'] as const) {
  test(`${code} writing the exported file: a typed error, the partial file removed, the process unharmed`, async (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    dataFileImage(dir);
    const before = openDescriptors();
    const image = await openImage(join(dir, 'ext.qcow2'));
    // The second write fails while the next chunk is being read: several writes are in flight
    // on a file target, and the failed one must not become an unhandled rejection.
    await failOn(t, 'writev', (path) => path.includes('.partial'), 1, errnoError(code, 'write'));
    const reason = code === 'ENOSPC' ? 'no space left on device' : 'input/output error';
    const err = await rejectsWith(exportToFile(image, join(dir, 'out.raw')), 'QCOW_ERR_FILE', new RegExp(`Cannot write the raw image .*out\\.raw.*${reason}`));
    assert.equal((err as FileError).systemCode, code);
    await image.close();
    assert.deepEqual(leftovers(dir), []);
    assert.deepEqual(leakedSince(before), []);
  });
}

test('a failing Writable target: the export rejects with its error wrapped, nothing leaks', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  dataFileImage(dir);
  const before = openDescriptors();
  const image = await openImage(join(dir, 'ext.qcow2'));
  let writes = 0;
  const target = new Writable({
    write(_chunk, _encoding, callback) {
      callback(++writes === 2 ? errnoError('EIO', 'write') : null);
    },
  });
  // A Writable is a stream of the caller's, not a named file: a StreamError with the OS error's name.
  const err = await rejectsWith(exportToFile(image, target), 'QCOW_ERR_STREAM', /^Cannot write to the raw image stream: EIO/);
  assert.equal((err as StreamError).systemCode, 'EIO');
  await image.close();
  assert.deepEqual(leakedSince(before), []);
});

test('a consumer that stops reading: destroying the export stream stops the reads and leaks nothing', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  dataFileImage(dir);
  const before = openDescriptors();
  const image = await openImage(join(dir, 'ext.qcow2'));
  const reads = await countReads(t, (path) => path.endsWith('/d.data'));
  const stream = exportStream(image);
  for await (const _chunk of stream) break; // for-await's break destroys the stream
  assert.ok(stream.destroyed);
  const readsAtStop = reads.calls;
  await new Promise((resolve) => setTimeout(resolve, 50));
  // At most the read-ahead already under way finishes; the 6 other data chunks are never read.
  assert.ok(reads.calls <= readsAtStop + 1, `reads went on after the consumer left: ${readsAtStop} → ${reads.calls}`);
  // The image is still usable (the stream does not own it) and closes cleanly.
  assert.equal((await image.read(8 * MiB, 1))[0], 0x22);
  await image.close();
  assert.deepEqual(leakedSince(before), []);

  // The same through pipeline(): a destination that fails tears the source down.
  const again = await openImage(join(dir, 'ext.qcow2'));
  const failing = new Writable({ write: (_c, _e, callback) => callback(new Error('destination gone')) });
  await assert.rejects(pipeline(exportStream(again), failing), /destination gone/);
  await again.close();
  assert.deepEqual(leakedSince(before), []);
});

/** A 1 GiB image with the raw bit: one data extent over a sparse data file (cheap to make). */
function oneExtentImage(dir: string): void {
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=big.data,data_file_raw=on', 'big.qcow2', '1G');
}

test('AbortSignal during a file export: stops within a chunk even inside one huge extent, leaves no file', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  oneExtentImage(dir);
  const before = openDescriptors();
  const image = await openImage(join(dir, 'big.qcow2'));
  const controller = new AbortController();
  let doneAtAbort = 0;
  let doneAfter = 0;
  await rejectsWith(
    exportToFile(image, join(dir, 'out.raw'), {
      signal: controller.signal,
      onProgress: ({ bytesDone: done }) => {
        if (!controller.signal.aborted) {
          doneAtAbort = done;
          controller.abort();
        } else doneAfter = done;
      },
    }),
    'QCOW_ERR_ABORTED',
    /aborted/,
  );
  // Only the chunks already in flight may complete after the abort, not the rest of the gigabyte.
  assert.ok(doneAfter - doneAtAbort <= 4 * EXPORT_CHUNK, `the export went on for ${doneAfter - doneAtAbort} bytes after the abort`);
  await image.close();
  assert.deepEqual(leftovers(dir), []);
  assert.deepEqual(leakedSince(before), []);
});

test('AbortSignal during a stream export: the stream errors with AbortedError soon after', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  oneExtentImage(dir);
  const image = await openImage(join(dir, 'big.qcow2'));
  const controller = new AbortController();
  let received = 0;
  await rejectsWith(
    (async () => {
      for await (const chunk of exportStream(image, { signal: controller.signal })) {
        received += (chunk as Uint8Array).length;
        if (received >= EXPORT_CHUNK && !controller.signal.aborted) controller.abort();
      }
    })(),
    'QCOW_ERR_ABORTED',
    /aborted/,
  );
  assert.ok(received <= 4 * EXPORT_CHUNK, `received ${received} bytes after aborting at ${EXPORT_CHUNK}`);
  await image.close();
  // A reason given to abort() comes back as the cause of the typed error.
  const again = await openImage(join(dir, 'big.qcow2'));
  const reasoned = new AbortController();
  const reason = new Error('shutting down');
  reasoned.abort(reason);
  const err = await rejectsWith(collect(exportStream(again, { signal: reasoned.signal })), 'QCOW_ERR_ABORTED', /aborted/);
  assert.equal((err as Error).cause, reason);
  await again.close();
  assert.ok(readFileSync(join(dir, 'big.qcow2')).length > 0);
});
