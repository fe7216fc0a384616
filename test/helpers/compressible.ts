/** Raw images that compress like real disks do: some clusters halve, some do not shrink. */

import { patternBytes, randomBytesAt } from './images.js';

/** Bytes from a 16-letter alphabet: deflate halves them, so compressed clusters straddle host clusters. */
function textBytes(seed: number, length: number): Buffer {
  const random = randomBytesAt(seed, 0, length);
  for (let i = 0; i < length; i++) random[i] = 0x61 + (random[i]! & 15);
  return random;
}

/** A raw image by plan: 't' text (compresses to about half), 'r' random (does not), 'z' zeros, 'p' a pattern, digits = copies of template d. */
export function buildCompressible(plan: string, cs: number, tail = 0): Buffer {
  const parts = [...plan].map((c, i) => {
    if (c === 't') return textBytes(i + 1, cs);
    if (c === 'r') return randomBytesAt(i + 3, 0, cs);
    if (c === 'z') return Buffer.alloc(cs);
    if (c === 'p') return patternBytes(cs, 0x40 + i);
    return textBytes(1000 + Number(c), cs);
  });
  if (tail) parts.push(textBytes(99, tail));
  return Buffer.concat(parts);
}

