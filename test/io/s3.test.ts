/**
 * s3:// inputs and outputs against a real S3-compatible server (s3rver, in-process), with
 * qemu-img as the oracle on the objects downloaded side by side. The abort and conditional-put
 * paths s3rver cannot show (it answers AbortMultipartUpload with MethodNotAllowed and ignores
 * If-None-Match) are tested against the SDK with aws-sdk-client-mock at the end.
 */

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { openDisk } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { ObjectStorageError, InputSizeError } from '../../src/errors.js';
import { partSizeFor, setS3Client, S3UploadSink, MAX_PARTS } from '../../src/io/s3.js';
import { parseS3Uri } from '../../src/io/s3-uri.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { downloadObject, listKeys, startS3, type S3Server } from '../helpers/servers.js';

const MiB = 1024 * 1024;
let s3: S3Server;

before(async () => {
  s3 = await startS3(['disks', 'empty']);
  setS3Client(undefined);
});
after(async () => {
  setS3Client(undefined);
  await s3?.stop();
});

function rawImage(dir: string, name: string, size: number, seed: number): string {
  const path = join(dir, name);
  writeRawImage(path, size, mixedExtents(size, 65536, seed), seed);
  return path;
}

/** Downloads metadata + data objects into `dir` under the stored names and checks them with qemu-img. */
async function assertObjectsMatch(dir: string, metadataUri: string, dataUri: string, dataName: string, raw: string): Promise<void> {
  await downloadObject(metadataUri, join(dir, 'got.qcow2'));
  await downloadObject(dataUri, join(dir, dataName));
  const check = qemuCheck('got.qcow2', dir);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  const compare = qemuCompare(raw, 'got.qcow2', dir);
  assert.equal(compare.code, 0, compare.stdout + compare.stderr);
}

test('part sizes keep every size within 10,000 parts, in whole MiB of at least 8 MiB', () => {
  for (const size of [0, 1, 8 * MiB, 80 * 1024 * MiB, 2 ** 40, 10 * 2 ** 40]) {
    const part = partSizeFor(size);
    assert.ok(part >= 8 * MiB && part % MiB === 0, String(part));
    assert.ok(Math.ceil(size / part) <= MAX_PARTS, `${size}: ${part}`);
  }
  assert.equal(partSizeFor(2 ** 40), 105 * MiB);
  assert.equal(partSizeFor(undefined), 16 * MiB);
});

test('s3:// URIs are validated like paths', () => {
  assert.deepEqual(parseS3Uri('s3://disks/vm1/a.qcow2'), { bucket: 'disks', key: 'vm1/a.qcow2' });
  for (const bad of ['s3://', 's3://disks', 's3://disks/', 's3://Disks/a', 's3://d/a', 's3://disks/dir/']) {
    assert.throws(() => parseS3Uri(bad), { code: 'QCOW_ERR_INVALID_ARGUMENT' }, bad);
  }
});

test('convert: metadata and data file as objects (multipart), qemu-check clean and equal to the input', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // 20 MiB: three 8 MiB parts for the data object, one PutObject for the metadata.
  const raw = rawImage(dir, 'disk.raw', 20 * MiB + 4096, 3);
  const summary = await convert({ input: raw, output: 's3://disks/vm1/disk.qcow2', sync: false });
  assert.equal(summary.dataFileName, 'disk.data');
  assert.equal(summary.metadataLayout, 'streamed');
  await assertObjectsMatch(dir, 's3://disks/vm1/disk.qcow2', 's3://disks/vm1/disk.data', 'disk.data', raw);
  // The data object holds every byte of the disk, zeros included: objects are not sparse.
  assert.equal(summary.dataBytesWritten, 20 * MiB + 4096);
});

test('convert: an existing object is not replaced without overwrite (HEAD check), and is with it', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const raw = rawImage(dir, 'a.raw', 2 * MiB, 5);
  await convert({ input: raw, output: 's3://disks/force/a.qcow2', sync: false });
  const before = await listKeys('disks');
  await assert.rejects(convert({ input: raw, output: 's3://disks/force/a.qcow2', sync: false }), (err: unknown) => {
    assert.ok(err instanceof ObjectStorageError);
    assert.equal(err.code, 'QCOW_ERR_OBJECT_STORAGE');
    assert.equal(err.reason, 'exists');
    return true;
  });
  // Only the metadata object taken: the data file is checked and refused as well.
  await assert.rejects(convert({ input: raw, output: 's3://disks/force/b.qcow2', dataFile: 's3://disks/force/a.data', sync: false }), { reason: 'exists' });
  assert.deepEqual(await listKeys('disks'), before);
  const raw2 = rawImage(dir, 'b.raw', 2 * MiB, 6);
  await convert({ input: raw2, output: 's3://disks/force/a.qcow2', overwrite: true, sync: false });
  await assertObjectsMatch(dir, 's3://disks/force/a.qcow2', 's3://disks/force/a.data', 'a.data', raw2);
});

