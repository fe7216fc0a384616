import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Block } from '../../src/block.js';
import { createHasher, type Hasher } from '../../transforms/fingerprint.js';
import { Deduplicator, dedupBlocks } from '../../transforms/dedup.js';

const CS = 4096;
function cluster(fill: number): Uint8Array {
  return new Uint8Array(CS).fill(fill);
}

async function* fromArray(blocks: Block[]): AsyncGenerator<Block> {
  yield* blocks;
}

test('annotates duplicates of earlier clusters, confirmed by bytes', async () => {
  const hasher = await createHasher();
  const contents = [1, 2, 1, 0, 3, 2, 1].map((fill, index) => ({ index, data: cluster(fill), zero: fill === 0 }));
  const stored = new Map(contents.map((b) => [b.index, b.data]));
  const { blocks, stats } = dedupBlocks(fromArray(contents), {
    hasher,
    readCluster: async (index) => stored.get(index)!,
  });
  const out: Block[] = [];
  for await (const b of blocks) out.push(b);
  assert.deepEqual(out.map((b) => b.duplicateOf), [undefined, undefined, 0, undefined, undefined, 1, 0]);
  assert.equal(stats.duplicates, 3);
  assert.equal(stats.clusters, 6, 'zero clusters are not looked at');
  assert.equal(out[3]!.fingerprint, undefined, 'zero clusters get no fingerprint');
});

test('a forced fingerprint collision is caught by the byte comparison', async () => {
  const constant: Hasher = { algorithm: 'xxh64', hash64: () => 0x1234n };
  const contents = [1, 2, 3, 1].map((fill, index) => ({ index, data: cluster(fill) }));
  const { blocks, stats } = dedupBlocks(fromArray(contents), {
    hasher: constant,
    readCluster: async (index) => contents[index]!.data,
  });
  const out: Block[] = [];
  for await (const b of blocks) out.push(b);
  // Every block collides with cluster 0; only cluster 3 really equals it.
  assert.deepEqual(out.map((b) => b.duplicateOf), [undefined, undefined, undefined, 0]);
  assert.equal(stats.collisions, 2);
  assert.equal(stats.duplicates, 1);
});

test('maxShares starts a new copy and later duplicates share the new one', async () => {
  const hasher = await createHasher();
  const storage: Uint8Array[] = [];
  const dedup = new Deduplicator({ hasher, maxShares: 3, readBack: async (value) => storage[value]! });
  const values: number[] = [];
  for (let i = 0; i < 7; i++) {
    const block: Block = { index: i, data: cluster(7) };
    const decision = await dedup.lookup(block);
    if (decision.kind === 'duplicate') values.push(decision.value);
    else {
      storage.push(block.data);
      dedup.remember(block, storage.length - 1);
      values.push(storage.length - 1);
    }
  }
  // Copies hold at most 3 references each.
  assert.deepEqual(values, [0, 0, 0, 1, 1, 1, 2]);
  assert.equal(dedup.stats.shareLimitHits, 2);
});

test('a full index degrades to no dedup, never to wrong output', async () => {
  const hasher = await createHasher();
  const contents = [1, 2, 1, 2].map((fill, index) => ({ index, data: cluster(fill) }));
  const { blocks, stats } = dedupBlocks(fromArray(contents), {
    hasher,
    maxEntries: 1,
    readCluster: async (index) => contents[index]!.data,
  });
  const out: Block[] = [];
  for await (const b of blocks) out.push(b);
  assert.deepEqual(out.map((b) => b.duplicateOf), [undefined, undefined, 0, undefined]);
  assert.equal(stats.notIndexed, 2, 'both copies of the second content were refused by the full index');
});
