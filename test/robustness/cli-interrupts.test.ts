/**
 * The CLI under interruption and a failing standard output: SIGINT/SIGTERM during `export`
 * end it quickly with 130/143, a one-line message and no output file; `export … - > /dev/full`
 * ends with 2 and a clear message. Never a stack trace.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, openSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NO_NATIVE_ENV } from '../../src/io/native.js';
import { CLI_PATH } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io } from '../read/fixtures.js';

const tsx = import.meta.resolve('tsx');
const STACK_LINE = /^\s+at /m;

async function waitFor(condition: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
  test(`${signal} during export: exit ${code} within moments, no output left, no stack trace`, async (t) => {
    const dir = tempDir(t);
    // 16 GiB of holes read as one data extent: long enough to be interrupted, costs no disk.
    // (Without the native addon: with it, the holes are skipped and the export is over at once.)
    writeFileSync(join(dir, 'big.raw'), '');
    truncateSync(join(dir, 'big.raw'), 16 * 1024 ** 3);
    const child = spawn(process.execPath, ['--import', tsx, CLI_PATH, 'export', '-f', 'raw', 'big.raw', 'out.raw'], {
      cwd: dir,
      env: { ...process.env, [NO_NATIVE_ENV]: '1' },
    });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.on('exit', (c, s) => resolve({ code: c, signal: s })));
    // The export is under way once its temporary output exists.
    await waitFor(() => readdirSync(dir).some((name) => name.includes('.partial')), 20_000);
    const sent = Date.now();
    child.kill(signal);
    const result = await exited;
    const latency = Date.now() - sent;
    assert.deepEqual(result, { code, signal: null }, stderr);
    assert.ok(latency < 3000, `took ${latency} ms to stop after ${signal}`);
    assert.match(stderr, new RegExp(`Interrupted by ${signal} \\[QCOW_ERR_ABORTED\\]`));
    assert.doesNotMatch(stderr, STACK_LINE);
    assert.deepEqual(readdirSync(dir).sort(), ['big.raw'], 'no output and no temporary file may remain');
  });
}

test('export to a full standard output (/dev/full): exit 2, "no space left on device", no stack trace', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'a.qcow2', '16M');
  io(dir, 'a.qcow2', 'write -P 0x11 0 12M');
  const full = openSync('/dev/full', 'w');
  try {
    const result = spawnSync(process.execPath, ['--import', tsx, CLI_PATH, 'export', 'a.qcow2', '-'], {
      cwd: dir,
      stdio: ['ignore', full, 'pipe'],
      encoding: 'utf8',
      timeout: 30_000,
    });
    assert.equal(result.status, 2, result.stderr);
    assert.match(result.stderr, /^qcow2-stream: Cannot write to 'standard output': no space left on device \[QCOW_ERR_FILE\]$/m);
    assert.doesNotMatch(result.stderr, STACK_LINE);
  } finally {
    closeSync(full);
  }
});
