/**
 * One result shape (issue 15, item 7): every writer — convert, the external and internal sinks
 * (iterable and stream forms), wrap — reports a {@link WriteSummary} with the same names for the
 * same things (`clusters` a number everywhere, `layout`, `seconds`, `dataFile`, `warnings`), and
 * the same image gives the same numbers whichever wrote it. Dedup that could share nothing (1-bit
 * refcounts) is refused with a typed error instead of silently writing every copy. The info API
 * speaks camelCase; qemu's names stay in the CLI's `info --json`.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { convert } from '../../src/write/convert.js';
import { wrap } from '../../src/write/wrap.js';
import { measure } from '../../src/write/measure.js';
import { createExternalSink, writeExternal } from '../../src/write/external-sink.js';
import { createInternalSink, InternalImageWriter, writeInternal } from '../../src/write/internal-sink.js';
import type { WriteSummary } from '../../src/write/settings.js';
import { toBatches, type Block } from '../../src/block.js';
import { readImageInfo } from '../../src/read/info.js';
import { qemuInfoJson } from '../../src/cli/info.js';
import { DedupUnsupportedError } from '../../src/errors.js';
import { createHasher } from '../../transforms/fingerprint.js';
import { zeroDetect } from '../../transforms/zero-detect.js';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuCheck, tempDir } from '../helpers/qemu.js';
import { patternBytes, randomBytesAt } from '../helpers/images.js';

const CS = 4096;
/** Data, a zero cluster, two copies of one cluster, a short tail. */
const RAW = Buffer.concat([randomBytesAt(3, 0, CS), Buffer.alloc(CS), patternBytes(CS, 7), patternBytes(CS, 7), randomBytesAt(4, 0, 1000)]);

/** Every field of WriteSummary, checked complete by the compiler. */
const WRITE_SUMMARY_KEYS = [
  'layout',
  'inputBytes',
  'virtualSize',
  'clusterSize',
  'refcountBits',
  'dataFileRaw',
  'clusters',
  'dataClusters',
  'zeroClusters',
  'duplicateClusters',
  'unchangedClusters',
  'dataBytesWritten',
  'metadataBytesWritten',
  'dataFile',
  'dataFileName',
  'warnings',
  'seconds',
] as const satisfies readonly (keyof WriteSummary)[];
const complete: Exclude<keyof WriteSummary, (typeof WRITE_SUMMARY_KEYS)[number]> extends never ? true : false = true;

function batches() {
  const blocks: Block[] = [];
  for (let i = 0; i * CS < RAW.length; i++) blocks.push({ index: i, data: RAW.subarray(i * CS, (i + 1) * CS) });
  return toBatches(blocks, { clusterSize: CS, size: RAW.length });
}

/** The WriteSummary fields of a result, without the clock (and with `seconds` checked). */
function shapeOf(result: object): Record<string, unknown> {
  const fields = result as Record<string, unknown>;
  for (const key of WRITE_SUMMARY_KEYS) assert.ok(key in fields, `${key} is in ${JSON.stringify(Object.keys(fields))}`);
  assert.equal(typeof fields['clusters'], 'number');
  assert.ok(typeof fields['seconds'] === 'number' && fields['seconds'] >= 0);
  return Object.fromEntries(WRITE_SUMMARY_KEYS.filter((key) => key !== 'seconds').map((key) => [key, fields[key]]));
}

test('external layout: convert, writeExternal, createExternalSink and wrap report one shape, with the same numbers', async (t) => {
  if (!needQemu(t)) return;
  assert.equal(complete, true);
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), RAW);
  const common = { clusterSize: CS, dataFileRaw: false, sync: false };
  const converted = await convert({ input: join(dir, 'in.raw'), output: join(dir, 'c.qcow2'), dataFile: join(dir, 'x.data'), ...common });
  const iterated = await writeExternal(zeroDetect(batches()), { output: join(dir, 'i.qcow2'), dataFile: join(dir, 'x.data'), overwrite: true, ...common });
  const sink = createExternalSink({ output: join(dir, 's.qcow2'), dataFile: join(dir, 'x.data'), overwrite: true, ...common });
  await pipeline(Readable.from(batches()), sink);
  const streamed = await sink.finished;
  const expected = {
    layout: 'external',
    inputBytes: RAW.length,
    virtualSize: 4 * CS + 1024,
    clusterSize: CS,
    refcountBits: 16,
    dataFileRaw: false,
    clusters: 5,
    dataClusters: 4,
    zeroClusters: 1,
    duplicateClusters: 0,
    unchangedClusters: 0,
    dataBytesWritten: converted.dataBytesWritten,
    metadataBytesWritten: converted.metadataBytesWritten,
    dataFile: join(dir, 'x.data'),
    dataFileName: 'x.data',
    warnings: [],
  };
  for (const [name, result] of [
    ['convert', converted],
    ['writeExternal', iterated],
    ['createExternalSink', streamed],
  ] as const) {
    assert.deepEqual(shapeOf(result), expected, name);
  }
  // wrap over the data file just written: the same image, nothing written to the data file.
  const wrapped = await wrap({ input: join(dir, 'x.data'), output: join(dir, 'w.qcow2'), ...common });
  assert.deepEqual(shapeOf(wrapped), { ...expected, inputBytes: 4 * CS + 1024, dataBytesWritten: 0, metadataBytesWritten: wrapped.metadataBytesWritten });
  for (const image of ['c.qcow2', 'i.qcow2', 's.qcow2', 'w.qcow2']) assert.equal(qemuCheck(image, dir).code, 0, image);
});

