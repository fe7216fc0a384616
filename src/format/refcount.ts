/**
 * Refcount block packing for every refcount_order 0..6 (spec: "Host cluster management").
 * Entries of 8 bits and wider are big-endian integers; narrower ones are packed LSB-first
 * inside each byte (qemu's get_refcount_ro0..ro2).
 */

const TWO_POW_32 = 0x1_0000_0000;

/** Refcount entries in one refcount block. */
export function refcountsPerBlock(clusterBits: number, refcountOrder: number): number {
  return (2 ** clusterBits * 8) / 2 ** refcountOrder;
}

/** The largest refcount an entry can hold, as a number (2^64 − 1 rounds to 2^64). */
export function maxRefcount(refcountOrder: number): number {
  return 2 ** 2 ** refcountOrder - 1;
}

/** Reads entry `index` of a refcount block packed with 2^`refcountOrder`-bit entries. */
export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  const bits = 2 ** refcountOrder;
  if (bits < 8) {
    const bitPos = index * bits;
    const byte = block[bitPos >>> 3] ?? 0;
    return (byte >>> (bitPos & 7)) & ((1 << bits) - 1);
  }
  const bytes = bits / 8;
  const pos = index * bytes;
  switch (bytes) {
    case 1: return block[pos] ?? 0;
    case 2: return ((block[pos] ?? 0) << 8) | (block[pos + 1] ?? 0);
    case 4: return new DataView(block.buffer, block.byteOffset + pos, 4).getUint32(0);
    default: {
      const view = new DataView(block.buffer, block.byteOffset + pos, 8);
      return view.getUint32(0) * TWO_POW_32 + view.getUint32(4);
    }
  }
}

/** Stores `value` (0 ≤ value ≤ maxRefcount) in entry `index`. */
export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  const bits = 2 ** refcountOrder;
  if (bits < 8) {
    const bitPos = index * bits;
    const shift = bitPos & 7;
    const mask = ((1 << bits) - 1) << shift;
    const at = bitPos >>> 3;
    block[at] = ((block[at] ?? 0) & ~mask) | ((value << shift) & mask);
    return;
  }
  const bytes = bits / 8;
  const pos = index * bytes;
  switch (bytes) {
    case 1: block[pos] = value; return;
    case 2: block[pos] = value >>> 8; block[pos + 1] = value & 0xff; return;
    case 4: new DataView(block.buffer, block.byteOffset + pos, 4).setUint32(0, value); return;
    default: {
      const view = new DataView(block.buffer, block.byteOffset + pos, 8);
      view.setUint32(0, Math.floor(value / TWO_POW_32));
      view.setUint32(4, value >>> 0);
    }
  }
}

/**
 * Sets entries [from, to) of a zero-filled block to 1. Equivalent to setRefcount in a loop, but
 * fills whole bytes at once (a fresh image's refblocks are long runs of 1).
 */
export function fillRefcountOnes(block: Uint8Array, from: number, to: number, refcountOrder: number): void {
  const bits = 2 ** refcountOrder;
  if (bits < 8) {
    const perByte = 8 / bits;
    let i = from;
    for (; i < to && i % perByte !== 0; i++) setRefcount(block, i, refcountOrder, 1);
    if (i < to) {
      // the byte value holding `perByte` ones: 0xff (1-bit), 0x55 (2-bit), 0x11 (4-bit)
      let pattern = 0;
      for (let k = 0; k < perByte; k++) pattern |= 1 << (k * bits);
      const wholeEnd = to - (to % perByte);
      if (wholeEnd > i) {
        block.fill(pattern, i / perByte, wholeEnd / perByte);
        i = wholeEnd;
      }
    }
    for (; i < to; i++) setRefcount(block, i, refcountOrder, 1);
    return;
  }
  const bytes = bits / 8;
  for (let i = from; i < to; i++) block[i * bytes + bytes - 1] = 1;
}
