/**
 * Images read from object storage (`s3://` inputs of export, info, map, check, compare and
 * convert) against a real S3-compatible server (s3rver, a child process). Fixtures are made by
 * qemu-img locally, uploaded with the SDK, and every answer is held against the same command
 * on the local files (and qemu-img's). Transient failures, which s3rver cannot produce, are
 * tested against the SDK mocked with aws-sdk-client-mock at the end.
 */

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { openDisk } from '../../src/read/image.js';
import { mapImage } from '../../src/read/map.js';
import { ObjectStorageError } from '../../src/errors.js';
import { getObjectRange, READ_ATTEMPTS, s3Client, setS3Client } from '../../src/io/s3.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import type { GetObjectCommandOutput } from '@aws-sdk/client-s3';
import { listKeys, startS3, type S3Server } from '../helpers/servers.js';

const MiB = 1024 * 1024;
let s3: S3Server;

before(async () => {
  s3 = await startS3(['reads']);
  setS3Client(undefined);
});
after(async () => {
  setS3Client(undefined);
  await s3?.stop();
});

/** Puts a local file under `uri` with the SDK (the test's own uploader, not ours). */
async function upload(path: string, uri: string): Promise<void> {
  const { PutObjectCommand } = await import('@aws-sdk/client-s3');
  const [, bucket, key] = /^s3:\/\/([^/]+)\/(.+)$/.exec(uri)!;
  await s3Client().send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: readFileSync(path) }));
}

function ok(result: { code: number; stdout: string; stderr: string }, what: string): void {
  assert.equal(result.code, 0, `${what}: ${result.stderr}${result.stdout}`);
}

/** A qcow2 with a raw external data file, made by qemu-img from a raw image with data, zeros and holes; and qemu's raw export of it. */
function qcow2WithDataFile(dir: string, size: number, seed: number): { raw: string; reference: string } {
  const raw = join(dir, 'src.raw');
  writeRawImage(raw, size, mixedExtents(size, 65536, seed), seed);
  ok(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'data_file=disk.data,data_file_raw=on', 'src.raw', 'disk.qcow2'], dir), 'qemu-img convert');
  ok(qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', 'disk.qcow2', 'reference.raw'], dir), 'qemu-img convert -O raw');
  return { raw, reference: join(dir, 'reference.raw') };
}

test('export of a qcow2 + data file stored as objects is byte-identical to qemu-img convert -O raw of the local original (file and stdout)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const { reference } = qcow2WithDataFile(dir, 12 * MiB + 4096, 31);
  await upload(join(dir, 'disk.qcow2'), 's3://reads/vm1/disk.qcow2');
  await upload(join(dir, 'disk.data'), 's3://reads/vm1/disk.data');

  ok(runCli(['export', 's3://reads/vm1/disk.qcow2', join(dir, 'out.raw'), '--no-sync', '-q'], { env: s3.env }), 'export to a file');
  assert.ok(readFileSync(join(dir, 'out.raw')).equals(readFileSync(reference)), 'the exported file differs from qemu-img convert -O raw');
  const piped = runCli(['export', 's3://reads/vm1/disk.qcow2', '-', '-q'], { env: s3.env });
  assert.equal(piped.code, 0, piped.stderr);
  assert.ok(piped.stdoutBytes.equals(readFileSync(reference)), 'the exported stream differs from qemu-img convert -O raw');
  // And into an object: s3 to s3.
  ok(runCli(['export', 's3://reads/vm1/disk.qcow2', 's3://reads/vm1/disk.raw', '-q'], { env: s3.env }), 'export to an object');
  ok(runCli(['compare', '-f', 'raw', 's3://reads/vm1/disk.raw', reference, '-q'], { env: s3.env }), 'compare the exported object');
});

