/**
 * Helpers for the codec tests: crafting (possibly hostile) header clusters byte by byte, and
 * asserting typed errors by code and context rather than by class alone.
 */

import assert from 'node:assert/strict';
import {
  encodeHeaderFields,
  INCOMPAT_DATA_FILE,
  QCOW2_MAGIC,
  type HeaderFields,
} from '../../src/format/index.js';
import { Qcow2StreamError, type ErrorCode } from '../../src/errors.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;
export const PiB = 1024 * TiB;

/** The fixed fields of the 4 MiB data-file image qemu made in digest §2.2. */
export const QEMU_4M_FIELDS: HeaderFields = {
  magic: QCOW2_MAGIC,
  version: 3,
  backingFileOffset: 0,
  backingFileSize: 0,
  clusterBits: 16,
  size: 4 * MiB,
  cryptMethod: 0,
  l1Size: 1,
  l1TableOffset: 0x30000,
  refcountTableOffset: 0x10000,
  refcountTableClusters: 1,
  nbSnapshots: 0,
  snapshotsOffset: 0,
  incompatibleFeatures: INCOMPAT_DATA_FILE,
  compatibleFeatures: 0n,
  autoclearFeatures: 0n,
  refcountOrder: 4,
  headerLength: 112,
  compressionType: 0,
};

export interface RawExtension {
  type: number;
  data: Uint8Array;
  /** Length written in the frame; defaults to data.length (override to forge overruns). */
  len?: number;
}

export interface CraftOptions {
  /** Field values; anything not given comes from {@link QEMU_4M_FIELDS}. */
  fields?: Partial<HeaderFields>;
  /** Length of the returned buffer; default: the cluster size (64 KiB for invalid cluster_bits). */
  length?: number;
  /** Extensions written from header_length (72 for v2), each padded to 8 bytes, then END. */
  extensions?: readonly RawExtension[];
  /** Bytes written verbatim at header offsets (applied last). */
  patches?: readonly { at: number; bytes: Uint8Array }[];
}

/**
 * Builds cluster 0 by hand, independently of encodeHeaderCluster. All fixed fields are written
 * (header_length is written raw, whatever its value), so a test can forge any combination.
 */
export function craftCluster0(options: CraftOptions = {}): Uint8Array {
  const fields: HeaderFields = { ...QEMU_4M_FIELDS, ...options.fields };
  const cb = fields.clusterBits;
  const length = options.length ?? (cb >= 9 && cb <= 21 ? 2 ** cb : 64 * KiB);
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  if (fields.version === 2) {
    encodeHeaderFields(view, { ...fields, headerLength: 72 });
  } else {
    encodeHeaderFields(view, { ...fields, headerLength: 112 });
    view.setUint32(100, fields.headerLength);
    // header_length < 112: the bytes from header_length on belong to the extension area
    if (fields.headerLength < 112) out.fill(0, Math.max(fields.headerLength, 104), 112);
  }
  let pos = fields.version === 2 ? 72 : fields.headerLength;
  for (const ext of options.extensions ?? []) {
    view.setUint32(pos, ext.type);
    view.setUint32(pos + 4, ext.len ?? ext.data.length);
    out.set(ext.data, pos + 8);
    pos += 8 + Math.ceil(ext.data.length / 8) * 8;
  }
  for (const patch of options.patches ?? []) out.set(patch.bytes, patch.at);
  return out;
}

export function ascii(text: string): Uint8Array {
  return new TextEncoder().encode(text);
}

export function hexToBytes(hex: string): Uint8Array {
  const clean = hex.replace(/[^0-9a-f]/gi, '');
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(i * 2, i * 2 + 2), 16);
  return out;
}

export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

/** Copies `bytes` into a larger buffer at `offset` and returns a view of exactly those bytes. */
export function atOffset(bytes: Uint8Array, offset = 24, slack = 40): Uint8Array {
  const big = new Uint8Array(offset + bytes.length + slack).fill(0xa5);
  big.set(bytes, offset);
  return new Uint8Array(big.buffer, offset, bytes.length);
}

/** A u64 as a bigint, for writing test entries exactly. */
export function u64(view: DataView, pos: number, value: bigint): void {
  view.setBigUint64(pos, value);
}

/** An 8-byte buffer holding one big-endian u64 entry. */
export function entryView(value: bigint, pad = 0): { view: DataView; pos: number } {
  const buf = new ArrayBuffer(pad + 8 + 16);
  const view = new DataView(buf, 3); // non-zero byteOffset on purpose
  view.setBigUint64(pad, value);
  return { view, pos: pad };
}

export interface ExpectedError {
  code: ErrorCode;
  /** Expected `field` (use `undefined` to assert that none is set). */
  field?: string | undefined;
  structure?: string;
  offset?: number;
  message?: RegExp;
}

/** Asserts that `fn` throws one of our errors with the given code and context. */
export function assertQcowError(fn: () => unknown, expected: ExpectedError): Qcow2StreamError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught !== undefined, `expected ${expected.code}, but nothing was thrown`);
  assert.ok(caught instanceof Qcow2StreamError, `expected a Qcow2StreamError, got ${String(caught)}`);
  const err = caught;
  assert.equal(err.code, expected.code, `code (message: ${err.message})`);
  if ('field' in expected) assert.equal(err.field, expected.field, `field (message: ${err.message})`);
  if (expected.structure !== undefined) assert.equal(err.structure, expected.structure, 'structure');
  if (expected.offset !== undefined) assert.equal(err.offset, expected.offset, 'offset');
  if (expected.message) assert.match(err.message, expected.message);
  return err;
}
