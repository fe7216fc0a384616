/**
 * Write faults through the CLI. The child process cannot be patched from here, so a preload
 * (fault-preload.mjs, through NODE_OPTIONS) patches FileHandle inside it and fails the chosen
 * call on the chosen file; /dev/full gives a real ENOSPC. Every run must exit 2 with one line
 * on stderr (no stack trace), print nothing on stdout, and leave the directory exactly as it
 * was: no final name, no `.partial`, the input and any existing file unchanged.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { convert } from '../../src/write/convert.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { CLI_PATH, runCli, type CliResult } from '../helpers/cli.js';
import { tempDir } from '../helpers/qemu.js';
import { traceCalls } from './faults.js';

const MiB = 1024 * 1024;
const SIZE = 24 * MiB;
const PRELOAD = fileURLToPath(new URL('./fault-preload.mjs', import.meta.url));

interface Fault {
  method: 'writev' | 'truncate' | 'sync';
  /** Regex source matched against the descriptor's path in the child. */
  path: string;
  okCalls: number;
  code: 'ENOSPC' | 'EIO';
  position?: number;
}

const temporaryOf = (final: string) => `/\\.${final.replace(".", "\\.")}\\.qs\\d+-[0-9a-f]+\\.partial$`;

function faultEnv(fault: Fault | undefined): Record<string, string> {
  return fault
    ? { NODE_OPTIONS: `${process.env['NODE_OPTIONS'] ?? ''} --import=${PRELOAD}`.trim(), QCOW2_STREAM_TEST_FAULT: JSON.stringify(fault) }
    : {};
}

function runWithFault(dir: string, args: string[], fault: Fault | undefined): CliResult {
  return runCli(args, { cwd: dir, env: faultEnv(fault) });
}

/**
 * Like runCli with `input` on a pipe, but a CLI that fails before reading all of it is fine: the
 * writer then sees EPIPE, as `curl … | qcow2-stream convert -` would.
 */
async function runFeeding(dir: string, args: string[], fault: Fault | undefined, input: Uint8Array): Promise<CliResult> {
  const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), CLI_PATH, ...args], {
    cwd: dir,
    env: { ...process.env, ...faultEnv(fault) },
  });
  const stdout: Buffer[] = [];
  const stderr: Buffer[] = [];
  child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
  child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
  child.stdin.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
  });
  child.stdin.end(input);
  const [code] = (await once(child, 'close')) as [number | null];
  const stdoutBytes = Buffer.concat(stdout);
  return { code: code ?? -1, stdout: stdoutBytes.toString('utf8'), stderr: Buffer.concat(stderr).toString('utf8'), stdoutBytes };
}

function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of readdirSync(dir).sort()) out[name] = createHash('sha256').update(readFileSync(join(dir, name))).digest('hex');
  return out;
}

/** Exit 2, one line naming the file and the reason, no stack trace, nothing on stdout. */
function assertOneLineFailure(result: CliResult, message: RegExp): void {
  assert.equal(result.code, 2, result.stderr);
  assert.equal(result.stdout, '');
  const lines = result.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, result.stderr);
  assert.match(lines[0]!, message);
  assert.doesNotMatch(result.stderr, /^\s+at /m);
}

function makeInput(dir: string): Buffer {
  writeRawImage(join(dir, 'in.raw'), SIZE, mixedExtents(SIZE, 65536, 11), 11);
  return readFileSync(join(dir, 'in.raw'));
}

/** Writes one clean API run makes to `final` (the CLI runs the same code, so the same count). */
async function writesOf(t: import('node:test').TestContext, dir: string, final: string, run: () => Promise<unknown>): Promise<number> {
  const trace = await traceCalls(t, 'writev', (path) => new RegExp(temporaryOf(final)).test(path));
  await run();
  trace.stop();
  rmSync(join(dir, 'out.qcow2'), { force: true });
  rmSync(join(dir, 'out.data'), { force: true });
  return trace.calls.length;
}