test('info, map, check and compare of objects agree with the same commands on the local files', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const { raw } = qcow2WithDataFile(dir, 9 * MiB, 32);
  // A backing chain too: the overlay names its base by a relative name, a sibling key.
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'disk.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir), 'qemu-img create overlay');
  ok(qemuIo(['-c', 'write -P 0x33 1M 192k', '-c', 'write -z 4M 64k', 'overlay.qcow2'], dir), 'qemu-io');
  for (const name of ['disk.qcow2', 'disk.data', 'overlay.qcow2']) await upload(join(dir, name), `s3://reads/night/${name}`);

  for (const name of ['disk.qcow2', 'overlay.qcow2']) {
    const uri = `s3://reads/night/${name}`;
    const local = join(dir, name);
    const infoLocal = JSON.parse(runCli(['info', '--json', local]).stdout) as Record<string, unknown>;
    const infoObject = runCli(['info', '--json', uri], { env: s3.env });
    ok(infoObject, `info ${uri}`);
    const parsed = JSON.parse(infoObject.stdout) as Record<string, unknown>;
    assert.equal(parsed['filename'], uri);
    // An object stores every byte: its actual size is its length.
    assert.equal(parsed['actual-size'], readFileSync(local).length);
    for (const info of [infoLocal, parsed]) {
      delete info['filename'];
      delete info['actual-size'];
      delete info['full-backing-filename'];
    }
    assert.deepEqual(parsed, infoLocal, `info ${name}`);

    const mapLocal = runCli(['map', '--json', local]);
    ok(mapLocal, `map ${local}`);
    const mapObject = runCli(['map', '--json', uri], { env: s3.env });
    ok(mapObject, `map ${uri}`);
    assert.equal(mapObject.stdout, mapLocal.stdout, `map ${name}`);

    const checkLocal = JSON.parse(runCli(['check', '--json', local]).stdout) as Record<string, unknown>;
    const checkObject = runCli(['check', '--json', uri], { env: s3.env });
    ok(checkObject, `check ${uri}`);
    const checked = JSON.parse(checkObject.stdout) as Record<string, unknown>;
    delete checked['filename'];
    delete checkLocal['filename'];
    assert.deepEqual(checked, checkLocal, `check ${name}`);

    const same = runCli(['compare', uri, local], { env: s3.env });
    assert.equal(same.code, 0, same.stderr);
    assert.equal(same.stdout, 'Images are identical.\n');
  }
  // The overlay differs from the base where it was written, at the same offset as locally.
  const differs = runCli(['compare', 's3://reads/night/disk.qcow2', 's3://reads/night/overlay.qcow2'], { env: s3.env });
  const differsLocal = runCli(['compare', join(dir, 'disk.qcow2'), join(dir, 'overlay.qcow2')]);
  assert.deepEqual([differs.code, differs.stdout], [differsLocal.code, differsLocal.stdout]);
  assert.equal(differs.code, 1);
  ok(runCli(['compare', '-f', 'raw', raw, 's3://reads/night/disk.qcow2', '-q'], { env: s3.env }), 'compare raw with the object');
});

test('convert reads a qcow2 (and VMDK, VHD, VHDX) from object storage through its reader, not as raw bytes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const { raw } = qcow2WithDataFile(dir, 6 * MiB, 33);
  await upload(join(dir, 'disk.qcow2'), 's3://reads/conv/disk.qcow2');
  await upload(join(dir, 'disk.data'), 's3://reads/conv/disk.data');
  ok(runCli(['convert', 's3://reads/conv/disk.qcow2', join(dir, 'out.qcow2'), '--no-sync', '-q'], { env: s3.env }), 'convert s3 qcow2');
  assert.equal(qemuCheck('out.qcow2', dir).code, 0);
  assert.equal(qemuCompare(raw, 'out.qcow2', dir).code, 0);

  // Every reader: the formats qemu-img makes, read from objects, exported equal to the source.
  for (const [format, options] of [['vmdk', 'subformat=monolithicSparse'], ['vmdk', 'subformat=streamOptimized'], ['vpc', 'subformat=dynamic'], ['vhdx', 'subformat=dynamic'], ['qcow2', 'compression_type=zlib']] as const) {
    const name = `img-${format}-${options.replace(/\W/g, '')}`;
    ok(qemuImg(['convert', '-f', 'raw', '-O', format, '-o', options, ...(format === 'qcow2' ? ['-c'] : []), 'src.raw', name], dir), `qemu-img convert -O ${format}`);
    ok(qemuImg(['convert', '-O', 'raw', name, `${name}.raw`], dir), 'reference');
    await upload(join(dir, name), `s3://reads/conv/${name}`);
    const summary = await convert({ input: `s3://reads/conv/${name}`, output: join(dir, `${name}.qcow2`), sync: false });
    assert.equal(summary.virtualSize, readFileSync(join(dir, `${name}.raw`)).length, name);
    assert.equal(qemuCompare(`${name}.raw`, `${name}.qcow2`, dir).code, 0, name);
  }
});

