/**
 * Fuzzing the read side under its contract (see ./contract.ts): mutated qemu-made images of
 * every kind, and random files, through open → export/read → check → info.
 *
 * In CI each property runs for a fixed time budget. A long local campaign:
 *
 *     QCOW2_FUZZ_RUNS=10000 node test/run.mjs test/fuzz
 *
 * runs that many cases per property with no time limit (QCOW2_FUZZ_SEED replays a run; the
 * failing seed and path are printed on failure).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img } from '../read/fixtures.js';
import { assertNotPoisoned, runCase, type CaseOutcome } from './contract.js';
import { applyMutations, mutationCaseArb, randomFileArb } from './mutations.js';
import { makeSeeds } from './seeds.js';

const requestedRuns = Number(process.env['QCOW2_FUZZ_RUNS'] ?? 0);
const seed = process.env['QCOW2_FUZZ_SEED'] === undefined ? undefined : Number(process.env['QCOW2_FUZZ_SEED']);

/** Runs for `budgetMs` in CI, or exactly QCOW2_FUZZ_RUNS cases when set. */
function parameters(budgetMs: number): fc.Parameters<unknown> {
  const base: fc.Parameters<unknown> = seed === undefined ? {} : { seed };
  if (requestedRuns > 0) return { ...base, numRuns: requestedRuns };
  return { ...base, numRuns: 1_000_000, interruptAfterTimeLimit: budgetMs, markInterruptAsFailure: false };
}

/** Counts how far cases got, so a run that only ever hits the magic check is noticed. */
class Tally {
  cases = 0;
  opened = 0;
  readClean = 0;
  checked = 0;
  codes = new Map<string, number>();
  add(outcome: CaseOutcome): void {
    this.cases++;
    if (outcome.open === 'ok') this.opened++;
    if (outcome.read === 'ok') this.readClean++;
    if (outcome.check === 'ok') this.checked++;
    for (const code of [outcome.open, outcome.read, outcome.check, outcome.info]) {
      if (code && code !== 'ok') this.codes.set(code, (this.codes.get(code) ?? 0) + 1);
    }
  }
  toString(): string {
    const codes = [...this.codes].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c}=${n}`).join(' ');
    return `${this.cases} cases: ${this.opened} opened, ${this.readClean} read cleanly, ${this.checked} checked; refusals: ${codes}`;
  }
}

test('mutated images of every kind: only typed errors, no hang, bounded memory, no leaked handles, no poisoning', { timeout: 30 * 60_000 }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t, 'qcow2-fuzz-');
  const seeds = makeSeeds(dir);
  img(dir, 'convert', '-O', 'raw', 'int.qcow2', 'int.expected.raw');
  const expected = readFileSync(join(dir, 'int.expected.raw'));
  // Warm up the lazily opened descriptors of the runtime (thread pool, timers) before counting.
  await runCase(dir, 'warmup.qcow2', seeds[0]!.bytes);

  const tally = new Tally();
  const started = Date.now();
  await fc.assert(
    fc.asyncProperty(mutationCaseArb(seeds.length), async ({ seed: index, mutations }) => {
      const chosen = seeds[index]!;
      const outcome = await runCase(dir, `fuzz-${chosen.name}`, applyMutations(chosen, mutations));
      tally.add(outcome);
      if (outcome.open !== 'ok' || outcome.read !== 'ok') await assertNotPoisoned(join(dir, 'int.qcow2'), expected);
    }),
    parameters(20_000),
  );
  t.diagnostic(`${tally} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.ok(tally.opened > tally.cases / 10, `too few mutated images open (${tally}); the mutations no longer reach the mapping code`);
  assert.ok(tally.readClean > 0);
});

test('random files and header-shaped garbage: only typed errors, no hang, no leaked handles', { timeout: 30 * 60_000 }, async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t, 'qcow2-fuzz-');
  makeSeeds(dir); // companions: random headers may name a data or backing file
  await runCase(dir, 'warmup.qcow2', new Uint8Array(16));
  const tally = new Tally();
  const started = Date.now();
  await fc.assert(
    fc.asyncProperty(randomFileArb, async (bytes) => {
      tally.add(await runCase(dir, 'random.img', bytes));
    }),
    parameters(5_000),
  );
  t.diagnostic(`${tally} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
});
