/**
 * The composable face: createConvertStream (one stream-chain Duplex), convert() with stages of
 * a user's own, the iterable sinks (writeExternal / writeInternal), and the pitfalls a user hit
 * made loud or impossible: no zero-detect, dropped trailing zero Blocks, a forgotten cluster size.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createReadStream, readdirSync, readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { none } from 'stream-chain';
import { filter, map } from '@reactivex/ix-esnext-esm/asynciterable/operators';
import { toArray } from '@reactivex/ix-esnext-esm/asynciterable';
import { isBatch, perBlock, toBatches, type Block, type BlockBatch } from '../../src/block.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { convert, createConvertStream } from '../../src/write/convert.js';
import { writeExternal } from '../../src/write/external-sink.js';
import { writeInternal } from '../../src/write/internal-sink.js';
import { fileHandleTarget, readBatches, readBlocks } from '../../src/write/sources.js';
import { compareWithBase, createHasher, zeroDetect } from '../../transforms/index.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, qemuCheck, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, MiB, qemuFacts } from './helpers.js';

const size = 6 * MiB + 3 * 65536 + 4321;

function rawInput(dir: string, seed = 5): string {
  const path = join(dir, 'in.raw');
  writeRawImage(path, size, mixedExtents(size, 65536, seed), seed);
  return path;
}

/** readBatches over a file, closed afterwards. */
async function* fileBatches(path: string, clusterSize = 65536): AsyncGenerator<BlockBatch> {
  const handle = await open(path, 'r');
  try {
    const { size: length } = await handle.stat();
    yield* readBatches(fileHandleTarget(handle, { name: path }), { size: length, clusterSize });
  } finally {
    await handle.close();
  }
}

test('createConvertStream: raw bytes in, a user function per Block, a generator and a Node stream in between → a clean image equal to the input', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir);
  let blocksSeen = 0;
  let batchesSeen = 0;
  let streamed = 0;
  const stream = createConvertStream({
    output: join(dir, 'c.qcow2'),
    dataFile: join(dir, 'c.data'),
    dataFileName: 'c.data',
    stages: [
      perBlock((block: Block) => {
        blocksSeen += block.count ?? 1;
        assert.equal(typeof block.zero, 'boolean', 'zero-detect ran before the user stage');
      }),
      async function* (batch: BlockBatch) {
        batchesSeen++;
        yield batch;
      },
      new Transform({
        objectMode: true,
        transform(batch: BlockBatch, _encoding, done) {
          streamed++;
          done(null, batch);
        },
      }),
    ],
  });
  const outputs: unknown[] = [];
  await pipeline(createReadStream(input, { highWaterMark: MiB }), stream, async (items: AsyncIterable<unknown>) => {
    for await (const item of items) outputs.push(item);
  });
  const summary = await stream.finished;
  assert.equal(summary.inputBytes, size);
  assert.equal(blocksSeen, Math.ceil(size / 65536));
  // One batch per 1 MiB chunk (and the last), not one per cluster.
  assert.ok(batchesSeen <= Math.ceil(size / MiB) + 2, `${batchesSeen} batches`);
  assert.equal(streamed, batchesSeen);
  assert.deepEqual(outputs, [summary], 'the readable side yields the summary');
  assert.equal(qemuCheck('c.qcow2', dir).code, 0);
  assertQemuAgrees('in.raw', 'c.qcow2', dir);
  assert.ok(summary.dataClusters < summary.clusters, 'zero clusters stayed holes');
});

test('convert() with a stage of its own writes the very bytes convert() writes without one', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir, 9);
  let clusters = 0;
  await convert({ input, output: join(dir, 'a.qcow2'), dataFile: join(dir, 'a.data'), dataFileName: 'x.data', sync: false });
  const summary = await convert({
    input,
    output: join(dir, 'b.qcow2'),
    dataFile: join(dir, 'b.data'),
    dataFileName: 'x.data',
    sync: false,
    stages: [perBlock((block) => void (clusters += block.count ?? 1))],
  });
  assert.equal(clusters, Math.ceil(size / 65536), 'the stage saw every cluster (a hole counts as its run)');
  assert.ok(readFileSync(join(dir, 'a.qcow2')).equals(readFileSync(join(dir, 'b.qcow2'))));
  assert.ok(readFileSync(join(dir, 'a.data')).equals(readFileSync(join(dir, 'b.data'))));
  assert.equal(summary.inputBytes, size);
  // Internal, with dedup, through a Node stream stage.
  const internal = await convert({
    input,
    output: join(dir, 'i.qcow2'),
    layout: 'internal',
    dedup: true,
    sync: false,
    stages: [new Transform({ objectMode: true, transform: (batch: BlockBatch, _e, done) => done(null, batch) })],
  });
  assert.equal(internal.layout, 'internal');
  assert.equal(qemuCheck('i.qcow2', dir).code, 0);
  assertQemuAgrees('in.raw', 'i.qcow2', dir);
});

