/**
 * One bit per guest cluster: which clusters hold data. The sparse (non-raw) metadata is built
 * from it at the end. 1 bit per cluster is 128 KiB for a 64 GiB image at 64 KiB clusters, and
 * 16 MiB for the 8 TiB extreme; it grows as clusters are recorded, so the size need not be known.
 */

import { isAllZero } from '../io/buffers.js';

/** One bit per guest cluster, set when the cluster holds data; grows as clusters are recorded. */
export class AllocationBitmap {
  private bits: Uint8Array;
  /** One past the highest cluster index ever set. */
  private end = 0;

  constructor(initialClusters = 0) {
    this.bits = new Uint8Array(Math.max(64, Math.ceil(initialClusters / 8)));
  }

  /** Marks cluster `index` as holding data. */
  set(index: number): void {
    const byte = index >>> 3;
    if (byte >= this.bits.length) this.grow(byte + 1);
    this.bits[byte]! |= 1 << (index & 7);
    if (index >= this.end) this.end = index + 1;
  }

  /** Marks clusters [start, end): edge bits one by one, the whole bytes between with one fill. */
  setRange(start: number, end: number): void {
    if (start >= end) return;
    const lastByte = Math.floor((end - 1) / 8);
    if (lastByte >= this.bits.length) this.grow(lastByte + 1);
    let i = start;
    for (; i < end && i % 8 !== 0; i++) this.bits[i >>> 3]! |= 1 << (i & 7);
    const wholeEnd = end - (end % 8);
    if (wholeEnd > i) {
      this.bits.fill(0xff, i / 8, wholeEnd / 8);
      i = wholeEnd;
    }
    for (; i < end; i++) this.bits[i >>> 3]! |= 1 << (i & 7);
    if (end > this.end) this.end = end;
  }

  /** True when cluster `index` was marked as holding data. */
  get(index: number): boolean {
    const byte = index >>> 3;
    return byte < this.bits.length && ((this.bits[byte]! >>> (index & 7)) & 1) === 1;
  }

  /** True when any cluster in [start, end) is set. */
  anyInRange(start: number, end: number): boolean {
    end = Math.min(end, this.end);
    if (start >= end) return false;
    // Edge bits one by one; the whole bytes between with a memcmp-speed zero check.
    const firstWhole = Math.ceil(start / 8) * 8;
    const lastWhole = Math.floor(end / 8) * 8;
    if (firstWhole >= lastWhole) {
      for (let i = start; i < end; i++) if (this.get(i)) return true;
      return false;
    }
    for (let i = start; i < firstWhole; i++) if (this.get(i)) return true;
    for (let i = lastWhole; i < end; i++) if (this.get(i)) return true;
    return !isAllZero(this.bits.subarray(firstWhole / 8, lastWhole / 8));
  }

  /** Clusters set in total. */
  count(): number {
    let n = 0;
    for (let i = 0; i < this.bits.length; i++) {
      let b = this.bits[i]!;
      while (b) {
        b &= b - 1;
        n++;
      }
    }
    return n;
  }

  private grow(minBytes: number): void {
    const next = new Uint8Array(Math.max(minBytes, this.bits.length * 2));
    next.set(this.bits);
    this.bits = next;
  }
}
