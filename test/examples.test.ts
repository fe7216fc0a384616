/**
 * Runs every program in examples/ as a user would — `node --import tsx examples/NAME.ts DIR` —
 * so CI fails when an example stops working; the quick start (sample.ts, `npm run sample`)
 * runs at 16 MiB instead of 512. Each example verifies its own result and exits non-zero on
 * failure; the examples run concurrently, each in its own temporary directory.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const tsx = import.meta.resolve('tsx');
const examples = readdirSync(join(root, 'examples'))
  .filter((name) => name.endsWith('.ts') && name !== 'sample.ts')
  .sort();

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
}

function runExample(name: string, argument: string): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', tsx, join('examples', name), argument], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 60_000,
    });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code, signal, output }));
  });
}

test('examples/ holds the documented examples', () => {
  for (const name of ['one-call.ts', 'custom-transform.ts', 'http-ingest.ts', 'nightly-incremental.ts', 'read-sectors.ts']) {
    assert.ok(examples.includes(name), `examples/${name} exists`);
  }
});

test('every example runs and succeeds', { concurrency: true }, async (t) => {
  const runs = examples.map((name) =>
    t.test(name, async (t) => {
      const dir = mkdtempSync(join(tmpdir(), `qcow2-stream-example-`));
      t.after(() => rmSync(dir, { recursive: true, force: true }));
      const run = await runExample(name, dir);
      assert.equal(run.code, 0, `examples/${name} exited with ${run.code ?? run.signal}:\n${run.output}`);
      assert.match(run.output, new RegExp(`${name.replace(/\.ts$/, '')}: ok`), `examples/${name} reports success`);
    }),
  );
  await Promise.all(runs);
});

test('the quick start (npm run sample) passes every step, qemu-img included where installed', async () => {
  // It works in sample/ at the root, as the README runs it.
  const run = await runExample('sample.ts', '16');
  assert.equal(run.code, 0, `examples/sample.ts exited with ${run.code ?? run.signal}:\n${run.output}`);
  assert.match(run.output, /sample: all steps passed/);
});
