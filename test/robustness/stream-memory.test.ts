/**
 * A stream input keeps memory flat however long it runs: zeros through a pipe (the CLI, with
 * its abort signal) peak no higher at 4 GiB than at 512 MiB, give or take the allocator's
 * noise. The CLI used to race every read against one never-settling abort promise, which kept
 * a reaction per Block alive: about 10 MB of heap per GiB, until a 96 MB heap cap aborted it.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI_PATH } from '../helpers/cli.js';
import { tempDir } from '../helpers/qemu.js';
import { repetitions } from '../helpers/long.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** Runs `convert -` on `bytes` zeros from a pipe, under a small heap cap; returns the peak heap (MiB). */
async function peakHeapMiB(dir: string, bytes: number, sized: boolean): Promise<number> {
  const probe = join(dir, 'probe.mjs');
  // Sampled at exit and every 100 ms: the peak of heapUsed after a GC.
  writeFileSync(
    probe,
    `import { writeSync } from 'node:fs';
     let peak = 0; const sample = () => { globalThis.gc?.(); peak = Math.max(peak, process.memoryUsage().heapUsed); };
     setInterval(sample, 100).unref();
     process.on('exit', () => { sample(); writeSync(3, String(peak)); });`,
  );
  const args = ['--expose-gc', '--max-old-space-size=64', '--import', probe, '--import', import.meta.resolve('tsx'), CLI_PATH, 'convert', '-q', '--no-sync', '--force', '-', join(dir, 'out.qcow2')];
  if (sized) args.push('--size', String(bytes));
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  let report = '';
  (child.stdio[3] as NodeJS.ReadableStream).setEncoding('utf8').on('data', (s: string) => (report += s));
  const zeros = Buffer.alloc(4 * MiB);
  const stdin = child.stdin!;
  stdin.on('error', () => {});
  for (let sent = 0; sent < bytes; sent += zeros.length) {
    if (!stdin.write(zeros)) await once(stdin, 'drain');
  }
  stdin.end();
  const [code] = (await once(child, 'close')) as [number | null];
  assert.equal(code, 0, stderr);
  return Number(report) / MiB;
}

for (const sized of [true, false]) {
  test(`zeros through a pipe keep the heap flat from 512 MiB to 4 GiB (${sized ? 'with' : 'without'} --size)`, async (t) => {
    const dir = tempDir(t);
    const small = await peakHeapMiB(dir, 512 * MiB, sized);
    const large = await peakHeapMiB(dir, repetitions(4, 16) * GiB, sized);
    assert.ok(large <= small + 8, `peak heap ${large.toFixed(1)} MiB at the large size, ${small.toFixed(1)} MiB at 512 MiB`);
  });
}
