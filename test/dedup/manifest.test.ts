import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { createHasher } from '../../transforms/fingerprint.js';
import { ManifestReader, ManifestWriter, MANIFEST_HEADER_LENGTH, decodeManifestHeader } from '../../transforms/manifest.js';
import { tempDir } from '../helpers/qemu.js';
import { isQcow2StreamError } from '../../src/errors.js';

test('writes every cluster fingerprint and reads them back', async (t) => {
  const dir = tempDir(t);
  const hasher = await createHasher();
  const path = join(dir, 'disk.xxh');
  const clusterBits = 12;
  const size = 5 * 4096 + 1536; // short last cluster
  const writer = await ManifestWriter.create({ output: path, hasher, clusterSize: 2 ** clusterBits });
  const data = [new Uint8Array(4096).fill(1), new Uint8Array(4096).fill(2)];
  await writer.add({ index: 0, data: data[0]! });
  await writer.add({ index: 1, data: new Uint8Array(4096), zero: true });
  await writer.add({ index: 3, data: data[1]! }); // cluster 2 skipped: recorded as zeros
  await writer.finish(size);

  const bytes = readFileSync(path);
  assert.equal(bytes.length, MANIFEST_HEADER_LENGTH + 6 * 8);
  const header = decodeManifestHeader(bytes);
  assert.deepEqual(header, { version: 1, hashKind: 1, clusterBits, virtualSize: size, clusterCount: 6 });

  const reader = await ManifestReader.open(path);
  t.after(() => reader.close());
  const zero = hasher.hash64(new Uint8Array(4096));
  assert.equal(await reader.fingerprintAt(0), hasher.hash64(data[0]!));
  assert.equal(await reader.fingerprintAt(1), zero);
  assert.equal(await reader.fingerprintAt(2), zero);
  assert.equal(await reader.fingerprintAt(3), hasher.hash64(data[1]!));
  assert.equal(await reader.fingerprintAt(4), zero);
  assert.equal(await reader.fingerprintAt(5), hasher.hash64(new Uint8Array(1536)), 'the short last cluster hashes only its bytes');
  assert.equal(await reader.fingerprintAt(6), undefined);
  assert.deepEqual(readdirSync(dir), ['disk.xxh'], 'no temporary file left');
});

test('an aborted manifest leaves nothing behind', async (t) => {
  const dir = tempDir(t);
  const writer = await ManifestWriter.create({ output: join(dir, 'm.xxh'), hasher: await createHasher(), clusterSize: 65536 });
  await writer.add({ index: 0, data: new Uint8Array(65536).fill(9) });
  await writer.abort();
  assert.deepEqual(readdirSync(dir), []);
});

test('refuses files that are not manifests, with a typed error', async () => {
  const bad = new Uint8Array(64);
  assert.throws(() => decodeManifestHeader(bad), (err: unknown) => isQcow2StreamError(err) && err.code === 'QCOW_ERR_CORRUPT_IMAGE');
  assert.throws(() => decodeManifestHeader(new Uint8Array(10)), (err: unknown) => isQcow2StreamError(err) && err.code === 'QCOW_ERR_UNEXPECTED_EOF');
});