const NO_SPACE = 'no space left on device';
const IO_ERROR = 'input/output error';

test('convert FILE: ENOSPC on the data file, EIO on the last metadata write, EIO on its fsync', async (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  const metadataWrites = await writesOf(t, dir, 'out.qcow2', () => convert({ input: join(dir, 'in.raw'), output: join(dir, 'out.qcow2') }));
  const before = snapshot(dir);
  const cases: Array<[Fault, RegExp]> = [
    [{ method: 'writev', path: temporaryOf('out.data'), okCalls: 1, code: 'ENOSPC' }, new RegExp(`^qcow2-stream: Cannot write the data file 'out\\.data': ${NO_SPACE} \\[QCOW_ERR_FILE\\]$`)],
    // The last metadata write comes after every data write (the streamed L2 tables at the end).
    [{ method: 'writev', path: temporaryOf('out.qcow2'), okCalls: metadataWrites - 1, code: 'EIO' }, new RegExp(`^qcow2-stream: Cannot write the metadata file 'out\\.qcow2': ${IO_ERROR} \\[QCOW_ERR_FILE\\]$`)],
    [{ method: 'sync', path: temporaryOf('out.data'), okCalls: 0, code: 'EIO' }, new RegExp(`^qcow2-stream: Cannot finish the data file 'out\\.data': ${IO_ERROR} \\[QCOW_ERR_FILE\\]$`)],
  ];
  for (const [fault, message] of cases) {
    assertOneLineFailure(runWithFault(dir, ['convert', 'in.raw', 'out.qcow2'], fault), message);
    assert.deepEqual(snapshot(dir), before, `the directory changed after ${JSON.stringify(fault)}`);
  }
});

test('convert - (a pipe, size unknown): ENOSPC on the data file, EIO on the metadata written at the end', async (t) => {
  const dir = tempDir(t);
  const bytes = makeInput(dir);
  const before = snapshot(dir);
  const args = ['convert', '-', 'out.qcow2', '--data-file', 'out.data'];
  const cases: Array<[Fault, RegExp]> = [
    [{ method: 'writev', path: temporaryOf('out.data'), okCalls: 1, code: 'ENOSPC' }, new RegExp(`^qcow2-stream: Cannot write the data file 'out\\.data': ${NO_SPACE} \\[QCOW_ERR_FILE\\]$`)],
    [{ method: 'writev', path: temporaryOf('out.qcow2'), okCalls: 1, code: 'EIO' }, new RegExp(`^qcow2-stream: Cannot write the metadata file 'out\\.qcow2': ${IO_ERROR} \\[QCOW_ERR_FILE\\]$`)],
  ];
  for (const [fault, message] of cases) {
    assertOneLineFailure(await runFeeding(dir, args, fault, bytes), message);
    assert.deepEqual(snapshot(dir), before);
  }
  // The same command without a fault works, so the faults above are what failed the runs.
  assert.equal((await runFeeding(dir, [...args, '-q'], undefined, bytes)).code, 0);
  assert.ok(readFileSync(join(dir, 'out.data')).equals(bytes));
});

test('convert --internal: ENOSPC on a data write, EIO on the header written last', (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  const before = snapshot(dir);
  const cases: Array<[Fault, RegExp]> = [
    [{ method: 'writev', path: temporaryOf('out.qcow2'), okCalls: 1, code: 'ENOSPC' }, new RegExp(`^qcow2-stream: Cannot write the image 'out\\.qcow2': ${NO_SPACE} \\[QCOW_ERR_FILE\\]$`)],
    [{ method: 'writev', path: temporaryOf('out.qcow2'), okCalls: 0, code: 'EIO', position: 0 }, new RegExp(`^qcow2-stream: Cannot write the image 'out\\.qcow2': ${IO_ERROR} \\[QCOW_ERR_FILE\\]$`)],
  ];
  for (const [fault, message] of cases) {
    assertOneLineFailure(runWithFault(dir, ['convert', '--internal', 'in.raw', 'out.qcow2'], fault), message);
    assert.deepEqual(snapshot(dir), before);
  }
});