test('convert: a run that fails part-way leaves no object under either key', async (t) => {
  const dir = tempDir(t);
  const raw = rawImage(dir, 'short.raw', 18 * MiB, 7);
  // A stream that ends before its declared size: InputSizeError after two parts went up.
  const bytes = readFileSync(raw);
  async function* early() {
    for (let at = 0; at < bytes.length; at += MiB) yield bytes.subarray(at, at + MiB);
  }
  await assert.rejects(
    convert({ input: early(), output: 's3://empty/x/short.qcow2', dataFile: 's3://empty/x/short.data', size: 30 * MiB, sync: false }),
    (err: unknown) => err instanceof InputSizeError,
  );
  assert.deepEqual(await listKeys('empty'), []);
  const controller = new AbortController();
  let first = true;
  await assert.rejects(
    convert({
      input: raw,
      output: 's3://empty/x/cancelled.qcow2',
      sync: false,
      signal: controller.signal,
      progressInterval: MiB,
      onProgress: () => {
        if (first && !(first = false)) return;
        controller.abort();
      },
    }),
    { code: 'QCOW_ERR_ABORTED' },
  );
  assert.deepEqual(await listKeys('empty'), []);
});

test('convert: an object as input (ranged GETs) to local files, and the CLI with every side an object', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const raw = rawImage(dir, 'src.raw', 9 * MiB + 512, 11);
  const up = runCli(['convert', raw, 's3://disks/in/src.qcow2', '--no-sync', '--json'], { env: s3.env });
  assert.equal(up.code, 0, up.stderr);
  // The data object is itself a raw image: convert it again, from the object.
  const local = await convert({ input: 's3://disks/in/src.data', output: join(dir, 'again.qcow2'), sync: false });
  assert.equal(local.inputBytes, 9 * MiB + 512);
  assert.equal(qemuCheck('again.qcow2', dir).code, 0);
  assert.equal(qemuCompare(raw, 'again.qcow2', dir).code, 0);
  // Object to objects through the CLI, with an explicit data-file object.
  const cli = runCli(['convert', 's3://disks/in/src.data', 's3://disks/out/m.qcow2', '--data-file', 's3://disks/out/d.raw', '--no-sync', '-q'], { env: s3.env });
  assert.equal(cli.code, 0, cli.stderr);
  await assertObjectsMatch(dir, 's3://disks/out/m.qcow2', 's3://disks/out/d.raw', 'd.raw', raw);
  const again = runCli(['convert', raw, 's3://disks/out/m.qcow2', '--data-file', 's3://disks/out/d2.raw', '-q'], { env: s3.env });
  assert.equal(again.code, 2);
  assert.match(again.stderr, /already exists \[QCOW_ERR_OBJECT_STORAGE\]/);
  assert.match(again.stderr, /--force/);
  // A missing object is a clear error.
  const missing = runCli(['convert', 's3://disks/nope.raw', join(dir, 'n.qcow2')], { env: s3.env });
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /does not exist \[QCOW_ERR_OBJECT_STORAGE\]/);
});

test('convert --internal to an object (spooled, then uploaded) and export to an object', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const raw = rawImage(dir, 'i.raw', 12 * MiB, 13);
  const summary = await convert({ input: raw, output: 's3://disks/int/i.qcow2', layout: 'internal', dedup: true, sync: false });
  assert.equal(summary.layout, 'internal');
  await downloadObject('s3://disks/int/i.qcow2', join(dir, 'i.qcow2'));
  assert.equal(qemuCheck('i.qcow2', dir).code, 0);
  assert.equal(qemuCompare(raw, 'i.qcow2', dir).code, 0);

  const image = await openDisk(join(dir, 'i.qcow2'));
  try {
    const result = await exportToFile(image, 's3://disks/int/i.raw', { sync: false });
    assert.equal(result.bytes, 12 * MiB);
    await assert.rejects(exportToFile(image, 's3://disks/int/i.raw', { overwrite: false }), { reason: 'exists' });
  } finally {
    await image.close();
  }
  await downloadObject('s3://disks/int/i.raw', join(dir, 'back.raw'));
  assert.ok(readFileSync(join(dir, 'back.raw')).equals(readFileSync(raw)));
});

// ---- Paths s3rver cannot exercise: the SDK mocked at the command level (aws-sdk-client-mock) ----

