/**
 * What `info` touches: the image file and nothing else (CVE-2024-4467 — inspecting an untrusted
 * image must not open the files it names). Proved two ways: with the data file and the backing
 * file replaced by FIFOs, which would block any open(2) for reading, `info` still answers at
 * once; and under strace, the only file of the image's directory it opens is the image.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { CLI_PATH } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io } from '../read/fixtures.js';

const tsx = import.meta.resolve('tsx');

/** top.qcow2 with a data file and a backing file, both then replaced by FIFOs. */
function imageNamingFifos(dir: string): void {
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '1M');
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '1M');
  io(dir, 'top.qcow2', 'write -P 0x11 0 64k');
  for (const name of ['d.data', 'base.qcow2']) {
    rmSync(join(dir, name));
    execFileSync('mkfifo', [join(dir, name)]);
  }
}

function cli(dir: string, args: string[], prefix: string[] = []) {
  const [command, ...rest] = prefix.length ? prefix : [process.execPath];
  return spawnSync(command!, [...rest, ...(prefix.length ? [process.execPath] : []), '--import', tsx, CLI_PATH, ...args], {
    cwd: dir,
    encoding: 'utf8',
    timeout: 20_000,
  });
}

test('info and check answer with the data file and backing file replaced by FIFOs (they are never opened)', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  imageNamingFifos(dir);
  const info = cli(dir, ['info', '--json', 'top.qcow2']);
  assert.equal(info.error, undefined, 'info blocked (timed out): it opened a FIFO');
  assert.equal(info.status, 0, info.stderr);
  const parsed = JSON.parse(info.stdout) as { 'backing-filename': string; 'format-specific': { data: { 'data-file': string } } };
  assert.equal(parsed['backing-filename'], 'base.qcow2');
  assert.equal(parsed['format-specific'].data['data-file'], 'd.data');
  const check = cli(dir, ['check', 'top.qcow2']);
  assert.equal(check.error, undefined, 'check blocked (timed out): it opened a FIFO');
  assert.equal(check.status, 0, check.stderr + check.stdout);
  // Reading the guest needs those files, and the policy refuses FIFOs before opening them.
  const exported = cli(dir, ['export', 'top.qcow2', 'out.raw']);
  assert.equal(exported.error, undefined);
  assert.equal(exported.status, 2);
  assert.match(exported.stderr, /not a regular file \(it is a FIFO\)/);
});

test('under strace, info opens the image and no other file of its directory', (t) => {
  if (!needQemu(t)) return;
  const probe = spawnSync('strace', ['-f', '-qq', '-e', 'trace=openat', '-o', '/dev/null', 'true']);
  if (probe.error || probe.status !== 0) {
    t.skip('strace is missing or not permitted here');
    return;
  }
  const dir = tempDir(t);
  imageNamingFifos(dir);
  const log = join(dir, '..', `${dir.split('/').pop()}-strace.log`);
  t.after(() => rmSync(log, { force: true }));
  const info = cli(dir, ['info', 'top.qcow2'], ['strace', '-f', '-qq', '-e', 'trace=openat,open,openat2,stat,statx,newfstatat', '-o', log]);
  assert.equal(info.status, 0, info.stderr);
  const calls = readFileSync(log, 'utf8').split('\n');
  const touching = (name: string) => calls.filter((line) => line.includes(`/${name}"`) || line.includes(`"${name}"`));
  assert.ok(touching('top.qcow2').some((line) => /open/.test(line)), 'strace saw the image being opened');
  assert.deepEqual(touching('d.data'), [], 'info must not even look at the data file');
  assert.deepEqual(touching('base.qcow2'), [], 'info must not even look at the backing file');
});