test('pitfall: a pipeline without zero-detect still stores zero clusters as holes', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir, 11);
  const checked = await writeExternal(zeroDetect(fileBatches(input)), { output: join(dir, 'z.qcow2'), dataFile: join(dir, 'z.data'), sync: false });
  const unchecked = await writeExternal(fileBatches(input), { output: join(dir, 'u.qcow2'), dataFile: join(dir, 'u.data'), sync: false });
  assert.ok(checked.dataClusters < checked.clusters);
  assert.equal(unchecked.dataClusters, checked.dataClusters);
  assert.equal(unchecked.dataBytesWritten, checked.dataBytesWritten);
  assertQemuAgrees('in.raw', 'u.qcow2', dir);
  // The internal sink too.
  const internal = await writeInternal(fileBatches(input), { output: join(dir, 'i.qcow2'), sync: false });
  assert.equal(internal.dataClusters, checked.dataClusters);
  assertQemuAgrees('in.raw', 'i.qcow2', dir);
});

test('pitfall: dropping trailing zero Blocks keeps the image its full length; dropping the last batch is an error', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // Data, then 2 MiB of zeros at the end: the Blocks a filter on `zero` drops.
  const length = 4 * MiB;
  writeRawImage(join(dir, 'in.raw'), length, [
    { offset: 0, length: 2 * MiB, kind: 'random' },
    { offset: 2 * MiB, length: 2 * MiB, kind: 'zeros' },
  ]);
  const dropZeros = (batch: BlockBatch): BlockBatch => ({ ...batch, blocks: batch.blocks.filter((block) => !block.zero) });
  const summary = await convert({ input: join(dir, 'in.raw'), output: join(dir, 'd.qcow2'), sync: false, stages: [dropZeros] });
  assert.equal(summary.virtualSize, length);
  assert.equal(qemuFacts('d.qcow2', dir).virtualSize, length);
  assertQemuAgrees('in.raw', 'd.qcow2', dir);
  // The same through the iterable sinks, with ix operators over the batches.
  const viaIx = await writeInternal(
    zeroDetect(fileBatches(join(dir, 'in.raw'))).pipe(map((batch: BlockBatch) => dropZeros(batch))),
    { output: join(dir, 'x.qcow2'), sync: false },
  );
  assert.equal(viaIx.inputBytes, length);
  assertQemuAgrees('in.raw', 'x.qcow2', dir);

  // A stage that drops the source's last batch (the one with inputEnd): loud, nothing left.
  const dropLast = (batch: BlockBatch) => (batch.inputEnd !== undefined ? none : batch);
  await assert.rejects(convert({ input: join(dir, 'in.raw'), output: join(dir, 'e.qcow2'), sync: false, stages: [dropLast] }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_INVALID_ARGUMENT');
    assert.match(err.message, /inputEnd/);
    return true;
  });
  const allButLast = (await toArray(fileBatches(join(dir, 'in.raw')))).slice(0, -1);
  await assert.rejects(writeExternal(allButLast, { output: join(dir, 'f.qcow2'), dataFile: join(dir, 'f.data') }), /inputEnd/);
  const emptyFiltered = zeroDetect(fileBatches(join(dir, 'in.raw'))).pipe(filter((batch: BlockBatch) => batch.blocks.length > 0));
  await assert.rejects(writeExternal(emptyFiltered, { output: join(dir, 'g.qcow2'), dataFile: join(dir, 'g.data') }), /inputEnd/);
  assert.deepEqual(readdirSync(dir).sort(), ['d.data', 'd.qcow2', 'in.raw', 'x.qcow2']);
});

test('pitfall: the cluster size is given once, at the source; a stage without it says so', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir, 13);
  // The sink learns 4096 from the batches: no clusterSize anywhere but the source.
  const summary = await writeExternal(zeroDetect(fileBatches(input, 4096)), { output: join(dir, 's.qcow2'), dataFile: join(dir, 's.data'), sync: false });
  assert.equal(summary.clusterSize, 4096);
  assertQemuAgrees('in.raw', 's.qcow2', dir);
  // A sink told another size than the batches': an error naming both, before anything is written.
  await assert.rejects(writeExternal(fileBatches(input, 4096), { output: join(dir, 'w.qcow2'), dataFile: join(dir, 'w.data'), clusterSize: 65536 }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_INVALID_ARGUMENT');
    assert.match(err.message, /65536.*4096|4096.*65536/);
    return true;
  });
  // A stage given single Blocks and no cluster size: an error that names the cluster size.
  const base = { virtualSize: size, read: async (_offset: number, length: number) => new Uint8Array(length) };
  const handle = await open(input, 'r');
  try {
    const singles = readBlocks(fileHandleTarget(handle, { name: input }), { size, clusterSize: 4096 });
    await assert.rejects(toArray(compareWithBase(singles, { base })), /cluster size/);
  } finally {
    await handle.close();
  }
  // Batched, the same stage needs nothing.
  const compared = compareWithBase(fileBatches(input, 4096), { base });
  for await (const batch of compared) assert.ok(isBatch(batch));
  assert.equal(compared.stats.unchanged + compared.stats.changed, Math.ceil(size / 4096));
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw', 's.data', 's.qcow2']);
});

