/**
 * Deterministic raw test images. A layout is a list of extents; content depends only on the
 * seed and the byte offset, so any two runs produce the same bytes.
 */

import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { createCipheriv, createHash } from 'node:crypto';

export type ExtentKind = 'random' | 'zeros' | 'hole' | 'pattern';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

/** Pseudo-random bytes for [offset, offset+length) under a seed (AES-CTR keystream). */
export function randomBytesAt(seed: number, offset: number, length: number): Buffer {
  const key = createHash('sha256').update(`qcow2-stream-test-${seed}`).digest();
  const block = Math.floor(offset / 16);
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(Math.floor(block / 2 ** 32), 8);
  iv.writeUInt32BE(block >>> 0, 12);
  const cipher = createCipheriv('aes-256-ctr', key, iv);
  const skip = offset - block * 16;
  const out = cipher.update(Buffer.alloc(skip + length));
  return out.subarray(skip);
}

/** A small repeating non-zero pattern (compresses well; used for duplicate clusters). */
export function patternBytes(length: number, value = 0x5a): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (value + (i % 251)) & 0xff || 1;
  return out;
}

/** Writes a raw image of `size` bytes: holes everywhere except the given extents. */
export function writeRawImage(path: string, size: number, extents: readonly Extent[], seed = 1): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const e of extents) {
      if (e.kind === 'hole') continue;
      const end = Math.min(size, e.offset + e.length);
      for (let pos = e.offset; pos < end; pos += 1 << 20) {
        const n = Math.min(1 << 20, end - pos);
        const bytes = e.kind === 'zeros' ? Buffer.alloc(n) : e.kind === 'pattern' ? patternBytes(n) : randomBytesAt(seed, pos, n);
        writeSync(fd, bytes, 0, n, pos);
      }
    }
  } finally {
    closeSync(fd);
  }
}

/** A mixed layout of random data, written zeros and holes, with data in cluster 0 and at the end. */
export function mixedExtents(size: number, clusterSize: number, seed = 1): Extent[] {
  const extents: Extent[] = [{ offset: 0, length: Math.min(size, 1000), kind: 'random' }];
  let state = seed >>> 0 || 1;
  const next = () => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return state / 2 ** 32;
  };
  for (let pos = clusterSize; pos < size; ) {
    const length = Math.min(size - pos, Math.max(1, Math.floor(next() * 8)) * clusterSize - Math.floor(next() * 3) * 333);
    const r = next();
    const kind: ExtentKind = r < 0.4 ? 'random' : r < 0.6 ? 'zeros' : r < 0.8 ? 'hole' : 'pattern';
    extents.push({ offset: pos, length, kind });
    pos += Math.max(1, length);
  }
  if (size > 0) extents.push({ offset: Math.max(0, size - 700), length: 700, kind: 'random' });
  return extents;
}
