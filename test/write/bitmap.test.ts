import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AllocationBitmap } from '../../src/write/bitmap.js';

test('AllocationBitmap agrees with a Set on get, anyInRange and count (property)', () => {
  fc.assert(
    fc.property(
      fc.uniqueArray(fc.integer({ min: 0, max: 5000 }), { maxLength: 60 }),
      fc.array(fc.tuple(fc.integer({ min: 0, max: 5100 }), fc.integer({ min: 0, max: 300 })), { minLength: 1, maxLength: 20 }),
      (indexes, ranges) => {
        const bitmap = new AllocationBitmap();
        const model = new Set<number>();
        for (const i of [...indexes].sort((a, b) => a - b)) {
          bitmap.set(i);
          model.add(i);
        }
        for (let i = 0; i < 5100; i += 7) assert.equal(bitmap.get(i), model.has(i));
        for (const [start, length] of ranges) {
          const expected = [...model].some((i) => i >= start && i < start + length);
          assert.equal(bitmap.anyInRange(start, start + length), expected, `range ${start}+${length}`);
        }
        assert.equal(bitmap.count(), model.size);
      },
    ),
    { numRuns: 200 },
  );
});

test('AllocationBitmap grows past its initial size', () => {
  const bitmap = new AllocationBitmap(8);
  bitmap.set(10_000_000);
  assert.equal(bitmap.get(10_000_000), true);
  assert.equal(bitmap.get(9_999_999), false);
  assert.equal(bitmap.anyInRange(0, 10_000_000), false);
  assert.equal(bitmap.anyInRange(9_000_000, 10_000_001), true);
});
