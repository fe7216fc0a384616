import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  fillRefcountOnes,
  getRefcount,
  maxRefcount,
  refcountsPerBlock,
  setRefcount,
} from '../../src/format/index.js';
import { atOffset, toHex } from './helpers.js';

const ORDERS = [0, 1, 2, 3, 4, 5, 6] as const;

/** A zeroed view of `length` bytes inside a larger buffer filled with 0xa5 on both sides. */
function block(length: number, offset = 24): Uint8Array {
  const big = new Uint8Array(offset + length + 16).fill(0xa5);
  big.fill(0, offset, offset + length);
  return new Uint8Array(big.buffer, offset, length);
}

function guardsIntact(view: Uint8Array): boolean {
  const all = new Uint8Array(view.buffer);
  const before = all.subarray(0, view.byteOffset);
  const after = all.subarray(view.byteOffset + view.byteLength);
  return before.every((b) => b === 0xa5) && after.every((b) => b === 0xa5);
}

/** Values worth storing at an order: 1, the maximum, and a bit pattern that fits. */
function sampleValues(order: number): number[] {
  const max = Math.min(maxRefcount(order), Number.MAX_SAFE_INTEGER);
  const bits = 2 ** order;
  const pattern = bits >= 53 ? 0x1234_5678_9abc_d : bits >= 32 ? 0x8765_4321 : bits >= 16 ? 0xa55a : bits >= 8 ? 0x5a : bits >= 4 ? 0xa : bits >= 2 ? 2 : 1;
  return [...new Set([1, max, pattern])];
}

describe('refcountsPerBlock and maxRefcount', () => {
  test('refcountsPerBlock = cluster bytes × 8 / refcount bits', () => {
    const cases: [number, number, number][] = [
      [9, 0, 4096], [9, 4, 256], [9, 6, 64],
      [16, 0, 524288], [16, 3, 65536], [16, 4, 32768], [16, 6, 8192],
      [21, 4, 1048576], [21, 6, 262144],
    ];
    for (const [cb, order, expected] of cases) assert.equal(refcountsPerBlock(cb, order), expected, `cb ${cb} order ${order}`);
  });

  test('maxRefcount = 2^bits − 1', () => {
    assert.deepEqual(ORDERS.map(maxRefcount), [1, 3, 15, 255, 65535, 4294967295, 2 ** 64 - 1]);
  });
});

describe('getRefcount / setRefcount', () => {
  for (const order of ORDERS) {
    const bits = 2 ** order;
    // enough entries to span at least 4 bytes and at least 4 entries
    const entries = Math.max(4, Math.ceil((4 * 8) / bits) + 1);
    const bytes = Math.ceil((entries * bits) / 8);

    test(`order ${order} (${bits}-bit): every index round-trips alone, neighbours stay 0`, () => {
      for (const value of sampleValues(order)) {
        for (let i = 0; i < entries; i++) {
          const b = block(bytes);
          setRefcount(b, i, order, value);
          for (let j = 0; j < entries; j++) {
            assert.equal(getRefcount(b, j, order), j === i ? value : 0, `value ${value} at ${i}, read ${j}`);
          }
          assert.ok(guardsIntact(b), 'no write outside the view');
        }
      }
    });

    test(`order ${order} (${bits}-bit): clearing one entry of an all-max block leaves the others at max`, () => {
      const max = Math.min(maxRefcount(order), Number.MAX_SAFE_INTEGER);
      for (let i = 0; i < entries; i++) {
        const b = block(bytes);
        for (let j = 0; j < entries; j++) setRefcount(b, j, order, max);
        setRefcount(b, i, order, 0);
        for (let j = 0; j < entries; j++) assert.equal(getRefcount(b, j, order), j === i ? 0 : max, `cleared ${i}, read ${j}`);
        assert.ok(guardsIntact(b));
      }
    });

    test(`order ${order} (${bits}-bit): overwriting an entry replaces its value`, () => {
      const b = block(bytes);
      const [first, second] = [sampleValues(order).at(-1) ?? 1, 1];
      setRefcount(b, 2, order, first);
      setRefcount(b, 2, order, second);
      assert.equal(getRefcount(b, 2, order), second);
    });
  }

  test('64-bit entries hold values up to 2^53 − 1 exactly', () => {
    const b = block(16);
    setRefcount(b, 1, 6, Number.MAX_SAFE_INTEGER);
    assert.equal(toHex(b), '0000000000000000001fffffffffffff');
    assert.equal(getRefcount(b, 1, 6), Number.MAX_SAFE_INTEGER);
  });

  test('sub-byte entries are packed LSB-first; wider ones are big-endian', () => {
    const cases: [number, number, number, string][] = [
      // order, index, value, hex of a 4-byte block
      [0, 0, 1, '01000000'], [0, 7, 1, '80000000'], [0, 9, 1, '00020000'],
      [1, 0, 3, '03000000'], [1, 3, 1, '40000000'], [1, 5, 2, '00080000'],
      [2, 0, 0xf, '0f000000'], [2, 1, 0x1, '10000000'], [2, 3, 0xa, '00a00000'],
      [3, 2, 0x7f, '00007f00'],
      [4, 1, 0x1234, '00001234'],
      [5, 0, 0xdeadbeef, 'deadbeef'],
    ];
    for (const [order, index, value, hex] of cases) {
      const b = block(4);
      setRefcount(b, index, order, value);
      assert.equal(toHex(b), hex, `order ${order} index ${index} value ${value}`);
    }
  });

  test('getRefcount reads a view at a non-zero byteOffset, not the underlying buffer', () => {
    for (const order of ORDERS) {
      const bytes = new Uint8Array(32); // 4 entries even at 64 bits
      setRefcount(bytes, 1, order, 1);
      const view = atOffset(bytes, 13);
      for (let i = 0; i < 4; i++) assert.equal(getRefcount(view, i, order), i === 1 ? 1 : 0, `order ${order} index ${i}`);
    }
  });
});