test('names stored in an object image are sibling keys under the file path policy: escapes and absolute names are refused, no output left', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  qcow2WithDataFile(dir, 2 * MiB, 34);
  const original = readFileSync(join(dir, 'disk.qcow2'));
  const at = original.indexOf('disk.data');
  assert.ok(at > 0 && at < 65536);
  // Both targets exist, so what refuses them is the policy, not their absence.
  await upload(join(dir, 'disk.data'), 's3://reads/x.data');
  await upload(join(dir, 'disk.data'), 's3://reads/pol/disk.data');
  for (const [stored, why] of [
    ['../x.data', /escapes the image's prefix 's3:\/\/reads\/pol\/' with '\.\.'/],
    ['/x/y.data', /is an absolute path outside the image's prefix/],
    ['../../../', /leaves the bucket 'reads'/],
    ['s3:/x.dat', /looks like a protocol/],
  ] as const) {
    assert.equal(Buffer.byteLength(stored), 9);
    const patched = Buffer.from(original);
    patched.write(stored, at, 'latin1');
    const name = `bad-${Buffer.from(stored).toString('hex')}.qcow2`;
    writeFileSync(join(dir, name), patched);
    await upload(join(dir, name), `s3://reads/pol/${name}`);
    const out = join(dir, `${name}.raw`);
    const result = runCli(['export', `s3://reads/pol/${name}`, out], { env: s3.env });
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, why, stored);
    assert.match(result.stderr, /QCOW_ERR_PATH_POLICY|Refusing the data file/);
    assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
    assert.equal(existsSync(out), false);
    // The API says the same with its code.
    await assert.rejects(openDisk(`s3://reads/pol/${name}`), { code: 'QCOW_ERR_PATH_POLICY' });
  }
  // The same image read locally is refused by the file policy for the same reason.
  const escapeLocal = runCli(['export', join(dir, `bad-${Buffer.from('../x.data').toString('hex')}.qcow2`), join(dir, 'l.raw')]);
  assert.equal(escapeLocal.code, 2);
  assert.match(escapeLocal.stderr, /escapes the image directory/);
  // A sibling that passes the policy is read; naming it explicitly also works.
  ok(runCli(['export', 's3://reads/pol/disk.data', join(dir, 'sib.raw'), '-f', 'raw', '-q'], { env: s3.env }), 'raw object');
  ok(runCli(['export', `s3://reads/pol/bad-${Buffer.from('../x.data').toString('hex')}.qcow2`, join(dir, 'explicit.raw'), '--data-file', 's3://reads/x.data', '-q'], { env: s3.env }), 'explicit --data-file');
});