test('mocked SDK: a failed part aborts the multipart upload and never completes it', async (t) => {
  const { mockClient } = await import('aws-sdk-client-mock');
  const sdk = await import('@aws-sdk/client-s3');
  const client = new sdk.S3Client({ region: 'us-east-1', credentials: { accessKeyId: 'x', secretAccessKey: 'y' } });
  const mock = mockClient(client);
  t.after(() => {
    mock.restore();
    setS3Client(undefined);
  });
  setS3Client(client);
  mock.on(sdk.HeadObjectCommand).rejects(Object.assign(new Error('not found'), { name: 'NotFound', $metadata: { httpStatusCode: 404 } }));
  mock.on(sdk.CreateMultipartUploadCommand).resolves({ UploadId: 'u1' });
  let parts = 0;
  mock.on(sdk.UploadPartCommand).callsFake(async () => {
    if (++parts === 2) throw Object.assign(new Error('We encountered an internal error'), { name: 'InternalError', $metadata: { httpStatusCode: 500 } });
    return { ETag: `"p${parts}"` };
  });
  mock.on(sdk.AbortMultipartUploadCommand).resolves({});
  const sink = await S3UploadSink.open('s3://bkt/k', { partSize: 5 * MiB, queueSize: 1 });
  const chunk = Buffer.alloc(MiB, 1);
  await assert.rejects(
    (async () => {
      for (let i = 0; i < 20; i++) await sink.write(chunk);
      await sink.close();
    })(),
    (err: unknown) => err instanceof ObjectStorageError && err.reason === 'failed' && err.status === 500,
  );
  await sink.abort();
  assert.equal(mock.commandCalls(sdk.AbortMultipartUploadCommand).length, 1);
  assert.equal(mock.commandCalls(sdk.AbortMultipartUploadCommand)[0]!.args[0].input.UploadId, 'u1');
  assert.equal(mock.commandCalls(sdk.CompleteMultipartUploadCommand).length, 0);
});

test('mocked SDK: the completion is conditional (If-None-Match: *) unless overwriting; a 412 reads as "exists"', async (t) => {
  const { mockClient } = await import('aws-sdk-client-mock');
  const sdk = await import('@aws-sdk/client-s3');
  const client = new sdk.S3Client({ region: 'us-east-1', credentials: { accessKeyId: 'x', secretAccessKey: 'y' } });
  const mock = mockClient(client);
  t.after(() => {
    mock.restore();
    setS3Client(undefined);
  });
  setS3Client(client);
  mock.on(sdk.HeadObjectCommand).rejects(Object.assign(new Error('not found'), { name: 'NotFound', $metadata: { httpStatusCode: 404 } }));
  mock.on(sdk.CreateMultipartUploadCommand).resolves({ UploadId: 'u2' });
  mock.on(sdk.UploadPartCommand).resolves({ ETag: '"e"' });
  mock.on(sdk.CompleteMultipartUploadCommand).rejects(Object.assign(new Error('At least one of the pre-conditions you specified did not hold'), { name: 'PreconditionFailed', $metadata: { httpStatusCode: 412 } }));
  mock.on(sdk.AbortMultipartUploadCommand).resolves({});
  mock.on(sdk.PutObjectCommand).resolves({});

  const sink = await S3UploadSink.open('s3://bkt/k', { partSize: 5 * MiB });
  for (let i = 0; i < 11; i++) await sink.write(Buffer.alloc(MiB, 2));
  await assert.rejects(sink.close(), (err: unknown) => err instanceof ObjectStorageError && err.reason === 'exists');
  const complete = mock.commandCalls(sdk.CompleteMultipartUploadCommand)[0]!.args[0].input;
  assert.equal(complete.IfNoneMatch, '*');
  assert.deepEqual(complete.MultipartUpload!.Parts!.map((p) => p.PartNumber), [1, 2, 3]);
  assert.equal(mock.commandCalls(sdk.AbortMultipartUploadCommand).length, 1);

  // Small objects go up in one PutObject, conditional the same way; with overwrite, unconditional.
  const small = await S3UploadSink.open('s3://bkt/small', {});
  await small.write(Buffer.alloc(1000, 3));
  await small.close();
  assert.equal(mock.commandCalls(sdk.PutObjectCommand)[0]!.args[0].input.IfNoneMatch, '*');
  const forced = await S3UploadSink.open('s3://bkt/small', { overwrite: true });
  await forced.write(Buffer.alloc(10, 3));
  await forced.close();
  assert.equal(mock.commandCalls(sdk.PutObjectCommand)[1]!.args[0].input.IfNoneMatch, undefined);
});
