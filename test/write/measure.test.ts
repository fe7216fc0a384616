/**
 * measure() against the real output sizes: every layout converted for real, and the sizes
 * compared (files within one cluster; the pipe writer's image exactly).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { convert, type ConvertOptions } from '../../src/write/convert.js';
import { measure, type MeasureOptions } from '../../src/write/measure.js';
import { randomBytesAt } from '../helpers/images.js';
import { buildCompressible } from '../helpers/compressible.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { MemoryWritable, allocatedBytes } from './helpers.js';

const PLAN = 'ttr1zzpt1r' + 'z'.repeat(30) + 't22t2r';

function within(actual: number, expected: number, cs: number, what: string): void {
  assert.ok(Math.abs(actual - expected) <= cs, `${what}: measured ${expected}, real ${actual} (cluster ${cs})`);
}

for (const cs of [4096, 65536]) {
  test(`measure at ${cs}-byte clusters is within one cluster of every layout's real size`, async (t) => {
    const dir = tempDir(t);
    const input = join(dir, 'in.raw');
    writeFileSync(input, buildCompressible(PLAN, cs, 300));
    const cases: Array<[string, Partial<MeasureOptions & ConvertOptions>]> = [
      ['internal', { layout: 'internal' }],
      ['internal-dedup', { layout: 'internal', dedup: true }],
      ['internal-zlib', { layout: 'internal', compression: 'zlib' }],
      ['internal-zlib-dedup', { layout: 'internal', compression: 'zlib', dedup: true }],
    ];
    for (const [name, options] of cases) {
      const measured = await measure({ input, clusterSize: cs, ...options } as MeasureOptions);
      const output = join(dir, `${name}.qcow2`);
      await convert({ input, output, clusterSize: cs, sync: false, ...options } as ConvertOptions);
      within(statSync(output).size, measured.required, cs, `${name} (file)`);
      // The pipe writer lays the image out exactly as measured.
      const sink = new MemoryWritable();
      await convert({ input, output: sink, clusterSize: cs, sync: false, ...options } as ConvertOptions);
      assert.equal(sink.bytes().length, measured.required, `${name} (pipe)`);
      if (options.compression) assert.equal(measured.compression?.required, 'measured');
    }
    for (const raw of [true, false]) {
      const measured = await measure({ input, clusterSize: cs, dataFileRaw: raw });
      const output = join(dir, `ext-${raw}.qcow2`);
      await convert({ input, output, dataFile: join(dir, `ext-${raw}.data`), clusterSize: cs, dataFileRaw: raw, sync: false });
      assert.equal(statSync(output).size, measured.files!.metadata.required, `metadata file, raw ${raw}`);
      assert.equal(statSync(join(dir, `ext-${raw}.data`)).size, measured.files!.dataFile.fullyAllocated, 'data file length');
      within(allocatedBytes(join(dir, `ext-${raw}.data`)), measured.files!.dataFile.required, cs, `data file allocation, raw ${raw}`);
      assert.equal(measured.required, measured.files!.metadata.required + measured.files!.dataFile.required);
    }
  });
}

test('measure an overlay: clusters equal to the base are not counted', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cs = 65536;
  const base = buildCompressible(PLAN, cs);
  writeFileSync(join(dir, 'base.raw'), base);
  assert.equal(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', 'base.raw', 'base.qcow2'], dir).code, 0);
  const next = Buffer.from(base);
  next.fill(9, 3 * cs, 3 * cs + 100);
  next.fill(0, 0, cs);
  writeFileSync(join(dir, 'next.raw'), next);
  const input = join(dir, 'next.raw');
  for (const options of [{ layout: 'internal' as const }, { layout: 'internal' as const, compression: 'zlib' as const }, { layout: 'external' as const }]) {
    const measured = await measure({ input, base: join(dir, 'base.qcow2'), ...options });
    const output = join(dir, `o-${options.layout}-${options.compression ?? ''}.qcow2`);
    const summary = await convert({ input, output, base: join(dir, 'base.qcow2'), sync: false, ...options });
    assert.equal(summary.dataClusters, 1, 'one changed, non-zero cluster stored');
    if (options.layout === 'internal') within(statSync(output).size, measured.required, cs, `overlay ${JSON.stringify(options)}`);
    else {
      assert.equal(statSync(output).size, measured.files!.metadata.required);
      assert.equal(measured.files!.dataFile.required, cs);
    }
  }
});

test('measure --size: an empty image, and the fully-allocated bound, match real images; the CLI prints qemu-img measure names', (t) => {
  const dir = tempDir(t);
  const cs = 65536;
  const size = 9 * 1024 * 1024 + 512;
  writeFileSync(join(dir, 'full.raw'), randomBytesAt(3, 0, size));
  writeFileSync(join(dir, 'empty.raw'), '');
  truncateSync(join(dir, 'empty.raw'), size);
  for (const flags of [['--internal'], []]) {
    const result = runCli(['measure', '--size', String(size), '--json', ...flags], { cwd: dir });
    assert.equal(result.code, 0, result.stderr);
    const m = JSON.parse(result.stdout) as { required: number; 'fully-allocated': number; metadata?: { required: number } };
    const [e, f] = flags.length ? ['e-i.qcow2', 'f-i.qcow2'] : ['e.qcow2', 'f.qcow2'];
    assert.equal(runCli(['convert', '-q', '--no-sync', 'empty.raw', e, ...flags], { cwd: dir }).code, 0);
    assert.equal(runCli(['convert', '-q', '--no-sync', 'full.raw', f, ...flags], { cwd: dir }).code, 0);
    if (flags.length) {
      within(statSync(join(dir, e)).size, m.required, cs, 'empty internal image');
      within(statSync(join(dir, f)).size, m['fully-allocated'], cs, 'fully allocated internal image');
    } else {
      assert.equal(statSync(join(dir, e)).size, m.metadata!.required);
      assert.equal(m['fully-allocated'], statSync(join(dir, f)).size + size);
    }
  }
  const human = runCli(['measure', '--size', '1G', '--internal', '--compress'], { cwd: dir });
  assert.equal(human.code, 0, human.stderr);
  assert.match(human.stdout, /^required size: \d+\nfully allocated size: \d+\n/);
  assert.match(human.stdout, /required unknown without an input/);
  const bad = runCli(['measure', 'full.raw', '--compress'], { cwd: dir });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /QCOW_ERR_COMPRESSION_UNSUPPORTED/);
});

test('measure a sparse-mode metadata file: only the L2 tables that map data count', async (t) => {
  const dir = tempDir(t);
  const cs = 4096;
  const input = join(dir, 'sparse.raw');
  // 16 MiB at 4 KiB clusters: 8 L2 tables, data under the first and the last only.
  writeFileSync(input, randomBytesAt(1, 0, 3 * cs));
  truncateSync(input, 16 * 1024 * 1024 - cs);
  writeFileSync(input, randomBytesAt(2, 0, cs), { flag: 'a' });
  const measured = await measure({ input, clusterSize: cs, dataFileRaw: false });
  await convert({ input, output: join(dir, 's.qcow2'), clusterSize: cs, dataFileRaw: false, sync: false });
  assert.equal(statSync(join(dir, 's.qcow2')).size, measured.files!.metadata.required);
  assert.ok(measured.files!.metadata.required < measured.files!.metadata.fullyAllocated - 5 * cs, 'six tables left out');
  within(allocatedBytes(join(dir, 's.data')), measured.files!.dataFile.required, cs, 'data file allocation');
});