test('wrap: EIO and ENOSPC on the metadata, the raw file untouched', (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  const before = snapshot(dir);
  const cases: Array<[string[], Fault, RegExp]> = [
    [[], { method: 'writev', path: temporaryOf('out.qcow2'), okCalls: 1, code: 'EIO' }, new RegExp(`^qcow2-stream: Cannot write the metadata file 'out\\.qcow2': ${IO_ERROR} \\[QCOW_ERR_FILE\\]$`)],
    [['--no-data-file-raw'], { method: 'writev', path: temporaryOf('out.qcow2'), okCalls: 0, code: 'ENOSPC' }, new RegExp(`^qcow2-stream: Cannot write the metadata file 'out\\.qcow2': ${NO_SPACE} \\[QCOW_ERR_FILE\\]$`)],
  ];
  for (const [flags, fault, message] of cases) {
    assertOneLineFailure(runWithFault(dir, ['wrap', ...flags, 'in.raw', 'out.qcow2'], fault), message);
    assert.deepEqual(snapshot(dir), before);
  }
});

test('a data file on /dev/full (a real ENOSPC): exit 2, the metadata file removed', (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  const before = snapshot(dir);
  const result = runWithFault(dir, ['convert', 'in.raw', 'out.qcow2', '--data-file', '/dev/full'], undefined);
  assertOneLineFailure(result, new RegExp(`^qcow2-stream: Cannot write to '/dev/full': ${NO_SPACE} \\[QCOW_ERR_FILE\\]$`));
  assert.deepEqual(snapshot(dir), before);
});

test('an existing data file without --force: exit 2 with a hint, the file intact; with --force and a fault, still intact', (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  writeFileSync(join(dir, 'out.data'), 'somebody else’s data');
  const before = snapshot(dir);
  const refused = runWithFault(dir, ['convert', 'in.raw', 'out.qcow2'], undefined);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /^qcow2-stream: The data file 'out\.data' already exists \[QCOW_ERR_FILE\]\n {2}hint: .*--force/);
  assert.doesNotMatch(refused.stderr, /^\s+at /m);
  assert.deepEqual(snapshot(dir), before);

  const fault: Fault = { method: 'writev', path: temporaryOf('out.data'), okCalls: 2, code: 'ENOSPC' };
  assertOneLineFailure(runWithFault(dir, ['convert', '--force', 'in.raw', 'out.qcow2'], fault), /Cannot write the data file 'out\.data': no space left on device/);
  assert.deepEqual(snapshot(dir), before);
});

test('--no-sync skips every fsync: convert, wrap and export succeed where each fsync would fail', (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  const everyFsyncFails: Fault = { method: 'sync', path: '.', okCalls: 0, code: 'EIO' };
  const commands = [
    ['convert', 'in.raw', 'out.qcow2'],
    ['wrap', '--no-data-file-raw', 'in.raw', 'wrapped.qcow2'],
    ['export', 'out.qcow2', 'out.raw'],
  ];
  for (const args of commands) {
    const before = snapshot(dir);
    assertOneLineFailure(runWithFault(dir, args, everyFsyncFails), /input\/output error \[QCOW_ERR_FILE\]$/);
    assert.deepEqual(snapshot(dir), before, `${args[0]} without --no-sync left nothing behind`);
    const result = runWithFault(dir, [...args, '--no-sync'], everyFsyncFails);
    assert.equal(result.code, 0, `${args[0]} --no-sync: ${result.stderr}`);
  }
  assert.deepEqual(readFileSync(join(dir, 'out.raw')), readFileSync(join(dir, 'in.raw')));
});