describe('qemu\'s refblock bytes for 4 used clusters (digest §4.1)', () => {
  const expected: [number, string][] = [
    [0, '0f'],
    [1, '55'],
    [2, '1111'],
    [3, '01010101'],
    [4, '0001000100010001'],
    [5, '00000001000000010000000100000001'],
    [6, '0000000000000001000000000000000100000000000000010000000000000001'],
  ];
  for (const [order, hex] of expected) {
    test(`order ${order}: ${hex}`, () => {
      const bytes = hex.length / 2;
      const viaSet = block(bytes + 8);
      for (let i = 0; i < 4; i++) setRefcount(viaSet, i, order, 1);
      assert.equal(toHex(viaSet.subarray(0, bytes)), hex);
      assert.ok(viaSet.subarray(bytes).every((b) => b === 0));

      const viaFill = block(bytes + 8);
      fillRefcountOnes(viaFill, 0, 4, order);
      assert.equal(toHex(viaFill.subarray(0, bytes)), hex);
      assert.ok(viaFill.subarray(bytes).every((b) => b === 0));
      assert.ok(guardsIntact(viaFill));
    });
  }
});

describe('fillRefcountOnes (examples; the exhaustive property is in property.test.ts)', () => {
  for (const order of ORDERS) {
    test(`order ${order}: every [from, to) within 40 entries equals a setRefcount loop`, () => {
      const n = 40;
      const bytes = Math.ceil((n * 2 ** order) / 8);
      for (let from = 0; from <= n; from++) {
        for (let to = from; to <= n; to++) {
          const expected = block(bytes);
          for (let i = from; i < to; i++) setRefcount(expected, i, order, 1);
          const actual = block(bytes);
          fillRefcountOnes(actual, from, to, order);
          assert.equal(toHex(actual), toHex(expected), `[${from}, ${to})`);
          assert.ok(guardsIntact(actual));
        }
      }
    });
  }

  test('a fill does not disturb set entries outside the range (sub-byte orders)', () => {
    for (const order of [0, 1, 2]) {
      const b = block(8);
      const max = maxRefcount(order);
      const entries = (8 * 8) / 2 ** order;
      for (let i = 0; i < entries; i++) if (i < 3 || i >= 13) setRefcount(b, i, order, max);
      fillRefcountOnes(b, 3, 13, order);
      for (let i = 0; i < entries; i++) {
        assert.equal(getRefcount(b, i, order), i < 3 || i >= 13 ? max : 1, `order ${order} entry ${i}`);
      }
    }
  });

  test('a whole 64 KiB block at order 4 is 0x0001 repeated', () => {
    const b = new Uint8Array(65536);
    fillRefcountOnes(b, 0, refcountsPerBlock(16, 4), 4);
    for (let i = 0; i < b.length; i += 2) {
      if (b[i] !== 0 || b[i + 1] !== 1) assert.fail(`bytes ${i}..${i + 1} are ${b[i]} ${b[i + 1]}`);
    }
  });
});
