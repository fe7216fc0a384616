/**
 * Compressed clusters decode as qemu decodes them (block/qcow2-threads.c): deflate fills the
 * cluster and ignores what follows; zstd requires the frame that filled the cluster to end
 * there, and anything else is corruption (qemu: EIO), never the bytes of a damaged stream.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as zlib from 'node:zlib';
import { decompressCluster } from '../../src/read/decompress.js';
import { COMPRESSION_ZSTD } from '../../src/format/index.js';
import { isQcow2StreamError } from '../../src/errors.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;
const DEFLATE = 0;

/** Compressible bytes that differ along their length (so a wrong window shows). */
function sample(length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i += 16) out.write(`${(i / 16).toString(36).padStart(15, '.')}\n`, i);
  return out;
}

function corruptError(err: unknown): boolean {
  assert.ok(isQcow2StreamError(err), String(err));
  assert.equal(err.code, 'QCOW_ERR_CORRUPT_IMAGE', err.message);
  return true;
}

test('deflate: exactly one cluster decodes', () => {
  const data = sample(CLUSTER);
  const out = new Uint8Array(CLUSTER);
  decompressCluster(zlib.deflateRawSync(data, { windowBits: 12 }), out, DEFLATE, 0);
  assert.ok(Buffer.from(out).equals(data));
});

test('deflate: a stream longer than one cluster gives its first cluster, as qemu does', () => {
  const data = sample(3 * CLUSTER);
  const stream = zlib.deflateRawSync(data, { windowBits: 12 });
  for (const bytes of [stream, stream.subarray(0, Math.ceil(stream.length * 0.7))]) {
    const out = new Uint8Array(CLUSTER);
    decompressCluster(bytes, out, DEFLATE, 0);
    assert.ok(Buffer.from(out).equals(data.subarray(0, CLUSTER)));
  }
  // Stored (uncompressed) blocks: one input byte per output byte.
  const stored = zlib.deflateRawSync(Buffer.from(data), { windowBits: 12, level: 0 });
  const out = new Uint8Array(CLUSTER);
  decompressCluster(stored, out, DEFLATE, 0);
  assert.ok(Buffer.from(out).equals(data.subarray(0, CLUSTER)));
});

test('deflate: a stream shorter than a cluster, or invalid, is corruption', () => {
  const short = zlib.deflateRawSync(sample(CLUSTER - 1), { windowBits: 12 });
  assert.throws(() => decompressCluster(short, new Uint8Array(CLUSTER), DEFLATE, 0), corruptError);
  assert.throws(() => decompressCluster(Buffer.from([0xff, 0xff, 0xff, 0xff]), new Uint8Array(CLUSTER), DEFLATE, 0), corruptError);
});

const zstdCompress = (zlib as unknown as { zstdCompressSync?: (data: Uint8Array) => Buffer }).zstdCompressSync;
const noZstd = zstdCompress ? false : 'this Node has no zstd compressor to make the frames (Node >= 22.15)';

test('zstd: one frame of one cluster decodes; trailing padding is ignored', { skip: noZstd }, () => {
  const data = sample(CLUSTER);
  const frame = zstdCompress!(data);
  const out = new Uint8Array(CLUSTER);
  decompressCluster(Buffer.concat([frame, Buffer.alloc(300)]), out, COMPRESSION_ZSTD, 0);
  assert.ok(Buffer.from(out).equals(data));
});

test('zstd: a frame that decodes to more than the cluster is corruption (qemu: EIO)', { skip: noZstd }, () => {
  const frame = zstdCompress!(sample(2 * CLUSTER));
  assert.throws(() => decompressCluster(frame, new Uint8Array(CLUSTER), COMPRESSION_ZSTD, 0), corruptError);
});

test('zstd: damaged frames are corruption or, where a literal flipped, other bytes — never a longer cluster', { skip: noZstd }, () => {
  const data = sample(CLUSTER);
  const frame = zstdCompress!(data);
  for (let at = 4; at < frame.length; at += Math.max(1, Math.floor(frame.length / 64))) {
    const damaged = Buffer.from(frame);
    damaged[at] = (damaged[at] ?? 0) ^ 0x5a;
    try {
      decompressCluster(damaged, new Uint8Array(CLUSTER), COMPRESSION_ZSTD, 0);
    } catch (err) {
      corruptError(err); // typed, whatever the damage
    }
  }
  // A frame one sector too long, as a damaged size field would give: qemu's EIO, not a cluster.
  const grown = zstdCompress!(sample(CLUSTER + 512));
  assert.throws(() => decompressCluster(grown, new Uint8Array(CLUSTER), COMPRESSION_ZSTD, 0), corruptError);
});
