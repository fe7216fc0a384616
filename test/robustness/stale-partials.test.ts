/**
 * A run killed with SIGKILL cannot remove its temporary files (`.NAME.qs<PID>-<hex>.partial`);
 * the next run writing the same output name removes them — only those: the same name pattern,
 * owned by this user, and a writer process that no longer exists.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI_PATH, runCli } from '../helpers/cli.js';
import { needQemu, qemuCompare, tempDir } from '../helpers/qemu.js';
import { repetitions } from '../helpers/long.js';

const MiB = 2 ** 20;

const partials = (dir: string) => readdirSync(dir).filter((name) => name.endsWith('.partial'));

test('partials left by kill -9 are removed by the next run of the same output, and only ours', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const data = Buffer.alloc(8 * MiB, 0x42);
  writeFileSync(join(dir, 'in.raw'), data);
  const trials = repetitions(3, 40);
  for (let trial = 0; trial < trials; trial++) {
    // A conversion from a pipe that is kept open: it writes some of the data, then waits.
    const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), CLI_PATH, 'convert', '-q', '--force', '-', 'out.qcow2', '--size', String(64 * MiB)], {
      cwd: dir,
      stdio: ['pipe', 'ignore', 'ignore'],
    });
    child.stdin.on('error', () => {});
    child.stdin.write(data.subarray(0, (1 + (trial % 4)) * MiB));
    for (let waited = 0; partials(dir).length < 2 && waited < 200; waited++) await new Promise((resolve) => setTimeout(resolve, 50));
    child.kill('SIGKILL');
    await once(child, 'close');
    assert.ok(partials(dir).length >= 1, `trial ${trial}: the killed run left no partial to clean up`);
  }
  // Look-alikes that are not ours to remove: a live writer's (this test's pid), another name's,
  // and a name that only resembles the pattern.
  const keep = [`.out.qcow2.qs${process.pid}-0123abcd.partial`, `.other.qcow2.qs999999-0123abcd.partial`, `.out.qcow2.notours.partial`];
  for (const name of keep) writeFileSync(join(dir, name), 'keep');
  const ran = runCli(['convert', '-q', '--force', 'in.raw', 'out.qcow2'], { cwd: dir });
  assert.equal(ran.code, 0, ran.stderr);
  assert.equal(qemuCompare('in.raw', 'out.qcow2', dir).code, 0);
  assert.deepEqual(partials(dir).sort(), [...keep].sort());
});
