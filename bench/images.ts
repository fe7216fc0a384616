/**
 * Deterministic benchmark images. Content depends only on (seed, block index), so two runs
 * produce identical files. Blocks are 64 KiB.
 *
 * - mixed: extents of 1–64 blocks, 40% random, 20% holes, 20% written zeros, 20% copies of 64
 *   random template blocks (the image the reference measurements used);
 * - sparse: 1% of the blocks random data, scattered in 1 MiB extents, the rest holes;
 * - dedup: 70% copies of 256 templates, 20% random, 10% holes.
 */

import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { createCipheriv, createHash } from 'node:crypto';

export const BLOCK = 64 * 1024;

export type ImageKind = 'mixed' | 'sparse' | 'dedup';

function keystream(seed: number, blockIndex: number, blocks = 1): Buffer {
  const key = createHash('sha256').update(`qcow2-stream-bench-${seed}`).digest();
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(blockIndex, 8);
  return createCipheriv('aes-256-ctr', key, iv).update(Buffer.alloc(blocks * BLOCK));
}

/** A small deterministic PRNG (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface ImageStats {
  blocks: number;
  random: number;
  zeros: number;
  holes: number;
  duplicates: number;
}

/** Writes the image and returns how its blocks are split. */
export function generateImage(path: string, kind: ImageKind, size: number, seed = 59): ImageStats {
  const blocks = Math.ceil(size / BLOCK);
  const random = prng(seed);
  const stats: ImageStats = { blocks, random: 0, zeros: 0, holes: 0, duplicates: 0 };
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    const templates = kind === 'mixed' ? 64 : kind === 'dedup' ? 256 : 0;
    const templateData = templates ? keystream(seed + 1, 0, templates) : Buffer.alloc(0);
    const zeros = Buffer.alloc(64 * BLOCK);
    const write = (data: Buffer, block: number) => {
      const bytes = Math.min(data.length, size - block * BLOCK);
      if (bytes > 0) writeSync(fd, data, 0, bytes, block * BLOCK);
    };
    for (let b = 0; b < blocks; ) {
      if (kind === 'sparse') {
        const extent = 16;
        if (random() < 0.01) {
          write(keystream(seed, b, Math.min(extent, blocks - b)), b);
          stats.random += Math.min(extent, blocks - b);
        } else stats.holes += Math.min(extent, blocks - b);
        b += extent;
        continue;
      }
      const n = Math.min(blocks - b, 1 + Math.floor(random() * 64));
      const r = random();
      const split = kind === 'mixed' ? [0.4, 0.6, 0.8] : [0.2, 0.3, 0.3];
      if (r < split[0]!) {
        write(keystream(seed, b, n), b);
        stats.random += n;
      } else if (r < split[1]!) {
        stats.holes += n;
      } else if (r < split[2]!) {
        write(zeros.subarray(0, n * BLOCK), b);
        stats.zeros += n;
      } else {
        const out = Buffer.allocUnsafe(n * BLOCK);
        for (let i = 0; i < n; i++) {
          const t = Math.floor(random() * templates);
          templateData.copy(out, i * BLOCK, t * BLOCK, (t + 1) * BLOCK);
        }
        write(out, b);
        stats.duplicates += n;
      }
      b += n;
    }
  } finally {
    closeSync(fd);
  }
  return stats;
}
