/**
 * Single-file images to a pipe (plan, then emit in order): through the CLI's standard output
 * and through a Writable, plain, dedup, overlay and compressed; qemu-img is the oracle.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { NotSeekableError } from '../../src/errors.js';
import { nativePipeIoAvailable } from '../../src/io/pipe.js';
import { canCompressZstd } from '../../src/write/compress.js';
import { needQemu, qemuCheck, qemuCompare, qemuImg, tempDir } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { MemoryWritable } from './helpers.js';
import { buildCompressible } from '../helpers/compressible.js';

const PLAN = 'tt1zr1t1zzp11t2r22' + 'z'.repeat(40) + 't1r';

function assertClean(dir: string, raw: string, image: string): void {
  const check = qemuCheck(image, dir);
  assert.equal(check.code, 0, `${image}: ${check.stdout}${check.stderr}`);
  const cmp = qemuCompare(raw, image, dir);
  assert.equal(cmp.code, 0, `${image}: ${cmp.stdout}${cmp.stderr}`);
}

for (const cs of [4096, 65536]) {
  test(`convert IN - --internal at ${cs}-byte clusters: plain, dedup, compressed, compressed + dedup to standard output`, (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    writeFileSync(join(dir, 'in.raw'), buildCompressible(PLAN, cs, 700));
    const cases: Array<[string, string[]]> = [
      ['plain', []],
      ['dedup', ['--dedup']],
      ['zlib', ['--compress']],
      ['zlib-dedup', ['--compress', '--dedup']],
      // zstd where node:zlib has it (Node 22.15+); test/write/compress covers the refusal elsewhere.
      ...(canCompressZstd() ? [['zstd', ['--compression-type', 'zstd']] as [string, string[]]] : []),
    ];
    if (!canCompressZstd()) t.diagnostic(`no zstd case: node:zlib in ${process.version} has no zstd`);
    for (const [name, flags] of cases) {
      const result = runCli(['convert', 'in.raw', '-', '--internal', '--cluster-size', String(cs), '--no-sync', '--json', ...flags], { cwd: dir });
      assert.equal(result.code, 0, result.stderr);
      writeFileSync(join(dir, `${name}.qcow2`), result.stdoutBytes);
      assertClean(dir, 'in.raw', `${name}.qcow2`);
      // The summary goes to standard error when the image is on standard output.
      const summary = JSON.parse(result.stderr) as { duplicateClusters: number; compression?: { clusters: number } };
      if (name.includes('dedup')) assert.ok(summary.duplicateClusters > 0, name);
      if (/zlib|zstd/.test(name)) assert.ok((summary.compression?.clusters ?? 0) > 0, name);
      // The same clusters as a file conversion stores, laid out for a pipe.
      const file = runCli(['convert', 'in.raw', `${name}-file.qcow2`, '--internal', '--cluster-size', String(cs), '--no-sync', '-q', ...flags], { cwd: dir });
      assert.equal(file.code, 0, file.stderr);
      const sizes = [result.stdoutBytes.length, readFileSync(join(dir, `${name}-file.qcow2`)).length];
      assert.ok(Math.abs(sizes[0]! - sizes[1]!) <= 2 * cs, `${name}: pipe ${sizes[0]} vs file ${sizes[1]}`);
    }
  });
}

test('an overlay to a pipe: unchanged clusters unallocated, zeros hide the backing file', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 65536;
  const base = buildCompressible('tttrtttpt1t1', cs);
  writeFileSync(join(dir, 'base.raw'), base);
  assert.equal(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', 'base.raw', 'base.qcow2'], dir).code, 0);
  const next = Buffer.from(base);
  next.fill(0, 2 * cs, 3 * cs); // a cluster zeroed: must read as zero, not as the base
  next.fill(7, 5 * cs + 10, 5 * cs + 20);
  writeFileSync(join(dir, 'next.raw'), next);
  for (const flags of [[], ['--compress', '--dedup']]) {
    const result = runCli(['convert', 'next.raw', '-', '--internal', '--base', 'base.qcow2', '--no-sync', '--json', ...flags], { cwd: dir });
    assert.equal(result.code, 0, result.stderr);
    writeFileSync(join(dir, 'over.qcow2'), result.stdoutBytes);
    assertClean(dir, 'next.raw', 'over.qcow2');
    const summary = JSON.parse(result.stderr) as { unchangedClusters: number; backingFile: string };
    assert.equal(summary.unchangedClusters, 10);
    assert.equal(summary.backingFile, 'base.qcow2');
  }
});

test('a Writable takes the image too; a non-seekable input to a pipe is refused, naming what works', async (t) => {
  const dir = tempDir(t);
  const cs = 65536;
  const raw = buildCompressible(PLAN, cs);
  writeFileSync(join(dir, 'in.raw'), raw);
  const sink = new MemoryWritable();
  const summary = await convert({ input: join(dir, 'in.raw'), output: sink, layout: 'internal', compression: 'zlib', dedup: true, sync: false });
  assert.ok(summary.duplicateClusters > 0);
  const image = sink.bytes();
  writeFileSync(join(dir, 'w.qcow2'), image);
  if (needQemu(t)) assertClean(dir, 'in.raw', 'w.qcow2');

  const piped = runCli(['convert', '-', '-', '--internal'], { cwd: dir, input: raw.subarray(0, 4096) });
  assert.equal(piped.code, 2);
  assert.match(piped.stderr, /seekable input.*QCOW_ERR_NOT_SEEKABLE/);
  assert.match(piped.stderr, /external data-file layout/);
  assert.equal(piped.stdoutBytes.length, 0, 'nothing written');
  async function* bytes() {
    yield raw;
  }
  await assert.rejects(convert({ input: bytes(), output: new MemoryWritable(), layout: 'internal' }), NotSeekableError);
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw', 'w.qcow2']);
});

test('an input that changed between the two passes fails the run instead of writing a wrong image', async () => {
  const { PlannedImageWriter } = await import('../../src/write/internal-stream.js');
  const { CorruptImageError } = await import('../../src/errors.js');
  const { zeroRun } = await import('../../src/block.js');
  const cs = 65536;
  const data = buildCompressible('tt', cs);
  const writer = await PlannedImageWriter.create({
    output: new MemoryWritable(),
    size: data.length,
    clusterBits: 16,
    refcountOrder: 4,
    readInput: async () => 0,
    // Pass 2 finds a hole where pass 1 read data.
    reread: async function* () {
      yield zeroRun(0, 2, cs);
    },
  });
  await writer.write({ index: 0, data: data.subarray(0, cs) });
  await writer.write({ index: 1, data: data.subarray(cs) });
  await assert.rejects(writer.finish(), (err: unknown) => err instanceof CorruptImageError && /changed while it was converted/.test((err as Error).message));
  await writer.abort();
});

test('into a pipe, a spliced pass 2 that finds the input shorter fails the run too', { skip: !nativePipeIoAvailable() }, async (t) => {
  const { PlannedImageWriter } = await import('../../src/write/internal-stream.js');
  const { CorruptImageError } = await import('../../src/errors.js');
  const dir = tempDir(t);
  const cs = 65536;
  const data = buildCompressible('tt', 2 * cs);
  // The file pass 2 reads holds one cluster of the two pass 1 saw.
  writeFileSync(join(dir, 'short.raw'), data.subarray(0, cs));
  const fd = openSync(join(dir, 'short.raw'), 'r');
  t.after(() => closeSync(fd));
  const fifo = join(dir, 'out.fifo');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const reader = spawn('cat', [fifo], { stdio: 'ignore' });
  const writer = await PlannedImageWriter.create({
    output: fifo,
    size: data.length,
    clusterBits: 16,
    refcountOrder: 4,
    readInput: async () => 0,
    reread: () => assert.fail('pass 2 splices, it does not reread'),
    copySource: { fd, name: 'short.raw' },
  });
  await writer.write({ index: 0, data: data.subarray(0, cs) });
  await writer.write({ index: 1, data: data.subarray(cs) });
  await assert.rejects(writer.finish(), (err: unknown) => err instanceof CorruptImageError && /guest cluster 1 ended early/.test((err as Error).message));
  await writer.abort();
  await once(reader, 'close');
});

test('a single-file image to a pipe takes no stages of the user (pass 2 rereads the input): refused before writing', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), new Uint8Array(65536).fill(7));
  const output = new MemoryWritable();
  await assert.rejects(convert({ input: join(dir, 'in.raw'), output, layout: 'internal', stages: [(b: unknown) => b] }), {
    code: 'QCOW_ERR_INVALID_ARGUMENT',
    message: /reads the input twice, so it cannot take stages/,
  });
  assert.equal(output.bytes().length, 0);
});
