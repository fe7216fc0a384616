/**
 * The fuzz contract of ./contract.ts (typed errors only, no hang, bounded memory, no leaked
 * descriptors, no poisoning) for the VHD, VMDK and VHDX readers, and for the streamOptimized
 * VMDK stream parser, over mutated qemu-made seeds. Half the cases re-seal the checksums after
 * mutating (VHD footer and dynamic header, VHDX headers and region tables), so mutations get
 * past the checksum to the structures behind it.
 *
 * Default: 40 cases per format (a quick run); the suite's long mode (QCOW2_STREAM_LONG=1) runs
 * 2,000 per format, and QCOW2_FUZZ_RUNS=N any number:
 *
 *     QCOW2_FUZZ_RUNS=2000 node test/run.mjs test/fuzz/formats --test-timeout=3600000
 *
 * (QCOW2_FUZZ_SEED replays a run; QCOW2_FUZZ_TRACE=FILE logs each case before it runs.)
 */

import { after, test } from 'node:test';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import assert from 'node:assert/strict';
import { appendFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { isQcow2StreamError } from '../../src/errors.js';
import { crc32c } from '../../src/read/vhdx-reader.js';
import { openStreamInput } from '../../src/write/stream-image.js';
import type { ReadTarget } from '../../src/write/sources.js';
import { repetitions } from '../helpers/long.js';
import { needQemu } from '../helpers/qemu.js';
import { qemuConvertTo, vmwareStyleStream, writeSourceRaw } from '../helpers/foreign.js';
import { assertNotPoisoned, ContractViolation, CASE_MEMORY_LIMIT, runCase, STAGE_TIMEOUT_MS } from './contract.js';
import { applyMutations, mutationCaseArb } from './mutations.js';
import type { Region, Seed } from './seeds.js';

const requestedRuns = Number(process.env['QCOW2_FUZZ_RUNS'] ?? 0);
const fuzzSeed = process.env['QCOW2_FUZZ_SEED'] === undefined ? undefined : Number(process.env['QCOW2_FUZZ_SEED']);
const RUNS = requestedRuns > 0 ? requestedRuns : repetitions(40, 2000);
/**
 * QCOW2_FUZZ_TRACE=FILE appends each case (format, index, seed, mutations) to FILE before it
 * runs: when a case blocks the event loop, the last line names it.
 */
const traceFile = process.env['QCOW2_FUZZ_TRACE'];
/** A case slower than this is listed in the campaign's diagnostic (a stall in the making). */
const SLOW_CASE_MS = 1000;
const MiB = 1024 * 1024;

/** A format's seeds and how to re-seal a mutated copy's checksums. */
interface FormatSeeds {
  format: string;
  seeds: Seed[];
  reseal: (bytes: Buffer) => void;
}

function vhdChecksum(bytes: Buffer, at: number, length: number, field: number): void {
  if (at < 0 || at + length > bytes.length) return;
  bytes.writeUInt32BE(0, at + field);
  let sum = 0;
  for (let i = at; i < at + length; i++) sum += bytes[i]!;
  bytes.writeUInt32BE(~sum >>> 0, at + field);
}

function vhdRegions(bytes: Buffer): Region[] {
  const regions: Region[] = [{ name: 'footer', start: bytes.length - 512, length: 512 }];
  if (bytes.readUInt32BE(bytes.length - 512 + 60) !== 2) {
    const dyn = Number(bytes.readBigUInt64BE(16));
    const bat = Number(bytes.readBigUInt64BE(dyn + 16));
    const entries = bytes.readUInt32BE(dyn + 28);
    regions.push({ name: 'footer copy', start: 0, length: 512 }, { name: 'dynamic header', start: dyn, length: 1024 }, { name: 'BAT', start: bat, length: entries * 4 });
    const first = bytes.readUInt32BE(bat);
    if (first !== 0xffffffff) regions.push({ name: 'bitmap', start: first * 512, length: 512 });
  }
  return regions;
}

function vhdReseal(bytes: Buffer): void {
  if (bytes.length < 1024) return;
  vhdChecksum(bytes, bytes.length - 512, 512, 64);
  vhdChecksum(bytes, 0, 512, 64);
  const dyn = bytes.readBigUInt64BE(16);
  if (dyn < BigInt(bytes.length)) vhdChecksum(bytes, Number(dyn), 1024, 36);
}

function vmdkRegions(bytes: Buffer): Region[] {
  if (bytes.readUInt32LE(0) !== 0x564d444b) return [{ name: 'descriptor', start: 0, length: bytes.length }];
  const regions: Region[] = [{ name: 'header', start: 0, length: 80 }];
  const descOffset = Number(bytes.readBigUInt64LE(28)) * 512;
  const descSize = Number(bytes.readBigUInt64LE(36)) * 512;
  if (descSize > 0) regions.push({ name: 'descriptor', start: descOffset, length: Math.min(descSize, 1024) });
  const gd = bytes.readBigInt64LE(56);
  const gdAt = gd === -1n ? Number(bytes.readBigUInt64LE(bytes.length - 1024 + 56)) * 512 : Number(gd) * 512;
  regions.push({ name: 'GD', start: gdAt, length: 64 });
  const gt = bytes.readUInt32LE(gdAt) * 512;
  if (gt > 0 && gt < bytes.length) regions.push({ name: 'GT', start: gt, length: 2048 });
  const overhead = Number(bytes.readBigUInt64LE(64)) * 512;
  if (overhead + 64 < bytes.length) regions.push({ name: 'first grain', start: overhead, length: 64 });
  if (gd === -1n) regions.push({ name: 'footer', start: bytes.length - 1536, length: 1536 });
  return regions;
}

function vhdxRegions(bytes: Buffer): Region[] {
  const region = 192 * 1024;
  const regions: Region[] = [
    { name: 'header 1', start: 64 * 1024, length: 80 },
    { name: 'header 2', start: 128 * 1024, length: 80 },
    { name: 'region table', start: region, length: 16 + 2 * 32 },
  ];
  for (let i = 0; i < bytes.readUInt32LE(region + 8) && i < 4; i++) {
    const at = Number(bytes.readBigUInt64LE(region + 16 + i * 32 + 16));
    if (at < bytes.length) regions.push({ name: `region ${i}`, start: at, length: 256 });
  }
  return regions;
}

function vhdxReseal(bytes: Buffer): void {
  for (const [at, size] of [[64 * 1024, 4096], [128 * 1024, 4096], [192 * 1024, 65536], [256 * 1024, 65536]] as const) {
    if (at + size > bytes.length) continue;
    bytes.writeUInt32LE(0, at + 4);
    bytes.writeUInt32LE(crc32c(bytes.subarray(at, at + size)), at + 4);
  }
}

function seed(dir: string, name: string, regions: (bytes: Buffer) => Region[]): Seed {
  const bytes = readFileSync(join(dir, name));
  return { name, bytes, clusterSize: 65536, regions: regions(bytes) };
}

function makeFormatSeeds(dir: string): FormatSeeds[] {
  writeSourceRaw(dir, 'src.raw', 3 * MiB + 512, 91);
  qemuConvertTo(dir, 'src.raw', 'd.vhd', 'vpc', 'subformat=dynamic');
  qemuConvertTo(dir, 'src.raw', 'f.vhd', 'vpc', 'subformat=fixed');
  qemuConvertTo(dir, 'src.raw', 's.vmdk', 'vmdk', 'subformat=monolithicSparse');
  qemuConvertTo(dir, 'src.raw', 'so.vmdk', 'vmdk', 'subformat=streamOptimized');
  qemuConvertTo(dir, 'src.raw', 'flat.vmdk', 'vmdk', 'subformat=monolithicFlat');
  qemuConvertTo(dir, 'src.raw', 'd.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  qemuConvertTo(dir, 'src.raw', 'f.vhdx', 'vhdx', 'subformat=fixed,block_size=1M');
  const vmware = vmwareStyleStream(readFileSync(join(dir, 'so.vmdk')));
  return [
    { format: 'vpc', seeds: [seed(dir, 'd.vhd', vhdRegions), seed(dir, 'f.vhd', vhdRegions)], reseal: vhdReseal },
    {
      format: 'vmdk',
      seeds: [seed(dir, 's.vmdk', vmdkRegions), seed(dir, 'so.vmdk', vmdkRegions), { name: 'w.vmdk', bytes: vmware, clusterSize: 65536, regions: vmdkRegions(vmware) }, seed(dir, 'flat.vmdk', vmdkRegions)],
      reseal: () => {},
    },
    { format: 'vhdx', seeds: [seed(dir, 'd.vhdx', vhdxRegions), seed(dir, 'f.vhdx', vhdxRegions)], reseal: vhdxReseal },
  ];
}

/**
 * Blocks of one stream followed at most. A declared capacity is legitimate up to what the GD
 * limit allows (512 TiB of 64 KiB grains: 16 Mi zero runs of 32 MiB, the pipeline's unit for a
 * hole), so like readEverything's extent cap this bounds the case, not the parser.
 */
const MAX_STREAM_BLOCKS = 100_000;

/** A ReadTarget over bytes in memory, read in small pieces (as a pipe delivers them). */
function memoryTarget(bytes: Uint8Array): ReadTarget {
  let pos = 0;
  return {
    name: 'standard input',
    positional: false,
    read: async (buffer, offset, length) => {
      const n = Math.min(length, bytes.length - pos, 7001);
      buffer.set(bytes.subarray(pos, pos + n), offset);
      pos += n;
      return n;
    },
  };
}

/** The stream parser under the contract: typed errors only, no hang, bounded memory. */
async function streamCase(bytes: Uint8Array): Promise<string> {
  const start = process.memoryUsage().arrayBuffers;
  let timer: NodeJS.Timeout | undefined;
  const work = (async () => {
    const input = await openStreamInput(memoryTarget(bytes), 'vmdk', 65536);
    if (input.kind !== 'blocks') return 'raw';
    await input.size;
    let peak = 0;
    let blocks = 0;
    for await (const block of input.blocks) {
      void block;
      // Sampled, not read per Block: memoryUsage() costs more than a zero run.
      if (blocks % 64 === 0) peak = Math.max(peak, process.memoryUsage().arrayBuffers - start);
      if (++blocks >= MAX_STREAM_BLOCKS) break;
    }
    if (peak > CASE_MEMORY_LIMIT) throw new ContractViolation('memory', `the stream parser grew array buffers by ${peak} bytes`);
    return 'ok';
  })();
  try {
    return await Promise.race([
      work,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new ContractViolation('stream', `did not finish within ${STAGE_TIMEOUT_MS} ms`)), STAGE_TIMEOUT_MS);
      }),
    ]);
  } catch (err) {
    if (err instanceof ContractViolation) throw err;
    if (isQcow2StreamError(err)) return err.code;
    throw new ContractViolation('stream', `a foreign error escaped: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`, { cause: err });
  } finally {
    clearTimeout(timer);
  }
}

