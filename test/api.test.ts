import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as api from '../src/index.js';
import * as transforms from '../transforms/index.js';

test('the package entry points export the documented API', () => {
  for (const name of ['convert', 'wrap', 'openImage', 'openDisk', 'exportStream', 'exportToFile', 'checkImage', 'compareImages', 'mapImage', 'readImageInfo', 'createClusterizeStream', 'createFileBlockSource', 'createExternalSink', 'InternalImageWriter', 'OffsetWriter', 'resolveStoredName', 'isQcow2StreamError', 'Qcow2StreamError']) {
    assert.ok(name in api, `qcow2-stream exports ${name}`);
  }
  assert.equal(typeof api.format.parseHeader, 'function');
  for (const name of ['zeroDetect', 'createZeroDetectStream', 'createHasher', 'dedupBlocks', 'createDedupStream', 'compareWithBase', 'compareWithManifest', 'ManifestWriter', 'ManifestReader', 'FingerprintIndex']) {
    assert.ok(name in transforms, `qcow2-stream/transforms exports ${name}`);
  }
});

test('every error class carries its stable code and is recognised across copies', () => {
  const err = new api.CorruptImageError('x', { structure: 'L2 entry', offset: 8 });
  assert.equal(err.code, 'QCOW_ERR_CORRUPT_IMAGE');
  assert.ok(err instanceof api.Qcow2StreamError);
  assert.ok(err instanceof api.CorruptImageError);
  assert.ok(!(err instanceof api.PathPolicyError));
  assert.equal(err.structure, 'L2 entry');
  // A look-alike from another copy of the package (same registered brand) is recognised.
  const foreign = Object.create(null) as Record<symbol, unknown>;
  Object.defineProperty(foreign, Symbol.for('qcow2-stream.error'), { value: 'QCOW_ERR_CORRUPT_IMAGE' });
  assert.ok(api.isQcow2StreamError(foreign));
  assert.ok((foreign as unknown) instanceof api.CorruptImageError);
});
