import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';
import type { Block } from '../../src/block.js';
import { zeroDetect, createZeroDetectStream } from '../../transforms/index.js';

function sampleBlocks(): Block[] {
  const lastByte = new Uint8Array(4096);
  lastByte[4095] = 1;
  const firstByte = new Uint8Array(4096);
  firstByte[0] = 0x80;
  return [
    { index: 0, data: new Uint8Array(4096) },
    { index: 1, data: lastByte },
    { index: 2, data: firstByte },
    { index: 3, data: new Uint8Array(100) }, // a short last block
    { index: 4, data: new Uint8Array(4096).subarray(1, 2) },
  ];
}
const expected = [true, false, false, true, true];

test('zeroDetect marks exactly the all-zero blocks, in order, as the same objects', async () => {
  const input = sampleBlocks();
  const out: Block[] = [];
  for await (const b of zeroDetect(input)) out.push(b);
  assert.deepEqual(out.map((b) => b.zero), expected);
  assert.deepEqual(out.map((b) => b.index), [0, 1, 2, 3, 4]);
  assert.ok(out.every((b, i) => b === input[i]));
});

test('createZeroDetectStream marks the same in a pipeline', async () => {
  const out: Block[] = [];
  await pipeline(
    Readable.from(sampleBlocks()),
    createZeroDetectStream(),
    new Writable({
      objectMode: true,
      write(b: Block, _e, cb) {
        out.push(b);
        cb();
      },
    }),
  );
  assert.deepEqual(out.map((b) => b.zero), expected);
});
