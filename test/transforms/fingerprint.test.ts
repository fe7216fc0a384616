/** The native XXH64 (the addon) gives xxhash-wasm's values, for every length and alignment. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { nativeAddon } from '../../src/io/native.js';
import { createHasher, wasmHasher } from '../../transforms/fingerprint.js';
import { withoutNative } from '../write/helpers.js';

test('native xxh64 equals xxhash-wasm h64Raw on every length 0..300, odd offsets and whole clusters', { skip: !nativeAddon()?.xxh64 && 'the addon is not built' }, async () => {
  const wasm = await wasmHasher();
  const native = nativeAddon()!.xxh64!;
  const bytes = randomBytes(3 * 65536 + 64);
  for (let length = 0; length <= 300; length++) {
    for (const offset of [0, 1, 7]) {
      const view = new Uint8Array(bytes.buffer, bytes.byteOffset + offset, length);
      assert.equal(native(view), wasm.hash64(view), `length ${length} at offset ${offset}`);
    }
  }
  for (const length of [4096, 65535, 65536, 65537, 3 * 65536]) {
    const view = new Uint8Array(bytes.buffer, bytes.byteOffset + 3, length);
    assert.equal(native(view), wasm.hash64(view), `length ${length}`);
  }
  // The published XXH64 of the empty input, seed 0.
  assert.equal(native(new Uint8Array(0)), 0xef46db3751d8e999n);
  assert.equal((await createHasher()).hash64(bytes), wasm.hash64(bytes));
});

test('without the addon createHasher is xxhash-wasm', async () => {
  const bytes = randomBytes(65536);
  const viaWasm = await withoutNative(async () => (await createHasher()).hash64(bytes));
  assert.equal(viaWasm, (await wasmHasher()).hash64(bytes));
});