/** Seeds and the known-good image, made once for every format's test. */
let shared: { dir: string; formats: FormatSeeds[]; good: string; expected: Buffer } | undefined;
// Registered at the top level: removed after every test of the file, not after the first.
after(() => {
  if (shared) rmSync(shared.dir, { recursive: true, force: true });
});

async function setup() {
  if (shared) return shared;
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-fuzz-formats-'));
  const formats = makeFormatSeeds(dir);
  // A known-good image, read after refused cases (poisoning).
  const good = join(dir, 'd.vhd');
  const expected = readFileSync(join(dir, 'src.raw'));
  await runCase(dir, 'warmup.vhd', readFileSync(good));
  shared = { dir, formats, good, expected };
  return shared;
}

for (const format of ['vpc', 'vmdk', 'vhdx']) {
  test(`mutated ${format} images: the reader contract holds`, { timeout: 60 * 60_000 }, async (t) => {
    if (!needQemu(t)) return;
    const { dir, formats, good, expected } = await setup();
    const { seeds, reseal } = formats.find((f) => f.format === format)!;
    let cases = 0;
    let opened = 0;
    const slow: string[] = [];
    const codes = new Map<string, number>();
    const campaignStart = performance.now();
    await fc.assert(
      fc.asyncProperty(mutationCaseArb(seeds.length), fc.boolean(), async ({ seed: index, mutations }, sealed) => {
        const chosen = seeds[index]!;
        const bytes = applyMutations(chosen, mutations);
        if (sealed) reseal(bytes);
        if (traceFile) appendFileSync(traceFile, `${JSON.stringify({ format, case: cases, seed: chosen.name, sealed, mutations }, (_, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v))}\n`);
        const started = performance.now();
        const outcome = await runCase(dir, `fuzz-${chosen.name}`, bytes);
        if (outcome.open === 'ok') opened++;
        for (const code of [outcome.open, outcome.read]) if (code && code !== 'ok') codes.set(code, (codes.get(code) ?? 0) + 1);
        if (outcome.open !== 'ok' || outcome.read !== 'ok') await assertNotPoisoned(good, expected);
        if (chosen.name.startsWith('so') || chosen.name.startsWith('w.')) {
          const code = await streamCase(bytes);
          codes.set(`stream:${code}`, (codes.get(`stream:${code}`) ?? 0) + 1);
        }
        const took = performance.now() - started;
        if (traceFile) appendFileSync(traceFile, `${JSON.stringify({ format, done: cases, ms: Math.round(took) })}\n`);
        if (took > SLOW_CASE_MS) slow.push(`case ${cases} (${chosen.name}, ${Math.round(took)} ms)`);
        cases++;
      }),
      { numRuns: RUNS, ...(fuzzSeed === undefined ? {} : { seed: fuzzSeed }) },
    );
    t.diagnostic(`${format}: ${cases} cases in ${((performance.now() - campaignStart) / 1000).toFixed(1)} s, ${opened} opened; ${[...codes].map(([c, n]) => `${c}=${n}`).join(' ')}`);
    if (slow.length > 0) t.diagnostic(`${format}: ${slow.length} cases over ${SLOW_CASE_MS} ms: ${slow.slice(0, 10).join(', ')}`);
    assert.equal(cases, RUNS);
    // The mutations must reach past the first checks often enough to mean something.
    assert.ok(opened > 0, `${format}: no mutated image opened`);
  });
}
