import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';
import fc from 'fast-check';
import type { Block } from '../../src/block.js';
import { clusterize, createClusterizeStream } from '../../src/write/clusterize.js';
import { InputSizeError, InvalidArgumentError } from '../../src/errors.js';
import { randomBytesAt } from '../helpers/images.js';
import { blockSnapshot, chunksOf, collect } from './helpers.js';

const CS = 512;

/** The expected Blocks, cut directly from the whole input. */
function expectedBlocks(bytes: Uint8Array, clusterSize: number) {
  const out = [];
  for (let i = 0; i * clusterSize < bytes.length; i++) out.push({ index: i, data: Buffer.from(bytes.subarray(i * clusterSize, (i + 1) * clusterSize)) });
  return out;
}

test('clusterize gives the same Blocks whatever the chunking', async () => {
  const input = randomBytesAt(3, 0, CS * 9 + 123);
  const patterns = [[1], [7], [CS - 1], [CS], [CS + 1], [3 * CS], [5, 900, 1, 2000, 64], [input.length]];
  for (const pattern of patterns) {
    const blocks = await collect(clusterize(chunksOf(input, pattern), { clusterSize: CS }));
    assert.deepEqual(blockSnapshot(blocks), expectedBlocks(input, CS), `pattern ${pattern.join(',')}`);
    assert.equal(blocks.at(-1)!.data.length, 123, 'the last block is short');
  }
});

test('clusterize is chunk-independent for random inputs and chunkings (property)', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.uint8Array({ maxLength: 5000 }),
      fc.array(fc.integer({ min: 1, max: 1500 }), { minLength: 1, maxLength: 12 }),
      fc.constantFrom(512, 1024, 2048),
      async (input, pattern, clusterSize) => {
        const blocks = await collect(clusterize(chunksOf(input, pattern), { clusterSize }));
        assert.deepEqual(blockSnapshot(blocks), expectedBlocks(input, clusterSize));
      },
    ),
    { numRuns: 150 },
  );
});

test('clusterize views whole clusters inside one chunk without copying, and never reuses a buffer', async () => {
  const input = randomBytesAt(4, 0, CS * 4);
  const chunk = Buffer.from(input); // one chunk holding 4 whole clusters
  const blocks = await collect(clusterize([chunk], { clusterSize: CS }));
  for (const b of blocks) assert.equal(b.data.buffer, chunk.buffer, 'a view of the chunk');

  // Clusters assembled across chunks: keep every Block until the end; none may change.
  const held = await collect(clusterize(chunksOf(input, [CS - 3, 5, CS + 1]), { clusterSize: CS }));
  assert.deepEqual(blockSnapshot(held), expectedBlocks(input, CS));
  const buffers = new Set(held.map((b) => b.data.buffer));
  assert.ok(buffers.size > 1);
});

test('clusterize enforces a declared size', async () => {
  const input = randomBytesAt(5, 0, 3000);
  await assert.rejects(collect(clusterize(chunksOf(input, [100]), { clusterSize: CS, size: 3001 })), (err: unknown) => {
    assert.ok(err instanceof InputSizeError);
    assert.equal(err.expected, 3001);
    assert.equal(err.actual, 3000);
    return true;
  });
  // Longer: fails as the excess arrives, after yielding only Blocks inside the declared size.
  const seen: Block[] = [];
  await assert.rejects(
    (async () => {
      for await (const b of clusterize(chunksOf(input, [700]), { clusterSize: CS, size: 1500 })) seen.push(b);
    })(),
    InputSizeError,
  );
  assert.ok(seen.every((b) => b.index * CS + b.data.length <= 1500));
  assert.equal((await collect(clusterize(chunksOf(input, [777]), { clusterSize: CS, size: 3000 }))).length, 6);
});

test('clusterize: empty input gives no blocks; bad options and non-byte chunks are refused', async () => {
  assert.deepEqual(await collect(clusterize([], { clusterSize: CS })), []);
  assert.deepEqual(await collect(clusterize([new Uint8Array(0)], { clusterSize: CS, size: 0 })), []);
  await assert.rejects(collect(clusterize([], { clusterSize: 1000 })), InvalidArgumentError);
  await assert.rejects(collect(clusterize(['text' as unknown as Uint8Array])), InvalidArgumentError);
});

test('createClusterizeStream works in a pipeline', async () => {
  const input = randomBytesAt(6, 0, 10_000);
  const blocks: Block[] = [];
  await pipeline(
    Readable.from(chunksOf(input, [333])),
    createClusterizeStream({ clusterSize: 1024 }),
    new Writable({
      objectMode: true,
      write(block: Block, _e, cb) {
        blocks.push(block);
        cb();
      },
    }),
  );
  assert.deepEqual(blockSnapshot(blocks), expectedBlocks(input, 1024));
});
