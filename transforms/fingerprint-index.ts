/**
 * A compact map from 64-bit fingerprints to a 32-bit value and a 32-bit counter, for dedup.
 *
 * Open addressing with linear probing over typed arrays: no JS object per entry, and no V8
 * `Map` (which stops at 2^24 entries). Each slot costs 16 bytes (key high/low words, value,
 * count); the table doubles at 70% load, so a unique cluster costs 16/0.7 ≈ 23 bytes on
 * average and at most 46 bytes right after a resize (the old table is released).
 * `maxEntries` caps the index: once full, lookups still work but inserts are refused, so dedup
 * degrades gracefully (later clusters are simply not deduplicated) and memory stays bounded.
 */

const EMPTY = 0xffffffff; // value marking a free slot
const MAX_LOAD = 0.7;

/** Memory per indexed fingerprint, in bytes, at the worst point (just after growing). */
export const INDEX_BYTES_PER_ENTRY_MAX = Math.ceil(16 / (MAX_LOAD / 2));
/** Average memory per indexed fingerprint between resizes. */
export const INDEX_BYTES_PER_ENTRY_AVERAGE = Math.ceil(16 / MAX_LOAD);

/** Options of a {@link FingerprintIndex}. */
export interface FingerprintIndexOptions {
  /** Stop indexing new fingerprints beyond this many (default 2^26 ≈ 67 M, ~1.5–3 GiB worst). */
  maxEntries?: number;
  /** Initial slots (rounded up to a power of two). */
  initialCapacity?: number;
}

/**
 * A compact fingerprint → (value, count) hash table over typed arrays (see the module comment):
 * about 23 bytes per entry, bounded by `maxEntries`.
 */
export class FingerprintIndex {
  private hi: Uint32Array;
  private lo: Uint32Array;
  private values: Uint32Array;
  private counts: Uint32Array;
  private mask: number;
  private entries = 0;
  /** The most fingerprints it will index; inserts beyond are refused. */
  readonly maxEntries: number;
  /** Inserts refused because the index was full. */
  refused = 0;

  constructor(options: FingerprintIndexOptions = {}) {
    this.maxEntries = options.maxEntries ?? 2 ** 26;
    let capacity = 1024;
    while (capacity < (options.initialCapacity ?? 1024)) capacity *= 2;
    this.mask = capacity - 1;
    this.hi = new Uint32Array(capacity);
    this.lo = new Uint32Array(capacity);
    this.values = new Uint32Array(capacity).fill(EMPTY);
    this.counts = new Uint32Array(capacity);
  }

  /** Fingerprints indexed. */
  get size(): number {
    return this.entries;
  }

  /** Bytes held by the table now. */
  get byteLength(): number {
    return (this.mask + 1) * 16;
  }

  /** The slot holding `fingerprint`, or -1. */
  find(fingerprint: bigint): number {
    const hi = Number(fingerprint >> 32n) >>> 0;
    const lo = Number(fingerprint & 0xffffffffn) >>> 0;
    for (let slot = this.slotOf(hi, lo); ; slot = (slot + 1) & this.mask) {
      if (this.values[slot] === EMPTY) return -1;
      if (this.hi[slot] === hi && this.lo[slot] === lo) return slot;
    }
  }

  /** The value stored in `slot` (from {@link find}). */
  valueAt(slot: number): number {
    return this.values[slot]!;
  }

  /** The share count stored in `slot`. */
  countAt(slot: number): number {
    return this.counts[slot]!;
  }

  /** Replaces the value of an existing slot (e.g. a fresh copy after a refcount overflow). */
  setAt(slot: number, value: number, count: number): void {
    this.values[slot] = value >>> 0;
    this.counts[slot] = count >>> 0;
  }

  /**
   * Inserts a new fingerprint (the caller has checked `find` returned -1). Returns false when
   * the index is full; the caller then simply does not dedup against this content.
   */
  insert(fingerprint: bigint, value: number, count = 1): boolean {
    if (this.entries >= this.maxEntries) {
      this.refused++;
      return false;
    }
    if (value >>> 0 !== value || value === EMPTY) throw new RangeError(`FingerprintIndex value ${value} out of range`);
    if (this.entries + 1 > (this.mask + 1) * MAX_LOAD) this.grow();
    const hi = Number(fingerprint >> 32n) >>> 0;
    const lo = Number(fingerprint & 0xffffffffn) >>> 0;
    this.place(hi, lo, value, count);
    this.entries++;
    return true;
  }

  /** Calls `visit` for every entry (order unspecified). */
  forEach(visit: (value: number, count: number) => void): void {
    for (let slot = 0; slot <= this.mask; slot++) {
      const value = this.values[slot]!;
      if (value !== EMPTY) visit(value, this.counts[slot]!);
    }
  }

  private slotOf(hi: number, lo: number): number {
    // Fingerprints are already uniformly distributed hashes; mix the words once anyway so a
    // weak caller-supplied fingerprint cannot cluster the table.
    return (Math.imul(hi ^ lo, 0x9e3779b1) ^ lo) & this.mask;
  }

  private place(hi: number, lo: number, value: number, count: number): void {
    let slot = this.slotOf(hi, lo);
    while (this.values[slot] !== EMPTY) slot = (slot + 1) & this.mask;
    this.hi[slot] = hi;
    this.lo[slot] = lo;
    this.values[slot] = value;
    this.counts[slot] = count;
  }

  private grow(): void {
    const { hi, lo, values, counts } = this;
    const capacity = (this.mask + 1) * 2;
    this.mask = capacity - 1;
    this.hi = new Uint32Array(capacity);
    this.lo = new Uint32Array(capacity);
    this.values = new Uint32Array(capacity).fill(EMPTY);
    this.counts = new Uint32Array(capacity);
    for (let slot = 0; slot < values.length; slot++) {
      if (values[slot] !== EMPTY) this.place(hi[slot]!, lo[slot]!, values[slot]!, counts[slot]!);
    }
  }
}
