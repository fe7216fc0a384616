/** Small helpers over Uint8Array/DataView shared by the codec. Runtime-neutral: no node: imports. */

import { CorruptImageError, LimitExceededError, type StructureContext } from '../errors.js';

/** A DataView over exactly the bytes of `bytes` (never the whole underlying buffer). */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const TWO_POW_32 = 0x1_0000_0000;
/** High words at or above this make a 64-bit value ≥ 2^53. */
const SAFE_HI_LIMIT = 0x20_0000;

/**
 * Reads a big-endian u64 as a JS number. Values ≥ 2^53 cannot be held exactly and are refused
 * with a typed error that names the field.
 */
export function getU64(view: DataView, pos: number, context: StructureContext = {}): number {
  const hi = view.getUint32(pos);
  const lo = view.getUint32(pos + 4);
  if (hi >= SAFE_HI_LIMIT) {
    throw new LimitExceededError(
      `${describe(context)} is 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}, beyond 2^53`,
      { ...context, limit: Number.MAX_SAFE_INTEGER },
    );
  }
  return hi * TWO_POW_32 + lo;
}

/** Writes a non-negative safe integer as a big-endian u64. */
export function setU64(view: DataView, pos: number, value: number): void {
  view.setUint32(pos, Math.floor(value / TWO_POW_32));
  view.setUint32(pos + 4, value >>> 0);
}

/** Reads a big-endian u64 as a bigint (feature bit fields). */
export function getU64Big(view: DataView, pos: number): bigint {
  return view.getBigUint64(pos);
}

/** Writes a bigint as a big-endian u64 (taken modulo 2^64). */
export function setU64Big(view: DataView, pos: number, value: bigint): void {
  view.setBigUint64(pos, BigInt.asUintN(64, value));
}

/** `value` rounded up to a multiple of `alignment`. */
export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

/** `a / b` rounded up: how many `b`-sized pieces hold `a`. */
export function divCeil(a: number, b: number): number {
  return Math.ceil(a / b);
}

/** True when `value` is a multiple of `alignment`. */
export function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

/** How an error message names a value: its structure and field (`header cluster_bits`), or `value`. */
export function describe(context: StructureContext): string {
  const where = [context.structure, context.field].filter(Boolean).join(' ');
  return where || 'value';
}

/** Throws CorruptImageError unless `value` is a multiple of `alignment`. */
export function requireAligned(value: number, alignment: number, context: StructureContext): void {
  if (!isAligned(value, alignment)) {
    throw new CorruptImageError(
      `${describe(context)} 0x${value.toString(16)} is not aligned to ${alignment} bytes`,
      context,
    );
  }
}

const utf8 = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();

/** Decodes a name stored in an image; invalid UTF-8 becomes U+FFFD (the path policy refuses it). */
export function decodeName(bytes: Uint8Array): string {
  return utf8.decode(bytes);
}

/** Encodes a name to store in an image as UTF-8. */
export function encodeName(name: string): Uint8Array {
  return utf8Encoder.encode(name);
}