test('internal layout with dedup: convert, writeInternal and createInternalSink report one shape, clusters a number', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), RAW);
  const hasher = await createHasher();
  const converted = await convert({ input: join(dir, 'in.raw'), output: join(dir, 'c.qcow2'), layout: 'internal', dedup: true, clusterSize: CS, sync: false });
  const iterated = await writeInternal(zeroDetect(batches()), { output: join(dir, 'i.qcow2'), dedup: { hasher }, sync: false });
  const sink = createInternalSink({ output: join(dir, 's.qcow2'), clusterSize: CS, dedup: { hasher }, sync: false });
  await pipeline(Readable.from(batches()), sink);
  const streamed = await sink.finished;
  assert.equal(sink.result, streamed);
  const expected = {
    layout: 'internal',
    inputBytes: RAW.length,
    virtualSize: 4 * CS + 1024,
    clusterSize: CS,
    refcountBits: 16,
    dataFileRaw: false,
    clusters: 5,
    dataClusters: 3,
    zeroClusters: 1,
    duplicateClusters: 1,
    unchangedClusters: 0,
    dataBytesWritten: 3 * CS - (CS - 1000),
    metadataBytesWritten: converted.metadataBytesWritten,
    dataFile: undefined,
    dataFileName: undefined,
    warnings: [],
  };
  for (const [name, result] of [
    ['convert', converted],
    ['writeInternal', iterated],
    ['createInternalSink', streamed],
  ] as const) {
    assert.deepEqual(shapeOf(result), expected, name);
  }
  assert.equal(iterated.compressedClusters, 0);
  assert.equal(iterated.dedup?.duplicates, 1);
  for (const image of ['c.qcow2', 'i.qcow2', 's.qcow2']) assert.equal(qemuCheck(image, dir).code, 0, image);
});

test('dedup with 1-bit refcounts is a DedupUnsupportedError everywhere, before anything is created', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), RAW);
  const hasher = await createHasher();
  const refused = (err: unknown) => err instanceof DedupUnsupportedError && err.code === 'QCOW_ERR_DEDUP_UNSUPPORTED' && /1-bit refcounts/.test(err.message);
  const output = join(dir, 'o.qcow2');
  await assert.rejects(convert({ input: join(dir, 'in.raw'), output, layout: 'internal', dedup: true, refcountBits: 1 }), refused, 'convert');
  await assert.rejects(measure({ input: join(dir, 'in.raw'), layout: 'internal', dedup: true, refcountBits: 1 }), refused, 'measure');
  await assert.rejects(writeInternal(batches(), { output, dedup: { hasher }, refcountBits: 1 }), refused, 'writeInternal');
  await assert.rejects(InternalImageWriter.create({ output, dedup: { hasher }, refcountBits: 1 }), refused, 'InternalImageWriter.create');
  const sink = createInternalSink({ output, dedup: { hasher }, refcountBits: 1 });
  await assert.rejects(pipeline(Readable.from(batches()), sink), refused, 'createInternalSink');
  await assert.rejects(sink.finished, refused);
  assert.deepEqual(readdirSync(dir), ['in.raw']);
  // 2-bit refcounts can share (a new copy every 3 references): accepted.
  const two = await writeInternal(batches(), { output, dedup: { hasher }, refcountBits: 2, sync: false });
  assert.equal(two.duplicateClusters, 1);

  const cli = runCli(['convert', 'in.raw', 'cli.qcow2', '--internal', '--dedup', '--refcount-bits', '1'], { cwd: dir });
  assert.equal(cli.code, 2);
  assert.match(cli.stderr, /1-bit refcounts: .* \[QCOW_ERR_DEDUP_UNSUPPORTED\]\n {2}hint: .*--refcount-bits/);
});

test('readImageInfo speaks camelCase at every depth; info --json prints the same under qemu-img info names', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), RAW);
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'a.qcow2'), sync: false });
  const info = await readImageInfo(join(dir, 'a.qcow2'), { format: 'qcow2' });
  assert.equal(info.virtualSize, 4 * CS + 1024);
  assert.equal(info.formatSpecific?.data.dataFile, 'a.data');
  assert.equal(info.formatSpecific?.data.refcountBits, 16);
  const keys = (value: unknown): string[] =>
    Array.isArray(value) ? value.flatMap(keys) : typeof value === 'object' && value !== null ? Object.entries(value).flatMap(([k, v]) => [k, ...keys(v)]) : [];
  assert.deepEqual(
    keys(info).filter((key) => !/^[a-z][A-Za-z0-9]*$/.test(key)),
    [],
    'no kebab-case key in the API',
  );
  const printed = JSON.parse(runCli(['info', '--json', 'a.qcow2'], { cwd: dir }).stdout) as Record<string, unknown>;
  assert.deepEqual(printed, qemuInfoJson({ ...info, filename: 'a.qcow2' }));
  assert.equal(printed['virtual-size'], info.virtualSize);
  assert.deepEqual(Object.keys((printed['format-specific'] as { data: object }).data).sort(), ['compat', 'compression-type', 'corrupt', 'data-file', 'data-file-raw', 'extended-l2', 'lazy-refcounts', 'refcount-bits']);
});