test('a missing object (image or data file) is a typed error naming the URI, never the credentials, and leaves no output', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  qcow2WithDataFile(dir, 2 * MiB, 35);
  await upload(join(dir, 'disk.qcow2'), 's3://reads/lonely/disk.qcow2'); // its data object is never uploaded
  for (const args of [
    ['export', 's3://reads/nowhere/disk.qcow2', join(dir, 'a.raw')],
    ['export', 's3://reads/nowhere/disk.qcow2', 's3://reads/nowhere/a.raw'],
    ['info', 's3://reads/nowhere/disk.qcow2'],
    ['map', 's3://reads/nowhere/disk.qcow2'],
    ['check', 's3://reads/nowhere/disk.qcow2'],
    ['compare', 's3://reads/nowhere/disk.qcow2', join(dir, 'disk.qcow2')],
    ['convert', 's3://reads/nowhere/disk.qcow2', join(dir, 'a.qcow2')],
  ]) {
    const result = runCli(args, { env: s3.env });
    assert.equal(result.code, 2, `${args.join(' ')}: ${result.stderr}`);
    assert.match(result.stderr, /s3:\/\/reads\/nowhere\/disk\.qcow2/);
    assert.match(result.stderr, /does not exist/);
    assert.doesNotMatch(result.stderr, new RegExp(s3.env['AWS_SECRET_ACCESS_KEY']!));
  }
  // Credentials pasted into a URI are refused without being echoed.
  const pasted = runCli(['info', 's3://AKIAEXAMPLE:wJalrSECRET@reads/nowhere/disk.qcow2'], { env: s3.env });
  assert.equal(pasted.code, 2);
  assert.match(pasted.stderr, /'s3:\/\/\*\*\*@reads\/…' carries credentials/);
  assert.doesNotMatch(pasted.stderr, /AKIAEXAMPLE|wJalrSECRET/);
  await assert.rejects(openDisk('s3://reads/nowhere/disk.qcow2'), (err: unknown) => err instanceof ObjectStorageError && err.reason === 'not-found' && err.uri === 's3://reads/nowhere/disk.qcow2');
  const noData = runCli(['export', 's3://reads/lonely/disk.qcow2', join(dir, 'b.raw')], { env: s3.env });
  assert.equal(noData.code, 2);
  assert.match(noData.stderr, /does not exist \(looked for 's3:\/\/reads\/lonely\/disk\.data'\)/);
  assert.deepEqual(readdirSync(dir).filter((n) => n.endsWith('.raw') && n !== 'src.raw' && n !== 'reference.raw'), []);
  assert.deepEqual((await listKeys('reads')).filter((k) => k.startsWith('nowhere/')), []);
});

test('reads are coalesced: tables come in 1 MiB pages, data in large ranges; memory does not follow the image size', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // 8 L2 tables (one per 512 MiB), each beside its one data cluster near the start of the file.
  ok(qemuImg(['create', '-q', '-f', 'qcow2', 'sparse.qcow2', '4G'], dir), 'create');
  const writes = Array.from({ length: 8 }, (_, i) => ['-c', `write -P ${i + 1} ${i * 512}M 64k`]).flat();
  ok(qemuIo([...writes, 'sparse.qcow2'], dir), 'qemu-io');
  await upload(join(dir, 'sparse.qcow2'), 's3://reads/co/sparse.qcow2');
  const { reference } = qcow2WithDataFile(dir, 40 * MiB, 36);
  await upload(join(dir, 'disk.qcow2'), 's3://reads/co/disk.qcow2');
  await upload(join(dir, 'disk.data'), 's3://reads/co/disk.data');

  const ranges: string[] = [];
  const client = s3Client();
  client.middlewareStack.add(
    (next) => async (args) => {
      const range = (args.input as { Range?: string }).Range;
      if (range) ranges.push(range);
      return next(args);
    },
    { step: 'initialize', name: 'countRanges' },
  );
  t.after(() => client.middlewareStack.remove('countRanges'));

  const sparse = await openDisk('s3://reads/co/sparse.qcow2');
  const entries = [];
  for await (const entry of mapImage(sparse)) entries.push(entry);
  await sparse.close();
  assert.equal(entries.filter((e) => e.data).length, 8);
  // Header, probe tail, L1 and 8 L2 tables: a handful of page reads, not one GET per table.
  assert.ok(ranges.length <= 4, `map made ${ranges.length} GETs: ${ranges.join(' ')}`);

  ranges.length = 0;
  const image = await openDisk('s3://reads/co/disk.qcow2');
  const { exportToFile } = await import('../../src/read/export.js');
  await exportToFile(image, join(dir, 'big.raw'), { sync: false });
  await image.close();
  assert.ok(readFileSync(join(dir, 'big.raw')).equals(readFileSync(reference)));
  const sizes = ranges.map((r) => {
    const [a, b] = r.slice('bytes='.length).split('-').map(Number);
    return b! - a! + 1;
  });
  // 40 MiB of data in 8 MiB ranges (plus the metadata's few pages), not 2 MiB per export read.
  assert.ok(sizes.filter((s) => s === 8 * MiB).length === 5, `ranges: ${ranges.join(' ')}`);
  assert.ok(ranges.length <= 9, `export made ${ranges.length} GETs`);
});