test('single Blocks from a source of someone else become batches (toBatches) with the input end', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir, 17);
  const handle = await open(input, 'r');
  try {
    const singles = readBlocks(fileHandleTarget(handle, { name: input }), { size, clusterSize: 65536 });
    const batches = await toArray(toBatches(singles, { clusterSize: 65536, size }));
    assert.ok(batches.length < Math.ceil(size / 65536) / 4, `${batches.length} batches`);
    assert.equal(batches.at(-1)!.inputEnd, size);
    const hasher = await createHasher();
    const result = await writeInternal(batches, { output: join(dir, 'd.qcow2'), dedup: { hasher }, sync: false });
    assert.equal(result.inputBytes, size);
    assertQemuAgrees('in.raw', 'd.qcow2', dir);
  } finally {
    await handle.close();
  }
});

test('createConvertStream: an abort or a failing stage rejects finished with a typed error and leaves nothing', async (t) => {
  const dir = tempDir(t);
  const input = rawInput(dir, 19);
  const controller = new AbortController();
  const aborted = createConvertStream({ output: join(dir, 'a.qcow2'), signal: controller.signal, stages: [perBlock((block) => void (block.index === 40 && controller.abort()))] });
  await assert.rejects(pipeline(createReadStream(input, { highWaterMark: 256 * 1024 }), aborted));
  await assert.rejects(aborted.finished, { code: 'QCOW_ERR_ABORTED' });
  const failing = createConvertStream({
    output: join(dir, 'b.qcow2'),
    stages: [
      (batch: BlockBatch) => {
        if (batch.blocks.some((block) => block.index >= 40)) throw new Error('stage failed');
        return batch;
      },
    ],
  });
  await assert.rejects(pipeline(createReadStream(input, { highWaterMark: 256 * 1024 }), failing), /stage failed/);
  await assert.rejects(failing.finished, /stage failed/);
  // Options refused before any output is created: the error comes through finished too.
  const refused = createConvertStream({ output: join(dir, 'c.qcow2'), layout: 'external', dedup: true });
  await assert.rejects(pipeline(createReadStream(input), refused), { code: 'QCOW_ERR_DEDUP_UNSUPPORTED' });
  await assert.rejects(refused.finished, { code: 'QCOW_ERR_DEDUP_UNSUPPORTED' });
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw']);
});

test('stages at each point between ours see the Blocks as that point has them; an unknown point is refused', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const input = rawInput(dir, 12);
  const seen: Record<string, { zeroFlagged: number; compressed: number; blocks: number }> = {};
  const watch = (point: string) =>
    perBlock((block: Block) => {
      const s = (seen[point] ??= { zeroFlagged: 0, compressed: 0, blocks: 0 });
      s.blocks++;
      if (block.zero !== undefined) s.zeroFlagged++;
      if (block.compressed) s.compressed++;
    });
  const points = ['input', 'zeroDetected', 'compared', 'compressed', 'beforeSink'] as const;
  const summary = await convert({
    input,
    output: join(dir, 'c.qcow2'),
    layout: 'internal',
    compression: 'zlib',
    sync: false,
    stages: Object.fromEntries(points.map((p) => [p, [watch(p)]])),
  });
  assert.equal(qemuCheck('c.qcow2', dir).code, 0);
  assertQemuAgrees('in.raw', 'c.qcow2', dir);
  for (const p of points) assert.ok(seen[p]!.blocks > 0, `no Block reached the '${p}' stage`);
  // Before zero-detect nothing is flagged (holes come as zero runs, which are always zero).
  assert.ok(seen.input!.zeroFlagged < seen.zeroDetected!.zeroFlagged, 'zero-detect ran before the input stage');
  assert.equal(seen.compared!.compressed, 0, 'compression ran before the compared stage');
  assert.equal(seen.compressed!.compressed, summary.compression!.clusters);
  assert.equal(seen.beforeSink!.compressed, summary.compression!.clusters);

  const before = readdirSync(dir).sort();
  await assert.rejects(
    convert({ input, output: join(dir, 'x.qcow2'), sync: false, stages: { afterSink: [watch('x')] } as never }),
    (err: unknown) => isQcow2StreamError(err) && err.code === 'QCOW_ERR_INVALID_ARGUMENT' && /unknown stage point 'afterSink'/.test(err.message),
  );
  assert.deepEqual(readdirSync(dir).sort(), before, 'a refused run left files behind');
});
