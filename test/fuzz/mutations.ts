/**
 * Mutations of seed images, as fast-check arbitraries (so failures shrink to a short list of
 * byte edits), and header-shaped random files.
 *
 * Values are chosen where parsers break: 0, 1, 2^31, 2^32−1, 2^53, 2^56, all ones, the file
 * size, just past the end of the file, one byte off a cluster boundary, an aligned offset with
 * COPIED set, a compressed descriptor, or random bits.
 */

import fc from 'fast-check';
import { HEADER_FIELDS } from '../../src/format/index.js';
import type { Seed } from './seeds.js';

export const BOUNDARY_TAGS = [
  'zero',
  'one',
  '2^31',
  '2^32-1',
  '2^53',
  '2^56',
  'ones',
  'file-size',
  'past-eof',
  'misaligned',
  'copied-cluster',
  'copied-past-eof',
  'compressed',
  'random',
] as const;
export type BoundaryTag = (typeof BOUNDARY_TAGS)[number];

export type Mutation =
  /** Overwrite `width` bytes at an aligned position of a structure with a boundary value. */
  | { kind: 'value'; region: number; at: number; width: 1 | 2 | 4 | 8; tag: BoundaryTag; random: bigint }
  /** Set one fixed header field to a boundary value. */
  | { kind: 'field'; field: number; tag: BoundaryTag; random: bigint }
  /** Flip one bit of a structure. */
  | { kind: 'flip'; region: number; at: number; bit: number }
  /** Cut the file (parts per 10,000 of its length). */
  | { kind: 'truncate'; keep: number }
  /** Append bytes (a file longer than its metadata says is legal; garbage after it too). */
  | { kind: 'append'; length: number; fill: number };

export interface MutationCase {
  seed: number;
  mutations: Mutation[];
}

const WIDTHS = [1, 2, 4, 8] as const;
const FIELD_WIDTH = { u8: 1, u32: 4, u64: 8, bits64: 8 } as const;

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('value' as const), region: fc.nat(), at: fc.nat(), width: fc.constantFrom(...WIDTHS), tag: fc.constantFrom(...BOUNDARY_TAGS), random: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('field' as const), field: fc.nat({ max: HEADER_FIELDS.length - 1 }), tag: fc.constantFrom(...BOUNDARY_TAGS), random: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('flip' as const), region: fc.nat(), at: fc.nat(), bit: fc.nat({ max: 7 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate' as const), keep: fc.nat({ max: 9999 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('append' as const), length: fc.nat({ max: 70000 }), fill: fc.nat({ max: 255 }) }) },
);

export function mutationCaseArb(seedCount: number): fc.Arbitrary<MutationCase> {
  return fc.record({ seed: fc.nat({ max: seedCount - 1 }), mutations: fc.array(mutationArb, { minLength: 1, maxLength: 4 }) });
}

function boundaryValue(tag: BoundaryTag, random: bigint, fileSize: number, clusterSize: number): bigint {
  const COPIED = 1n << 63n;
  const pastEof = BigInt(Math.ceil(fileSize / clusterSize) * clusterSize + clusterSize);
  switch (tag) {
    case 'zero': return 0n;
    case 'one': return 1n;
    case '2^31': return 1n << 31n;
    case '2^32-1': return (1n << 32n) - 1n;
    case '2^53': return 1n << 53n;
    case '2^56': return 1n << 56n;
    case 'ones': return (1n << 64n) - 1n;
    case 'file-size': return BigInt(fileSize);
    case 'past-eof': return pastEof;
    case 'misaligned': return BigInt(clusterSize - 1);
    case 'copied-cluster': return COPIED | (BigInt(clusterSize) * (random % BigInt(Math.max(1, Math.floor(fileSize / clusterSize)))));
    case 'copied-past-eof': return COPIED | pastEof;
    case 'compressed': return (1n << 62n) | (random & ((1n << 62n) - 1n));
    case 'random': return random;
  }
}

function writeValue(bytes: Buffer, at: number, width: number, value: bigint): void {
  const fitted = BigInt.asUintN(width * 8, value);
  for (let i = 0; i < width; i++) {
    const pos = at + i;
    if (pos < bytes.length) bytes[pos] = Number((fitted >> BigInt((width - 1 - i) * 8)) & 0xffn);
  }
}

/** Applies a case's mutations to a copy of its seed; truncation and appends come last. */
export function applyMutations(seed: Seed, mutations: readonly Mutation[]): Buffer {
  let bytes = Buffer.from(seed.bytes);
  const size = bytes.length;
  const regionOf = (index: number) => seed.regions[index % seed.regions.length]!;
  for (const m of mutations) {
    switch (m.kind) {
      case 'value': {
        const region = regionOf(m.region);
        const slots = Math.max(1, Math.floor(region.length / m.width));
        writeValue(bytes, region.start + (m.at % slots) * m.width, m.width, boundaryValue(m.tag, m.random, size, seed.clusterSize));
        break;
      }
      case 'field': {
        const field = HEADER_FIELDS[m.field]!;
        const width = FIELD_WIDTH[field.kind];
        let value = boundaryValue(m.tag, m.random, size, seed.clusterSize);
        // Feature words: a single bit is the interesting mutation more often than a number.
        if (field.kind === 'bits64' && m.tag === 'random') value = 1n << (m.random % 64n);
        writeValue(bytes, field.offset, width, value);
        break;
      }
      case 'flip': {
        const region = regionOf(m.region);
        const pos = region.start + (m.at % region.length);
        bytes[pos] = (bytes[pos] ?? 0) ^ (1 << m.bit);
        break;
      }
      case 'truncate':
      case 'append':
        break;
    }
  }
  for (const m of mutations) {
    if (m.kind === 'truncate') bytes = bytes.subarray(0, Math.floor((bytes.length * m.keep) / 10000));
    if (m.kind === 'append') bytes = Buffer.concat([bytes, Buffer.alloc(m.length, m.fill)]);
  }
  return bytes;
}

/**
 * Files that start like a qcow2 header (magic, version 2 or 3, fields from the boundary set)
 * followed by random bytes, and files of pure random bytes.
 */
export const randomFileArb: fc.Arbitrary<Uint8Array> = fc.oneof(
  fc.uint8Array({ maxLength: 4096 }),
  fc
    .record({
      version: fc.constantFrom(2, 3, 3, 3, 4),
      fields: fc.array(fc.record({ field: fc.nat({ max: HEADER_FIELDS.length - 1 }), tag: fc.constantFrom(...BOUNDARY_TAGS), random: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }), { maxLength: 12 }),
      clusterBits: fc.integer({ min: 9, max: 16 }),
      tail: fc.uint8Array({ minLength: 0, maxLength: 16384 }),
    })
    .map(({ version, fields, clusterBits, tail }) => {
      const bytes = Buffer.alloc(Math.max(112, tail.length));
      bytes.set(tail.subarray(0, bytes.length));
      bytes.writeUInt32BE(0x514649fb, 0);
      bytes.writeUInt32BE(version, 4);
      bytes.writeUInt32BE(clusterBits, 20);
      bytes.writeUInt32BE(112, 100);
      bytes.writeUInt32BE(0, 32);
      for (const f of fields) {
        const spec = HEADER_FIELDS[f.field]!;
        if (spec.key === 'magic') continue;
        writeValue(bytes, spec.offset, FIELD_WIDTH[spec.kind], boundaryValue(f.tag, f.random, bytes.length, 2 ** clusterBits));
      }
      return new Uint8Array(bytes);
    }),
);