// ---- Failures s3rver cannot produce: the SDK mocked at the command level (aws-sdk-client-mock) ----

test('mocked SDK: a transient failure of a ranged GET is retried a bounded number of times; lasting ones fail typed, naming the URI', async (t) => {
  const { mockClient } = await import('aws-sdk-client-mock');
  const sdk = await import('@aws-sdk/client-s3');
  const client = new sdk.S3Client({ region: 'us-east-1', credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI-secret' }, maxAttempts: 1 });
  const mock = mockClient(client);
  t.after(() => {
    mock.restore();
    setS3Client(undefined);
  });
  setS3Client(client);
  // The one method our reader calls on a body.
  const body = (bytes: Uint8Array) => ({ transformToByteArray: async () => bytes }) as unknown as GetObjectCommandOutput['Body'];
  const internal = () => Object.assign(new Error('We encountered an internal error'), { name: 'InternalError', $metadata: { httpStatusCode: 500 } });

  let calls = 0;
  mock.on(sdk.GetObjectCommand).callsFake(async () => {
    if (++calls === 1) throw internal();
    return { Body: body(new Uint8Array(4).fill(7)) };
  });
  assert.deepEqual([...(await getObjectRange('s3://bkt/disk.qcow2', 0, 4))], [7, 7, 7, 7]);
  assert.equal(calls, 2);

  mock.reset();
  mock.on(sdk.GetObjectCommand).rejects(internal());
  await assert.rejects(getObjectRange('s3://bkt/disk.qcow2', 0, 4), (err: unknown) => {
    assert.ok(err instanceof ObjectStorageError && err.reason === 'failed' && err.status === 500);
    assert.match(err.message, /s3:\/\/bkt\/disk\.qcow2/);
    assert.doesNotMatch(err.message, /AKIDEXAMPLE|wJalrXUtnFEMI/);
    return true;
  });
  assert.equal(mock.commandCalls(sdk.GetObjectCommand).length, READ_ATTEMPTS);

  // Not retried: a denial, and an object replaced since its HEAD (If-Match fails with 412).
  for (const [error, reason, message] of [
    [Object.assign(new Error('Access Denied'), { name: 'AccessDenied', $metadata: { httpStatusCode: 403 } }), 'denied', /Access Denied/],
    [Object.assign(new Error('At least one of the pre-conditions you specified did not hold'), { name: 'PreconditionFailed', $metadata: { httpStatusCode: 412 } }), 'failed', /changed while it was read/],
  ] as const) {
    mock.reset();
    mock.on(sdk.GetObjectCommand).rejects(error);
    await assert.rejects(getObjectRange('s3://bkt/disk.qcow2', 0, 4, { etag: '"e1"' }), (err: unknown) => err instanceof ObjectStorageError && err.reason === reason && message.test(err.message));
    assert.equal(mock.commandCalls(sdk.GetObjectCommand).length, 1);
    assert.equal(mock.commandCalls(sdk.GetObjectCommand)[0]!.args[0].input.IfMatch, '"e1"');
  }

  // A body cut short is a transient failure too.
  mock.reset();
  mock.on(sdk.GetObjectCommand).callsFake(async () => ({ Body: body(new Uint8Array(2)) }));
  await assert.rejects(getObjectRange('s3://bkt/disk.qcow2', 0, 4), /returned 2 bytes for the range 0-3/);
  assert.equal(mock.commandCalls(sdk.GetObjectCommand).length, READ_ATTEMPTS);
});
