import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FingerprintIndex, INDEX_BYTES_PER_ENTRY_MAX } from '../../transforms/fingerprint-index.js';

test('finds what was inserted, through several resizes', () => {
  const index = new FingerprintIndex({ initialCapacity: 16 });
  const keys: bigint[] = [];
  for (let i = 0; i < 50_000; i++) keys.push((BigInt(i) * 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn);
  keys.forEach((key, i) => assert.equal(index.insert(key, i), true));
  assert.equal(index.size, keys.length);
  keys.forEach((key, i) => {
    const slot = index.find(key);
    assert.ok(slot >= 0, `key ${i} lost`);
    assert.equal(index.valueAt(slot), i);
    assert.equal(index.countAt(slot), 1);
  });
  assert.equal(index.find(0xdeadbeefn), -1);
  assert.ok(index.byteLength <= keys.length * INDEX_BYTES_PER_ENTRY_MAX, 'memory per entry stays within the documented bound');
});

test('keys that differ only in one 32-bit half are distinct', () => {
  const index = new FingerprintIndex();
  index.insert(0x00000001_00000000n, 1);
  index.insert(0x00000000_00000001n, 2);
  index.insert(0x00000001_00000001n, 3);
  assert.equal(index.valueAt(index.find(0x00000001_00000000n)), 1);
  assert.equal(index.valueAt(index.find(0x00000000_00000001n)), 2);
  assert.equal(index.valueAt(index.find(0x00000001_00000001n)), 3);
  assert.equal(index.find(0n), -1);
});

test('a full index refuses inserts but keeps answering lookups', () => {
  const index = new FingerprintIndex({ maxEntries: 3 });
  for (let i = 0; i < 3; i++) assert.equal(index.insert(BigInt(i + 100), i), true);
  assert.equal(index.insert(999n, 7), false);
  assert.equal(index.refused, 1);
  assert.equal(index.find(999n), -1);
  assert.equal(index.valueAt(index.find(101n)), 1);
});

test('setAt replaces value and count', () => {
  const index = new FingerprintIndex();
  index.insert(42n, 5);
  const slot = index.find(42n);
  index.setAt(slot, 9, 3);
  assert.equal(index.valueAt(index.find(42n)), 9);
  assert.equal(index.countAt(index.find(42n)), 3);
});

test('behaves like a Map (property)', () => {
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), fc.nat({ max: 0xfffffffe })), { maxLength: 3000 }), (pairs) => {
      const index = new FingerprintIndex({ initialCapacity: 8 });
      const model = new Map<bigint, number>();
      for (const [key, value] of pairs) {
        if (model.has(key)) continue;
        model.set(key, value);
        index.insert(key, value);
      }
      let visited = 0;
      index.forEach(() => visited++);
      assert.equal(visited, model.size);
      for (const [key, value] of model) assert.equal(index.valueAt(index.find(key)), value);
    }),
    { numRuns: 50 },
  );
});
