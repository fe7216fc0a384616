import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Block } from '../../src/block.js';
import { InputSizeError } from '../../src/errors.js';
import { BufferPool, createFileBlockSource, fileHandleTarget, readBlocks, READ_SIZE, type ReadTarget } from '../../src/write/sources.js';
import { randomBytesAt } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { blockSnapshot, collect } from './helpers.js';

function expectedBlocks(bytes: Uint8Array, cs: number) {
  const out = [];
  for (let i = 0; i * cs < bytes.length; i++) out.push({ index: i, data: Buffer.from(bytes.subarray(i * cs, (i + 1) * cs)) });
  return out;
}

/** A sequential source that hands out the input in reads of a few odd sizes, like a pipe. */
function pipeLike(input: Uint8Array): ReadTarget {
  let pos = 0;
  let turn = 0;
  const sizes = [65536, 1, 4093, 200_000];
  return {
    name: 'pipe',
    positional: false,
    read: async (buffer, offset, length) => {
      const n = Math.min(length, sizes[turn++ % sizes.length]!, input.length - pos);
      buffer.set(input.subarray(pos, pos + n), offset);
      pos += n;
      return n;
    },
  };
}

test('readBlocks cuts a file into clusters across several reads, the last one short', async (t) => {
  const dir = tempDir(t);
  const input = randomBytesAt(7, 0, READ_SIZE * 2 + 4096 * 3 + 10);
  const path = join(dir, 'in.raw');
  writeFileSync(path, input);
  const handle = await open(path);
  try {
    const blocks = await collect(readBlocks(fileHandleTarget(handle, { name: path }), { clusterSize: 4096, size: input.length }));
    assert.deepEqual(blockSnapshot(blocks), expectedBlocks(input, 4096));
  } finally {
    await handle.close();
  }
});

test('readBlocks on a pipe-like source gives the same Blocks and enforces a declared size', async () => {
  const input = randomBytesAt(8, 0, READ_SIZE + 70_000);
  assert.deepEqual(blockSnapshot(await collect(readBlocks(pipeLike(input), { clusterSize: 65536 }))), expectedBlocks(input, 65536));
  assert.deepEqual(
    blockSnapshot(await collect(readBlocks(pipeLike(input), { clusterSize: 512, size: input.length }))),
    expectedBlocks(input, 512),
  );
  await assert.rejects(collect(readBlocks(pipeLike(input), { size: input.length + 1 })), InputSizeError);
  await assert.rejects(collect(readBlocks(pipeLike(input), { size: input.length - 1 })), InputSizeError);
});

test('a BufferPool reuses a read buffer only after all its Blocks are released', async () => {
  // 8 reads: with reads queued ahead of the consumer, the first few each need a buffer of their own.
  const input = randomBytesAt(9, 0, READ_SIZE * 8);
  const pool = new BufferPool();
  const held: Block[] = [];
  const seen = new Set<ArrayBufferLike>();
  let n = 0;
  for await (const block of readBlocks(pipeLike(input), { clusterSize: 65536, pool })) {
    seen.add(block.data.buffer);
    // Hold every other block of the first buffer; release the rest at once.
    if (n++ < 32 && n % 2 === 0) held.push(block);
    else pool.release(block.data);
  }
  // The first buffer was never fully released, so its held Blocks still show the input.
  for (const b of held) assert.deepEqual(Buffer.from(b.data), input.subarray(b.index * 65536, (b.index + 1) * 65536));
  assert.ok(seen.size < 8, `buffers were recycled (${seen.size} distinct for 8 reads)`);
});

test('createFileBlockSource streams a file as Blocks', async (t) => {
  const dir = tempDir(t);
  const input = randomBytesAt(10, 0, 100_000);
  const path = join(dir, 'in.raw');
  writeFileSync(path, input);
  const blocks: Block[] = [];
  await pipeline(
    createFileBlockSource(path, { clusterSize: 8192 }),
    new Writable({
      objectMode: true,
      write(b: Block, _e, cb) {
        blocks.push(b);
        cb();
      },
    }),
  );
  assert.deepEqual(blockSnapshot(blocks), expectedBlocks(input, 8192));
  await assert.rejects(collect(createFileBlockSource(join(dir, 'missing.raw')) as Readable), /no such file/);
});
